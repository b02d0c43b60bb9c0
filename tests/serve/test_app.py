"""The decoder server on a real uvicorn (127.0.0.1, a free port) with a tiny random CodeGen:
the official `openai` client, 16 concurrent streams, the bad-input table, disconnects, the
loading and busy states, sharding over 8 fake CPU devices, and the REPL over the server."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import jax
import nbformat
import openai
import pytest

from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.errors import ConfigError
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import LogitsFn
from codegen_repl.model.tokenizer import WHITESPACE_TOKENS, CodeGenTokenizer
from codegen_repl.serve.app import ServerConfig, create_app, serve_in_thread
from codegen_repl.serve.engine import Engine, EngineConfig
from tests.conftest import hf_codegen

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 512  # the tiny model's window: long enough for a stream to be cut off mid-way
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n",
    "# compute the sum of a list\n",
    "class Stack:\n    def",
    "x = 1\n",
    "for i in range(10):\n",
    "def greet(name):\n",
    "try:\n    value",
]
SCRIPT = Path(sys.executable).with_name("codegen-repl")


@pytest.fixture(scope="session")
def server_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_files: Path) -> Path:
    """A tiny random checkpoint with the tiny tokenizer and a 512-token window."""
    vocab_size = CodeGenTokenizer.from_dir(tokenizer_files).vocab_size
    folder = tmp_path_factory.mktemp("server_checkpoint")
    model = hf_codegen(seed=5, vocab_size=vocab_size, n_positions=CONTEXT)
    model.config.eos_token_id = model.config.bos_token_id = vocab_size - 1 - len(WHITESPACE_TOKENS)
    model.save_pretrained(folder)
    for file in tokenizer_files.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def local(server_checkpoint: Path) -> LocalDecoder:
    return LocalDecoder.load(server_checkpoint)


def engine_loader(
    local: LocalDecoder, logits_fn: LogitsFn | None = None, **settings: int
) -> Callable[[], Engine]:
    def load() -> Engine:
        config = EngineConfig(**settings)
        model = logits_fn or local.logits_fn
        return Engine(local.config, local.params, local.tokenizer, model, config)

    return load


@functools.cache  # one function per setting, so jit's cache is shared by the servers using it
def slowed(logits_fn: LogitsFn, seconds: float) -> LogitsFn:
    """The model on a slow device: each call waits on the host, so a long request really
    takes long (the tiny model decodes 480 tokens in 0.1 s)."""

    def slow(params, tokens, positions, cache, logits_at):
        jax.debug.callback(lambda _: time.sleep(seconds), tokens)
        return logits_fn(params, tokens, positions, cache, logits_at)

    return slow


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not finish loading"
        time.sleep(0.05)


@pytest.fixture(scope="session")
def server(local: LocalDecoder) -> Iterator[str]:
    """The main server: 16 slots, a key, a 64 KiB body limit."""
    app = create_app("tiny", engine_loader(local, max_batch=16), KEY, max_body_bytes=64 << 10)
    with serve_in_thread(app) as url:
        wait_ready(url)
        yield url


@pytest.fixture(scope="session")
def one_slot(local: LocalDecoder) -> Iterator[str]:
    """A server with one slot and room for one request: to see slots freed and 429s."""
    slow = slowed(local.logits_fn, 0.01)  # 480 tokens: about 5 s
    app = create_app("tiny", engine_loader(local, slow, max_batch=1, max_concurrency=1), KEY)
    with serve_in_thread(app) as url:
        wait_ready(url)
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


# ------------------------------------------------------------------------- the openai client


def test_openai_client_gets_the_local_decoders_text(server: str, local: LocalDecoder) -> None:
    prompt = PROMPTS[0]
    greedy = SampleParams(max_new_tokens=24)
    expected = local.complete(prompt, greedy)[0]
    api = client(server)
    plain = api.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert plain.choices[0].text == expected and plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 24
    assert plain.usage.prompt_tokens == local.count_tokens(prompt)
    stream = api.completions.create(
        model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    chunks = [chunk.choices[0] for chunk in stream]
    assert "".join(c.text for c in chunks) == expected and chunks[-1].finish_reason == "length"
    assert len([c for c in chunks if c.text]) > 1  # streamed in pieces, not at the end


def test_seeded_sampling_and_n_samples(server: str, local: LocalDecoder) -> None:
    sample = SampleParams(max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=20, seed=11)
    expected = local.complete(PROMPTS[1], sample)[0]
    api = client(server)
    got = api.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0.8, top_p=0.9, seed=11,
        extra_body={"top_k": 20},
    )  # fmt: skip
    assert got.choices[0].text == expected
    many = api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, n=3, seed=11)
    texts = [choice.text for choice in sorted(many.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3  # three samples, each its own stream of random numbers
    assert many.usage is not None and many.usage.completion_tokens == 3 * 24


def test_stop_truncation_and_token_id_prompts(server: str, local: LocalDecoder) -> None:
    api = client(server)
    ids = local.tokenizer.encode(PROMPTS[2])
    by_ids = api.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == local.complete(PROMPTS[2], SampleParams(16))[0]
    full = local.complete(PROMPTS[2], SampleParams(48))[0]
    stop = full[10:13]
    stopped = api.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=48, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == full[: full.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    batch = api.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    texts = [choice.text for choice in sorted(batch.choices, key=lambda c: c.index)]
    assert texts == [local.complete(p, SampleParams(8))[0] for p in PROMPTS[:2]]
    rules = SampleParams(48, codegen_rules=True)
    cut = api.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=48, temperature=0,
        extra_body={"codegen_truncation": True},
    )  # fmt: skip
    assert cut.choices[0].text == local.complete(PROMPTS[2], rules)[0]


def test_models_tokenize_and_health(server: str, local: LocalDecoder) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra == {"max_model_len": CONTEXT}
    counted = httpx.post(f"{server}/tokenize", json={"prompt": PROMPTS[3]}, headers=AUTH).json()
    assert counted["tokens"] == local.tokenizer.encode(PROMPTS[3])
    assert counted["count"] == len(counted["tokens"]) and counted["max_model_len"] == CONTEXT
    state = health(server)
    assert state["status"] == "ok" and state["slots"]["total"] == 16


def test_prefix_reuse_per_slot(server: str, local: LocalDecoder) -> None:
    """A follow-up prompt (the next turn) is prefilled only past what a slot already holds."""
    api = client(server)
    first = api.completions.create(model="tiny", prompt=PROMPTS[7], max_tokens=8, temperature=0)
    follow_up = PROMPTS[7] + first.choices[0].text + "\n# next step\n"
    before = health(server)["reused_tokens"]
    second = api.completions.create(model="tiny", prompt=follow_up, max_tokens=8, temperature=0)
    assert health(server)["reused_tokens"] - before >= local.count_tokens(PROMPTS[7])
    assert second.choices[0].text == local.complete(follow_up, SampleParams(8))[0]


def test_server_samples_equal_the_local_decoders(server: str, local: LocalDecoder) -> None:
    """Both decode through model/sampling.py with the same per-sample keys: n sampled
    completions from the server are the local decoder's n, in order."""
    sample = SampleParams(max_new_tokens=12, temperature=0.9, top_p=0.9, n=3, seed=21)
    many = client(server).completions.create(
        model="tiny", prompt=PROMPTS[3], max_tokens=12, temperature=0.9, top_p=0.9, n=3, seed=21
    )
    texts = [choice.text for choice in sorted(many.choices, key=lambda choice: choice.index)]
    assert texts == local.complete(PROMPTS[3], sample)


