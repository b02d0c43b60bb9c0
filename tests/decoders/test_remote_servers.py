"""RemoteDecoder against servers shaped as llama.cpp, vLLM and Ollama document theirs
(fake_servers.py): the context window and token counts from what each offers, real multi-turn
sessions over a real IPython kernel, the REPL in a terminal, and every unreadable answer a
ServerError that names the server and the field (never a KeyError)."""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session
from codegen_repl.decoders.remote import RemoteDecoder
from codegen_repl.errors import ServerError
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.tokenizer import CodeGenTokenizer
from codegen_repl.serve.app import serve_in_thread
from tests.decoders.fake_servers import Kind, Served, fake_app
from tests.terminal import plain, styled

CONTEXT = 512
HUB_ID = "test-org/tiny-codegen"  # in the test's own HF cache, as Ollama's hf.co/... model
STEPS = {
    "Assign 6 to a.": "a = 6",
    "Multiply a by 7 and print it.": "b = a * 7\nprint(b)",
    "Print the type name of b.": "print(type(b).__name__)",
}


def scripted(prompt: str) -> str:
    """The code for the prompt's last step, then what CodeGen's rules must cut off."""
    step = prompt.rstrip("\n").rsplit("\n", 1)[-1].removeprefix("# ")
    return STEPS.get(step, "pass") + "\n\n\n# Another step.\nprint('never shown')\n"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_files: Path) -> CodeGenTokenizer:
    return CodeGenTokenizer.from_dir(tokenizer_files)


