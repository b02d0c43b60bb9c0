"""RemoteDecoder against a real decoder server on 127.0.0.1: the Decoder protocol, errors that
say what to do, retries, and Ctrl-C closing the stream."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from codegen_repl.core.decoding import open_decoder
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.decoders.remote import RemoteDecoder
from codegen_repl.errors import ServerError
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.serve.app import create_app, serve_in_thread
from tests.serve import test_app
from tests.serve.test_app import CONTEXT, KEY, PROMPTS, engine_loader, wait_ready

# The servers of test_app.py (pytest finds fixtures by module-level name).
server_checkpoint, local = test_app.server_checkpoint, test_app.local
server, one_slot = test_app.server, test_app.one_slot


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def test_the_decoder_protocol(server: str, local: LocalDecoder) -> None:
    remote = RemoteDecoder(server, api_key=KEY, model="anything")
    assert remote.max_context == CONTEXT and remote.model == "tiny"
    assert remote.count_tokens(PROMPTS[0]) == local.count_tokens(PROMPTS[0])
    greedy = SampleParams(max_new_tokens=20)
    pieces = list(remote.generate(PROMPTS[0], greedy))
    assert len(pieces) > 1 and "".join(pieces) == local.complete(PROMPTS[0], greedy)[0]
    sampled = SampleParams(max_new_tokens=16, temperature=0.7, n=2, seed=4)
    texts = remote.complete(PROMPTS[1], sampled)
    assert len(texts) == 2 and texts[0] != texts[1]
    assert texts == remote.complete(PROMPTS[1], sampled)  # same seed, same samples
    rules = SampleParams(max_new_tokens=40, codegen_rules=True)
    assert "".join(remote.generate(PROMPTS[2], rules)) == local.complete(PROMPTS[2], rules)[0]


def test_open_decoder_with_a_server_and_the_env_key(
    server: str, local: LocalDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEGEN_API_KEY", KEY)
    decoder = open_decoder("Salesforce/codegen-350M-mono", server=f"{server}/v1")
    assert isinstance(decoder, RemoteDecoder)
    assert decoder.complete(PROMPTS[3], SampleParams(8)) == local.complete(
        PROMPTS[3], SampleParams(8)
    )


def test_wrong_key_says_how_to_pass_one(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODEGEN_API_KEY", raising=False)
    for key in (None, "wrong"):
        remote = RemoteDecoder(server, api_key=key)
        with pytest.raises(
            ServerError, match=r"refused the API key.*--api-key KEY.*CODEGEN_API_KEY"
        ):
            list(remote.generate("x", SampleParams(4)))


def test_server_errors_are_shown(server: str, local: LocalDecoder) -> None:
    remote = RemoteDecoder(server, api_key=KEY)
    long = "x = 1\n" * 200
    with pytest.raises(ServerError, match="exceeds the model's context of 512 tokens by"):
        remote.complete(long, SampleParams(max_new_tokens=200))


def test_unreachable_after_retries(tmp_path: Path) -> None:
    with socket_without_listener() as port:
        remote = RemoteDecoder(f"http://127.0.0.1:{port}", retries=2, backoff=0.05)
        started = time.monotonic()
        with pytest.raises(ServerError, match=r"not available after 3 tries.*codegen-repl serve"):
            remote.count_tokens("x")
        assert time.monotonic() - started >= 0.05 + 0.1  # it waited between the tries
    with pytest.raises(ServerError, match="must start with http"):
        RemoteDecoder("127.0.0.1:8000")


class socket_without_listener:
    """A port that was just free: connecting to it is refused."""

    def __enter__(self) -> int:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


def test_retries_while_the_model_loads(local: LocalDecoder) -> None:
    release = threading.Event()
    load = engine_loader(local, max_batch=2)

    def slow_load():
        assert release.wait(60)
        return load()

    with serve_in_thread(create_app("tiny", slow_load)) as url:
        threading.Timer(0.3, release.set).start()
        remote = RemoteDecoder(url, retries=8, backoff=0.1)
        assert remote.max_context == CONTEXT  # the 503s were retried until it was ready


def test_ctrl_c_closes_the_stream_and_frees_the_slot(one_slot: str) -> None:
    # one slot, on a slow device: the stream is still running when it is cut
    remote = RemoteDecoder(one_slot, api_key=KEY)
    before = health(one_slot)["cancelled"]
    stream = remote.generate(PROMPTS[4], SampleParams(max_new_tokens=480))
    assert next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)  # as if Ctrl-C arrived while reading
    deadline = time.monotonic() + 30
    while health(one_slot)["cancelled"] == before or health(one_slot)["slots"]["busy"]:
        assert time.monotonic() < deadline, "the server kept decoding a cancelled stream"
        time.sleep(0.02)
    assert "".join(remote.generate(PROMPTS[5], SampleParams(4)))  # and it goes on


def test_count_tokens_without_a_tokenize_endpoint(local: LocalDecoder) -> None:
    app = create_app("tiny", engine_loader(local, max_batch=2))
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/tokenize"]
    with serve_in_thread(app) as url:
        wait_ready(url)
        remote = RemoteDecoder(url)
        assert remote.count_tokens(PROMPTS[6]) == local.count_tokens(PROMPTS[6])