# ------------------------------------------------------------------------- concurrency


def test_sixteen_concurrent_streams_equal_sequential(server: str, local: LocalDecoder) -> None:
    requests = [(PROMPTS[i % len(PROMPTS)], 12 + 4 * (i % 3)) for i in range(16)]
    expected = [local.complete(p, SampleParams(max_new_tokens=m))[0] for p, m in requests]
    start = threading.Barrier(16, timeout=60)

    def stream(prompt: str, max_tokens: int) -> str:
        api = client(server)
        start.wait()
        chunks = api.completions.create(
            model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
        )
        return "".join(chunk.choices[0].text for chunk in chunks)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = [pool.submit(stream, p, m) for p, m in requests]
        texts = [future.result(timeout=300) for future in results]
    assert texts == expected
    assert health(server)["slots"]["busy"] == 0


def test_disconnect_mid_stream_frees_the_slot(one_slot: str) -> None:
    before, served = health(one_slot)["cancelled"], health(one_slot)["served"]
    body = {"prompt": PROMPTS[4], "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{one_slot}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # keep it: a dropped iterator closes the response
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"][0]["finish_reason"] is None
    deadline = time.monotonic() + 30
    while health(one_slot)["cancelled"] == before or health(one_slot)["slots"]["busy"]:
        assert time.monotonic() < deadline, "the slot of a closed stream was not freed"
        time.sleep(0.02)
    assert health(one_slot)["served"] == served  # it was cut off, not finished
    after = client(one_slot).completions.create(
        model="tiny", prompt=PROMPTS[5], max_tokens=8, temperature=0
    )
    assert after.choices[0].finish_reason == "length"


def test_queue_full_is_429_and_the_server_goes_on(one_slot: str) -> None:
    body = {"prompt": PROMPTS[4], "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST", f"{one_slot}/v1/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        lines = response.iter_lines()  # keep it: a dropped iterator closes the response
        next(lines)
        busy = httpx.post(
            f"{one_slot}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH
        )
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "queue_full"
        assert "retry" in busy.json()["error"]["message"]
    deadline = time.monotonic() + 30
    while True:  # the closed stream's request is dropped within a chunk
        again = httpx.post(
            f"{one_slot}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=AUTH,
            timeout=60,
        )  # fmt: skip
        if again.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------- bad input

LONG = "x = 1\n" * 200  # 400 tokens or more with the tiny tokenizer

BAD_INPUT = [
    # (body bytes or JSON, headers, status, a fragment of the message)
    (b"{not json", AUTH, 400, "not valid JSON"),
    ([1, 2], AUTH, 400, "must be a JSON object"),
    ({"max_tokens": 4}, AUTH, 400, "prompt must be a string"),
    ({"prompt": 5}, AUTH, 400, "prompt must be a string"),
    ({"prompt": ""}, AUTH, 400, "the prompt is empty"),
    ({"prompt": [1, 10**6]}, AUTH, 400, "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": "ten"}, AUTH, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "max_tokens": 0}, AUTH, 400, "max_tokens must be in 1..512"),
    ({"prompt": "x", "max_tokens": 100000}, AUTH, 400, "max_tokens must be in 1..512"),
    ({"prompt": "x", "temperature": "hot"}, AUTH, 400, "temperature must be a number"),
    ({"prompt": "x", "temperature": -1}, AUTH, 400, "temperature must be in [0.0, 2.0]"),
    ({"prompt": "x", "top_p": 0}, AUTH, 400, "top_p must be in (0.0, 1.0]"),
    ({"prompt": "x", "n": 0}, AUTH, 400, "n must be in 1..16"),
    ({"prompt": "x", "n": 17}, AUTH, 400, "n must be in 1..16"),
    ({"prompt": "x", "stop": [1]}, AUTH, 400, "stop must be a string or a list"),
    ({"prompt": "x", "stop": ["a"] * 17}, AUTH, 400, "at most 16 stop strings"),
    ({"prompt": "x", "stream": "yes"}, AUTH, 400, "stream must be true or false"),
    ({"prompt": "x", "seed": -3}, AUTH, 400, "seed must be in"),
    ({"prompt": "x", "echo": True}, AUTH, 400, "echo is not supported"),
    ({"prompt": "x", "logprobs": 2}, AUTH, 400, "logprobs is not supported"),
    ({"prompt": LONG, "max_tokens": 200}, AUTH, 400, "exceeds the model's context of 512"),
    ({"prompt": "x"}, {}, 401, "no API key"),
    ({"prompt": "x"}, {"Authorization": "Bearer nope"}, 401, "a wrong API key"),
    ({"prompt": "x" * (70 << 10)}, AUTH, 413, "over 65536 bytes"),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), BAD_INPUT)