@pytest.fixture
def hf_cache(tmp_path: Path, tokenizer_files: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An HF cache holding HUB_ID's tokenizer files (as `hf download` leaves them), offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tokenizer_files, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def serve(kind: Kind, served: Served) -> Iterator[str]:
    with serve_in_thread(fake_app(kind, served)) as url:
        yield url


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    with Executor(ExecutorConfig(cwd=tmp_path)) as running:
        running.start()
        yield running


# ----------------------------------------------------------------------------- one per server

# (kind, served name, Ollama's num_ctx, how tokens are counted, the context found, its source)
SERVERS = {
    "llama.cpp": ("llama.cpp", "codegen-tiny", None, "tokenize", CONTEXT, "/props"),
    "vllm": ("vllm", "Salesforce/codegen-350M-mono", None, "tokenize", CONTEXT, "/v1/models"),
    "ollama-hf": ("ollama", f"hf.co/{HUB_ID}:latest", 384, "tokenizer", 384, "/api/show"),
    "ollama": ("ollama", "codegen:350m-mono", None, "usage", CONTEXT, "/api/show"),
}


@pytest.mark.parametrize("server", list(SERVERS))
def test_a_multi_turn_session_over_each_server(
    server: str, tokenizer: CodeGenTokenizer, hf_cache: Path, tmp_path: Path, executor: Executor
) -> None:
    kind, name, num_ctx, counting, context, source = SERVERS[server]
    served = Served(name, tokenizer, CONTEXT, scripted, num_ctx=num_ctx)
    for url in serve(kind, served):
        decoder = RemoteDecoder(url, model="whatever-the-user-typed")
        session = Session(decoder, executor, tmp_path / "s.ipynb")
        turns = [session.step(step) for step in STEPS]
        assert [t.code for t in turns] == list(STEPS.values())  # cut by CodeGen's rules
        assert [t.status for t in turns] == ["ok"] * 3
        assert turns[1].outputs == [{"output_type": "stream", "name": "stdout", "text": "42\n"}]
        assert turns[2].outputs[0]["text"] == "int\n"
        assert decoder.max_context == context and source in served.paths()
        assert decoder.counting == counting
        program = session.program()
        assert decoder.count_tokens(program) == len(tokenizer.encode(program))
        completions = [body for path, body in served.requests if path == "/v1/completions"]
        assert all(body["model"] == decoder.model for body in completions)
        assert any(body.get("stream") for body in completions)
    saved = nbformat.read(str(tmp_path / "s.ipynb"), as_version=4)
    assert [c.source for c in saved.cells if c.cell_type == "code"] == list(STEPS.values())


def test_llama_cpp_reads_content_and_answers_tokens(tokenizer: CodeGenTokenizer) -> None:
    """The bug this fixes: llama.cpp's /tokenize has no `count` (a KeyError before)."""
    served = Served("codegen-tiny", tokenizer, CONTEXT, scripted)
    for url in serve("llama.cpp", served):
        decoder = RemoteDecoder(url)
        assert decoder.count_tokens("def f(x):\n    return x\n") == len(
            tokenizer.encode("def f(x):\n    return x\n")
        )
        body = next(body for path, body in served.requests if path == "/tokenize")
        assert body["content"] == "def f(x):\n    return x\n"
        texts = decoder.complete("# Assign 6 to a.\n", SampleParams(4, temperature=0.5, n=2))
        asked = [body for path, body in served.requests if path == "/v1/completions"]
        assert [(body["n"], body["seed"]) for body in asked] == [(2, 0), (1, 0), (1, 1)]
        assert texts == ["a = 6", "a = 6"]  # refused n = 2: one request per sample, seed + i
        decoder.complete("# Assign 6 to a.\n", SampleParams(4, n=2))
        asked = [body for path, body in served.requests if path == "/v1/completions"]
        assert [body["n"] for body in asked[3:]] == [1, 1]  # now one at a time at once
        long = "x = 1\n" * 400
        with pytest.raises(ServerError, match="exceeds the available context size"):
            list(decoder.generate(long, SampleParams(8)))


def test_vllm_errors_and_n_samples(tokenizer: CodeGenTokenizer) -> None:
    served = Served("Salesforce/codegen-350M-mono", tokenizer, CONTEXT, scripted)
    for url in serve("vllm", served):
        decoder = RemoteDecoder(f"{url}/v1")
        texts = decoder.complete("# Assign 6 to a.\n", SampleParams(16, temperature=0.5, n=3))
        assert len(texts) == 3 and texts[0].startswith("a = 6\n") and len(set(texts)) == 1
        long = "x = 1\n" * 200
        assert decoder.count_tokens(long) == len(tokenizer.encode(long))  # /tokenize: no limit
        with pytest.raises(ServerError, match="maximum context length is 512 tokens"):
            decoder.complete(long, SampleParams(8))


def test_counting_by_usage_when_a_long_prompt_is_refused(tokenizer: CodeGenTokenizer) -> None:
    """Without /tokenize, a text the server refuses as too long counts as one over the window."""
    app = fake_app("vllm", Served("m", tokenizer, CONTEXT, scripted))
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/tokenize"]
    with serve_in_thread(app) as url:
        decoder = RemoteDecoder(url)
        assert decoder.count_tokens("x = 1\n") == len(tokenizer.encode("x = 1\n"))
        assert decoder.counting == "usage"
        assert decoder.count_tokens("x = 1\n" * 300) == CONTEXT + 1


# ----------------------------------------------------------------------------- no context reported


def test_a_server_that_reports_no_context_asks_for_it(tokenizer: CodeGenTokenizer) -> None:
    served = Served("m", tokenizer, CONTEXT, scripted)
    app = fake_app("vllm", served)
    models = Route("/v1/models", lambda _: JSONResponse({"data": [{"id": "m"}]}))
    page = Route("/props", lambda _: HTMLResponse("<html>a web UI</html>"))  # not an answer
    app.router.routes = [models, page, *[r for r in app.router.routes if r.path != "/v1/models"]]
    with serve_in_thread(app) as url:
        with pytest.raises(ServerError, match=r"does not report its context window.*--context"):
            _ = RemoteDecoder(url).max_context
        given = RemoteDecoder(url, context_window=1024)
        assert given.max_context == 1024
        rules = SampleParams(8, codegen_rules=True)
        assert "".join(given.generate("# Assign 6 to a.\n", rules)) == "a = 6"
    with pytest.raises(ServerError, match="--context must be at least 2"):
        RemoteDecoder("http://127.0.0.1:1", context_window=0)


# ----------------------------------------------------------------------------- unreadable answers


def broken_server(**answers: object) -> Starlette:
    """A server whose endpoints answer `answers[name]` (a JSON body, or SSE lines for
    `stream`): each test breaks one field."""
    base = {
        "models": {"data": [{"id": "m", "max_model_len": 64}]},
        "tokenize": {"count": 3},
        "completion": {"choices": [{"index": 0, "text": "x"}], "usage": {"prompt_tokens": 2}},
        "stream": ['data: {"choices": [{"index": 0, "text": "x"}]}', "data: [DONE]"],
    } | answers

    async def completions(request) -> Response:
        body = await request.json()
        if body.get("stream"):
            lines = "".join(f"{line}\n\n" for line in base["stream"])  # type: ignore[union-attr]
            return StreamingResponse(iter([lines]), media_type="text/event-stream")
        return JSONResponse(base["completion"])

    async def tokenize(request) -> Response:
        return JSONResponse(base["tokenize"])

    return Starlette(routes=[
        Route("/v1/models", lambda _: JSONResponse(base["models"])),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ])  # fmt: skip


BROKEN = [
    ({"models": {"data": "m"}}, "max_context", r"/v1/models without a readable `data`"),
    ({"models": {"data": [{"id": "m", "max_model_len": "big"}]}}, "max_context",
     r"/v1/models without a readable `data\[\]\.max_model_len`"),
    ({"models": {"object": "list"}}, "max_context", r"/v1/models without a readable `data`"),
    ({"models": [1, 2]}, "max_context", r"unexpected answer to /v1/models"),
    ({"tokenize": {"count": "three"}}, "count", r"/tokenize without a readable `count`"),
    ({"tokenize": {"tokens": 3}}, "count", r"/tokenize without a readable `tokens`"),
    ({"tokenize": {}}, "count", r"/tokenize without a readable `tokens`"),
    ({"completion": {"choices": [{"text": 5}]}}, "complete", r"readable `choices\[\]\.text`"),
    ({"completion": {"choices": "x"}}, "complete", r"/v1/completions without a readable `choices`"),
    ({"completion": {"choices": [{"index": "0"}]}}, "complete", r"`choices\[\]\.index`"),
    ({"stream": ['data: {"choices": [{"text": 1}]}']}, "generate", r"`choices\[\]\.text`"),
    ({"stream": ["data: [1]"]}, "generate", r"sent a bad event"),
    ({"stream": ["data: {not json"]}, "generate", r"sent a bad event"),
    ({"stream": ['data: {"choices": 1}']}, "generate", r"\(stream\) without a readable `choices`"),
    ({"stream": ['data: {"error": {"message": "out of memory"}}']}, "generate", "out of memory"),
    ({"stream": ['data: {"object": "error", "message": "dead"}']}, "generate", "failed: dead"),
]  # fmt: skip


@pytest.mark.parametrize(("answers", "call", "message"), BROKEN)
def test_an_unreadable_answer_names_the_server_and_the_field(
    answers: dict, call: str, message: str
) -> None:
    with serve_in_thread(broken_server(**answers)) as url:
        decoder = RemoteDecoder(url)
        calls = {
            "max_context": lambda: decoder.max_context,
            "count": lambda: decoder.count_tokens("abc"),
            "complete": lambda: decoder.complete("abc", SampleParams(4)),
            "generate": lambda: list(decoder.generate("abc", SampleParams(4))),
        }
        with pytest.raises(ServerError, match=message) as caught:
            calls[call]()
        assert url in str(caught.value)


def test_usage_without_prompt_tokens_is_a_server_error() -> None:
    app = broken_server(completion={"choices": [{"text": "x"}], "usage": {}})
    app.router.routes = [r for r in app.router.routes if r.path != "/tokenize"]
    with serve_in_thread(app) as url, pytest.raises(ServerError, match=r"`usage\.prompt_tokens`"):
        RemoteDecoder(url).count_tokens("abc")


# ----------------------------------------------------------------------------- the REPL


pexpect = pytest.importorskip("pexpect", reason="pexpect is in the test extra")
SCRIPT = str(Path(sys.executable).with_name("codegen-repl"))


def spawn_chat(url: str, tmp_path: Path, *options: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "xterm", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
           "CODEGEN_REPL_DATA": str(tmp_path / "data"),
           "CODEGEN_REPL_CACHE": str(tmp_path / "cache")}  # fmt: skip
    args = ["chat", "--server", url, "--session", str(tmp_path / "s.ipynb"), "--yes", *options]
    return pexpect.spawn(SCRIPT, args, cwd=str(tmp_path), env=env, encoding="utf-8",
                         dimensions=(40, 120), timeout=120)  # fmt: skip


def leave(child: pexpect.spawn) -> None:
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "internal error" not in plain(child.before or "")


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_the_repl_over_a_llama_cpp_server(tokenizer: CodeGenTokenizer, tmp_path: Path) -> None:
    served = Served("codegen-tiny", tokenizer, CONTEXT, scripted)
    for url in serve("llama.cpp", served):
        child = spawn_chat(url, tmp_path)
        try:
            child.expect("Ctrl-D leaves")
            child.sendline("Assign 6 to a.")
            child.expect(">>>")
            child.sendline("Multiply a by 7 and print it.")
            child.expect(styled("\n42\r\n"))
            child.sendline("/context")
            child.expect(r"\d+ tokens of 512")
            leave(child)
        finally:
            child.close(force=True)
    assert "/tokenize" in served.paths() and "/props" in served.paths()


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_the_repl_asks_for_the_context_a_server_does_not_report(
    tokenizer: CodeGenTokenizer, tmp_path: Path
) -> None:
    app = fake_app("vllm", Served("m", tokenizer, CONTEXT, scripted))
    models = Route("/v1/models", lambda _: JSONResponse({"data": [{"id": "m"}]}))
    app.router.routes = [models, *[r for r in app.router.routes if r.path != "/v1/models"]]
    with serve_in_thread(app) as url:
        child = spawn_chat(url, tmp_path)
        try:
            child.expect(r"does not report its context window")
            child.expect(r"--context\s+TOKENS")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        assert child.exitstatus != 0
        child = spawn_chat(url, tmp_path, "--context", "300")
        try:
            child.expect("context 300 tokens")
            child.sendline("Assign 6 to a.")
            child.expect(">>>")
            child.sendline("/context")
            child.expect(r"\d+ tokens of 300")
            leave(child)
        finally:
            child.close(force=True)


# ----------------------------------------------------------------------------- the kernel


def test_the_kernel_over_an_ollama_server(tokenizer: CodeGenTokenizer, tmp_path: Path) -> None:
    """The `codegen` kernel (a real kernelspec, started by jupyter_client) with `--server` and
    its `context` option, against Ollama's shape."""
    from codegen_repl.kernel.install import KernelInstall, install_kernel
    from tests.kernel.conftest import kernel_env
    from tests.kernel.helpers import kernel, run_cell

    served = Served("codegen:350m-mono", tokenizer, CONTEXT, scripted)
    for url in serve("ollama", served):
        prefix, name = tmp_path / "jupyter", "codegen-remote-test"
        install_kernel(KernelInstall(name=name, place="prefix", prefix=prefix, server=url))
        with (
            kernel_env(prefix / "share" / "jupyter"),
            kernel(name, tmp_path, ["--CodeGenKernel.context_window=300"]) as (_, client),
        ):
            first = run_cell(client, "Assign 6 to a.")
            second = run_cell(client, "Multiply a by 7 and print it.")
            context = run_cell(client, "%context")
        assert first.status == second.status == "ok", (first, second)
        assert "42\n" in second.stdout()
        shown = " ".join(str(c.get("data", c.get("text", ""))) for c in context.of(
            "stream", "display_data", "execute_result"))  # fmt: skip
        assert re.search(r"\d+ tokens of 300", shown), shown
    assert "/api/show" not in served.paths()  # the option's window, not the server's
    assert served.paths().count("/v1/completions") >= 2
