"""The server under hostile input, on a real uvicorn on 127.0.0.1: lone surrogates, JSON nested
1,000 deep, more prompts than the server can ever run, connections that never finish their
request, more connections than the cap. Every answer to a client is a 4xx, never a 5xx; the
connection limits act before the API key check."""

from __future__ import annotations

import json
import resource
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.serve.app import create_app, serve_in_thread
from codegen_repl.serve.connections import ConnectionLimits
from codegen_repl.serve.protocol import MAX_JSON_DEPTH
from tests.serve.test_app import (  # noqa: F401 - fixtures
    AUTH,
    KEY,
    SCRIPT,
    engine_loader,
    local,
    server,
    server_checkpoint,
    wait_ready,
)

TIMEOUT_S = 1.0  # the guarded server's request deadline
CAP = 6  # and its connection cap


@pytest.fixture(scope="module")
def guarded(local: LocalDecoder) -> Iterator[str]:  # noqa: F811
    """A server with a short request deadline and a small connection cap (and a key)."""
    app = create_app("tiny", engine_loader(local, max_batch=2), KEY)
    limits = ConnectionLimits(request_timeout_s=TIMEOUT_S, max_connections=CAP)
    with serve_in_thread(app, limits=limits) as url:
        wait_ready(url)
        yield url


def post(url: str, path: str, raw: bytes | str) -> httpx.Response:
    data = raw.encode() if isinstance(raw, str) else raw
    headers = {**AUTH, "Content-Type": "application/json"}
    return httpx.post(f"{url}{path}", content=data, headers=headers, timeout=60)


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


# ----------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_a_lone_surrogate_is_a_400_naming_it(server: str, path: str) -> None:  # noqa: F811
    raw = '{"model": "tiny", "prompt": "def f():\\ud800", "max_tokens": 2}'
    response = post(server, path, raw)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert "lone surrogate (\\ud800) in prompt" in error["message"] and error["param"] == "prompt"
    # a surrogate pair is a character like any other
    pair = '{"model": "tiny", "prompt": "x = \\ud83d\\ude00", "max_tokens": 2}'
    assert post(server, path, pair).status_code == 200


def test_a_lone_surrogate_anywhere_is_a_400(server: str) -> None:  # noqa: F811
    for raw in ('{"prompt": "x", "stop": ["\\udfff"]}', '{"prompt": "x", "\\ud800": 1}'):
        response = post(server, "/v1/completions", raw)
        assert response.status_code == 400 and "lone surrogate" in error_of(response)["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_json_nested_1000_deep_is_a_400(server: str, path: str) -> None:  # noqa: F811
    for depth in (1000, 30_000, MAX_JSON_DEPTH + 1):  # 30,000: under the 64 KiB limit
        raw = '{"prompt": ' + "[" * depth + "]" * depth + "}"
        response = post(server, path, raw)
        assert response.status_code == 400, (depth, response.text)
        assert f"deeper than {MAX_JSON_DEPTH} levels" in error_of(response)["message"]
    assert post(server, "/tokenize", '{"prompt": "x"}').status_code == 200


def test_more_prompts_than_the_server_can_run_is_a_400(server: str) -> None:  # noqa: F811
    body = {"model": "tiny", "prompt": ["x = 1\n"] * 65, "max_tokens": 1}
    response = post(server, "/v1/completions", json.dumps(body))
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["code"] == "too_many_prompts" and "at most 64" in error["message"]
    body["prompt"] = ["x = 1\n"] * 64  # at the limit, on an idle server: served
    response = post(server, "/v1/completions", json.dumps(body))
    assert response.status_code == 200 and len(response.json()["choices"]) == 64


HOSTILE = [
    b"\xff\xfe not utf-8",
    b'{"prompt": "x", "temperature": NaN}',
    b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
    b'{"prompt": [[1, 2], "x", [99999999999999999999]]}',
    b'{"prompt": "x", "stream_options": "\\ud800"}',
    b'{"prompt": "x", "logit_bias": {"\\udc80": 1}}',
    b"[" * 50,
    b'"\\ud800"',
    b"",
]


@pytest.mark.parametrize("path", ["/v1/completions", "/tokenize"])
def test_no_client_input_is_a_5xx(server: str, path: str) -> None:  # noqa: F811
    for raw in HOSTILE:  # /tokenize reads only "prompt": a bad temperature is no error there
        response = post(server, path, raw)
        assert response.status_code < 500, (raw[:60], response.status_code, response.text)
        if path == "/v1/completions" or response.status_code != 200:
            assert response.status_code == 400 and "error" in response.json(), raw[:60]


def test_generate_with_an_invalid_utf8_prompt_is_one_line(tmp_path: object) -> None:
    done = subprocess.run([str(SCRIPT), "generate", b"def f():\xff"], capture_output=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    message = done.stderr.decode()
    assert "Traceback" not in message and message.startswith("error: the prompt is not valid UTF-8")


# ----------------------------------------------------------------------------- connections


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes the connection (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_unfinished_headers_are_cut_off_at_the_deadline(guarded: str) -> None:
    sock = connect(guarded)
    start = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
    assert closed_within(sock, TIMEOUT_S + 5)
    assert TIMEOUT_S - 0.2 <= time.monotonic() - start < TIMEOUT_S + 5
    sock.close()


def test_a_stalled_body_is_cut_off_and_the_server_goes_on(guarded: str) -> None:
    sock = connect(guarded)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    sock.sendall(head.encode() + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')
    assert closed_within(sock, TIMEOUT_S + 5)
    sock.close()
    assert httpx.get(f"{guarded}/health", timeout=10).status_code == 200


def test_an_idle_connection_without_a_request_is_closed(guarded: str) -> None:
    sock = connect(guarded)  # sends nothing at all
    assert closed_within(sock, TIMEOUT_S + 5)
    sock.close()


def test_the_connection_cap_holds_before_the_key_check_and_frees_up(guarded: str) -> None:
    held = [connect(guarded) for _ in range(CAP)]
    for sock in held:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\n")  # no key, and never finished
    time.sleep(0.2)
    extra = connect(guarded)  # one over the cap: closed unanswered, key or not
    assert closed_within(extra, 5)
    extra.close()
    for sock in held:  # the deadline frees the held ones
        assert closed_within(sock, TIMEOUT_S + 5)
        sock.close()
    assert httpx.get(f"{guarded}/health", timeout=10).status_code == 200
    # a keyless request on a free connection is answered by the key check as before
    assert httpx.get(f"{guarded}/v1/models", timeout=10).status_code == 401


def test_the_cap_stays_under_the_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        assert ConnectionLimits(max_connections=512).effective_max_connections() == 256 - 64
        assert ConnectionLimits(max_connections=100).effective_max_connections() == 100
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