def test_bad_input_gets_an_openai_error(server: str, body, headers, status, message) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**headers, "Content-Type": "application/json"}
    answer = httpx.post(f"{server}/v1/completions", content=raw, headers=headers, timeout=30)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert message in error["message"] and {"type", "param", "code"} <= error.keys()
    served = httpx.post(  # and the server still serves
        f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=AUTH,
        timeout=60,
    )  # fmt: skip
    assert served.status_code == 200


def test_over_context_says_by_how_much(server: str, local: LocalDecoder) -> None:
    size = local.count_tokens(LONG)
    answer = httpx.post(
        f"{server}/v1/completions", json={"prompt": LONG, "max_tokens": 200}, headers=AUTH
    )
    assert f"exceeds the model's context of 512 tokens by {size + 200 - CONTEXT}" in answer.text
    assert answer.json()["error"]["code"] == "context_length_exceeded"


def test_stream_body_too_large_without_length_header(server: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    answer = httpx.post(f"{server}/v1/completions", content=chunks(), headers=AUTH, timeout=60)
    assert answer.status_code == 413


def test_unknown_route_and_method_are_openai_errors(server: str) -> None:
    assert httpx.get(f"{server}/v1/nothing").json()["error"]["message"].endswith("Not Found")
    wrong = httpx.get(f"{server}/v1/completions", headers=AUTH)
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_503_while_the_model_loads(local: LocalDecoder) -> None:
    release = threading.Event()
    load = engine_loader(local, max_batch=2)

    def slow_load() -> Engine:
        assert release.wait(60)
        return load()

    with serve_in_thread(create_app("tiny", slow_load)) as url:
        loading = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "model_loading"
        assert httpx.get(f"{url}/health").json() == {"status": "loading"}
        release.set()
        wait_ready(url)
        ready = httpx.post(
            f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60
        )
        assert ready.status_code == 200


def test_refuses_a_public_address_without_a_key() -> None:
    with pytest.raises(ConfigError, match=r"without an API key.*--api-key"):
        ServerConfig(model="m", host="0.0.0.0")
    assert ServerConfig(model="m", host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert ServerConfig(model="m", host="::1").api_key is None  # loopback needs none
    result = subprocess.run(
        [str(SCRIPT), "serve", "--model", "org/m", "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "CODEGEN_API_KEY"},
    )  # fmt: skip
    assert result.returncode == 2 and "without an API key" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_command_exits_when_the_model_fails_to_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken"  # passes the check before start-up, fails to load
    broken.mkdir()
    (broken / "config.json").write_text('{"n_embd": 64.5}')
    result = subprocess.run(
        [str(SCRIPT), "serve", "--model", str(broken), "--port", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: the model failed to load" in result.stderr
    assert "config.json lacks the required key" in result.stderr


# ------------------------------------------------------------------------- sharding

SHARDED = """
import json, sys, time
import jax, numpy as np
from codegen_repl.serve.engine import Engine, EngineConfig, Finish, Request
from codegen_repl.model.checkpoint import load_model
from codegen_repl.model.modeling import CodeGen
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import model_logits_fn
from codegen_repl.model.sharding import shard_for_decoding

assert jax.local_device_count() == 8, jax.devices()
loaded = load_model(sys.argv[1])
logits_fn = model_logits_fn(CodeGen(loaded.config))

class Ids:  # a stand-in tokenizer: the test works on token ids
    eos_token_id = -1
    def decode(self, ids): return " ".join(map(str, ids))

def tokens(params, cache_sharding=None):
    engine = Engine(loaded.config, params, Ids(), logits_fn, EngineConfig(max_batch=2),
                    cache_sharding=cache_sharding)
    out = []
    engine.submit(Request(prompt, SampleParams(max_new_tokens=16), out.append))
    while not any(isinstance(e, Finish) for e in out): time.sleep(0.01)
    cache_spec = str(engine.state.cache[0].keys.sharding.spec[1]) if cache_sharding else ""
    engine.close()
    return "".join(e.text for e in out if hasattr(e, "text")).split(), cache_spec

sharded, cache_sharding = shard_for_decoding(loaded.params, loaded.config.num_heads)
specs = {str(leaf.sharding.spec) for leaf in jax.tree_util.tree_leaves(sharded)}
prompt = [5, 17, 300, 42, 7, 901]
ids = np.asarray([prompt])
forward = jax.jit(lambda params, ids: logits_fn(params, ids, None, None, None)[0])
full = np.asarray(forward(loaded.params, ids))
split = np.asarray(forward(sharded, ids))
print(json.dumps({
    "specs": sorted(specs),
    "error": float(np.max(np.abs(full - split)) / np.max(np.abs(full))),
    "plain": tokens(loaded.params)[0],
    **dict(zip(["sharded", "cache"], tokens(sharded, cache_sharding))),
}))
"""


def test_sharded_server_engine_equals_unsharded(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    # 8 heads, a 1024 vocabulary and 256 MLP units: each splits over the 8 devices
    hf_codegen(seed=3, vocab_size=1024, n_head=8, rotary_dim=4).save_pretrained(tmp_path / "ckpt")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED, str(tmp_path / "ckpt")], capture_output=True,
        text=True, timeout=300, env=env, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert any("tensor" in spec for spec in report["specs"])  # really split
    assert report["error"] < 1e-4  # the project's fp32 tolerance, relative to max |logit|
    assert report["sharded"] == report["plain"] and len(report["plain"]) == 16
    assert report["cache"] == "tensor"  # the KV cache's heads are split too, after decoding


# ------------------------------------------------------------------------- the REPL


def test_repl_over_the_server(server: str, tmp_path: Path) -> None:
    """`codegen-repl chat --server URL`: a step is generated by the server and run."""
    notebook = tmp_path / "remote.ipynb"
    served = health(server)["served"]
    result = subprocess.run(
        [str(SCRIPT), "chat", "--server", server, "--api-key", KEY, "--yes", "--session",
         str(notebook), "--max-new-tokens", "8", "--no-prefix"],
        input="Print one.\n", capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XDG_DATA_HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback (most recent call last)" not in result.stderr
    assert f"server {server} · context" in result.stdout  # the banner names the server
    assert health(server)["served"] > served
    cells = nbformat.read(notebook, as_version=4).cells
    assert [cell.cell_type for cell in cells] == ["markdown", "code"]
    assert "Print one." in cells[0].source and cells[1].source.strip()
    assert cells[1].source.strip() in result.stdout  # the generated code was shown
    assert cells[1].outputs  # and it ran (the tiny model's code fails: its error is the output)
