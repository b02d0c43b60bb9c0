"""Servers on 127.0.0.1 shaped as llama.cpp, vLLM and Ollama document their endpoints, for
the RemoteDecoder's tests. Each answers with a scripted completion (so a session's code runs)
cut to `max_tokens` tokens of a real CodeGen tokenizer, and records every request it gets.

What each follows (field names, status codes and error bodies are theirs):
- llama.cpp's llama-server, tools/server/README.md: `POST /tokenize {"content"}` ->
  `{"tokens": [...]}` (no `content`: no tokens); `GET /props` ->
  `{"default_generation_settings": {"n_ctx", ...}, "total_slots", "chat_template"}`;
  `GET /v1/models` -> data[] with `owned_by: "llamacpp"` and a `meta` (`n_ctx_train`, the
  training window, not the server's); `/v1/completions` takes only n = 1 ("Only one completion
  choice is allowed"); errors `{"error": {"code", "message", "type"}}`; other paths 404.
- vLLM's OpenAI-compatible server (vllm/entrypoints/openai/protocol.py): `GET /v1/models` ->
  data[] with `max_model_len`; `POST /tokenize {"model", "prompt", "add_special_tokens"}` ->
  `{"count", "max_model_len", "tokens", "token_strs"}` (unknown fields ignored, as its
  `extra="allow"` models do); a prompt over the window is a 400 "This model's maximum context
  length is ..."; errors `{"object": "error", "message", "type", "param", "code"}`.
- Ollama, docs/openai.md and docs/api.md: `GET /v1/models` -> data[] (`owned_by`), no context;
  `POST /api/show {"model"}` -> `parameters` (text, with `num_ctx` where the Modelfile sets it)
  and `model_info` (`<arch>.context_length`); no /tokenize (Go's `404 page not found`);
  `/v1/completions` ignores `n` and cuts a prompt over num_ctx silently (keeping its end);
  OpenAI-layer errors `{"error": {"message", "type", "param", "code"}}`.
Streams are server-sent events as all three send them: `data: {json}` lines, each followed by a
blank line, the last `data: [DONE]`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from codegen_repl.model.tokenizer import CodeGenTokenizer

Kind = Literal["llama.cpp", "vllm", "ollama"]


@dataclasses.dataclass
class Served:
    """What a fake server runs: a name, a tokenizer, a window and a scripted model.

    reply: the completion of a prompt (before max_tokens and stop cut it).
    num_ctx: Ollama only: the num_ctx its Modelfile sets (None: only model_info's length).
    """

    name: str
    tokenizer: CodeGenTokenizer
    context: int
    reply: Callable[[str], str]
    num_ctx: int | None = None
    requests: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


def fake_app(kind: Kind, served: Served) -> Starlette:
    """The app of a server of `kind` running `served`."""
    routes = {"llama.cpp": _llama_routes, "vllm": _vllm_routes, "ollama": _ollama_routes}[kind]
    missing = {
        "llama.cpp": lambda: PlainTextResponse("File Not Found", 404),
        "vllm": lambda: JSONResponse({"detail": "Not Found"}, 404),
        "ollama": lambda: PlainTextResponse("404 page not found", 404),
    }[kind]

    async def not_found(request: Request, exc: Exception) -> Response:
        served.requests.append((request.url.path, {}))
        return missing()

    return Starlette(routes=routes(served), exception_handlers={404: not_found, 405: not_found})


# ----------------------------------------------------------------------------- completing


@dataclasses.dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    pieces: list[str]  # the text as it streams, one token's text at a time


def complete(served: Served, prompt: str, max_tokens: int, stop: list[str]) -> Completion:
    """The scripted reply cut at `max_tokens` tokens and at the first stop string."""
    ids = served.tokenizer.encode(served.reply(prompt))
    finish = "length" if len(ids) > max_tokens else "stop"
    ids = ids[:max_tokens]
    pieces, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = served.tokenizer.decode(ids[:end])
        if not text.endswith("\ufffd"):
            pieces.append(text[len(shown) :])
            shown = text
    cut = min((shown.find(s) for s in stop if s and s in shown), default=-1)
    if cut >= 0:
        finish, shown, kept, total = "stop", shown[:cut], [], 0
        for piece in pieces:
            if total + len(piece) > cut:
                kept.append(piece[: cut - total])
                break
            kept.append(piece)
            total += len(piece)
        pieces = [p for p in kept if p]
    prompt_tokens = len(served.tokenizer.encode(prompt))
    return Completion(shown, finish, prompt_tokens, len(ids), pieces)


def sse(events: list[dict[str, Any]]) -> StreamingResponse:
    """`data: {json}` + a blank line per event, then `data: [DONE]`."""

    async def lines() -> AsyncIterator[str]:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def stream_chunks(envelope: dict[str, Any], done: Completion, extra: dict[str, Any]) -> list:
    chunks = [
        {**envelope, "choices": [{"text": p, "index": 0, "logprobs": None,
                                  "finish_reason": None, **extra}]}
        for p in done.pieces
    ]  # fmt: skip
    last = {"text": "", "index": 0, "logprobs": None, "finish_reason": done.finish_reason}
    return [*chunks, {**envelope, "choices": [last | extra]}]


def usage(done: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


async def _body(request: Request, served: Served) -> dict[str, Any]:
    body = json.loads(await request.body() or b"{}")
    served.requests.append((request.url.path, body))
    return body


# ----------------------------------------------------------------------------- llama.cpp


def _llama_error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status)


def _llama_routes(served: Served) -> list[Route]:
    path = f"models/{served.name}.gguf"

    async def props(request: Request) -> Response:
        served.requests.append(("/props", {}))
        settings = {"n_ctx": served.context, "model": path, "temperature": 0.8, "top_k": 40}
        return JSONResponse(
            {"default_generation_settings": settings, "total_slots": 1, "chat_template": ""}
        )

    async def models(request: Request) -> Response:
        served.requests.append(("/v1/models", {}))
        meta = {"vocab_type": 2, "n_vocab": served.tokenizer.vocab_size, "n_ctx_train": 2048}
        entry = {"id": path, "object": "model", "created": 0, "owned_by": "llamacpp", "meta": meta}
        return JSONResponse({"object": "list", "data": [entry]})

    async def tokenize(request: Request) -> Response:
        body = await _body(request, served)
        content = body.get("content")
        tokens = served.tokenizer.encode(content) if isinstance(content, str) else []
        return JSONResponse({"tokens": tokens})

    async def completions(request: Request) -> Response:
        body = await _body(request, served)
        if body.get("n", 1) != 1:
            message = "Only one completion choice is allowed"
            return _llama_error(400, message, "invalid_request_error")
        prompt, max_tokens = body.get("prompt"), body.get("max_tokens", 16)
        if len(served.tokenizer.encode(prompt)) + max_tokens > served.context:
            message = "the request exceeds the available context size, try increasing it"
            return _llama_error(400, message, "exceed_context_size_error")
        done = complete(served, prompt, max_tokens, _stops(body))
        envelope = {"created": int(time.time()), "model": path, "system_fingerprint": "b4000",
                    "object": "text_completion", "id": "chatcmpl-fake"}  # fmt: skip
        if body.get("stream"):
            return sse(stream_chunks(envelope, done, {}))
        choice = {"text": done.text, "index": 0, "logprobs": None}
        choice["finish_reason"] = done.finish_reason
        return JSONResponse({**envelope, "choices": [choice], "usage": usage(done)})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return [
        Route("/health", health), Route("/props", props), Route("/v1/models", models),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]  # fmt: skip


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    return [stop] if isinstance(stop, str) else list(stop)


# ----------------------------------------------------------------------------- vLLM


def _vllm_error(status: int, message: str, kind: str) -> JSONResponse:
    error = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return JSONResponse(error, status)


def _vllm_routes(served: Served) -> list[Route]:
    def wrong_model(body: dict[str, Any]) -> JSONResponse | None:
        if body.get("model") not in (None, served.name):
            message = f"The model `{body.get('model')}` does not exist."
            return _vllm_error(404, message, "NotFoundError")
        return None

    async def models(request: Request) -> Response:
        served.requests.append(("/v1/models", {}))
        entry = {"id": served.name, "object": "model", "created": 0, "owned_by": "vllm",
                 "root": served.name, "parent": None, "max_model_len": served.context,
                 "permission": []}  # fmt: skip
        return JSONResponse({"object": "list", "data": [entry]})

    async def tokenize(request: Request) -> Response:
        body = await _body(request, served)
        if not isinstance(body.get("prompt"), str):
            return _vllm_error(400, "prompt: Field required", "BadRequestError")
        if (error := wrong_model(body)) is not None:
            return error
        tokens = served.tokenizer.encode(body["prompt"])
        return JSONResponse({"count": len(tokens), "max_model_len": served.context,
                             "tokens": tokens, "token_strs": None})  # fmt: skip

    async def completions(request: Request) -> Response:
        body = await _body(request, served)
        if (error := wrong_model(body)) is not None:
            return error
        prompt, max_tokens, n = body["prompt"], body.get("max_tokens", 16), body.get("n", 1)
        prompt_tokens = len(served.tokenizer.encode(prompt))
        if prompt_tokens + max_tokens > served.context:
            message = (
                f"This model's maximum context length is {served.context} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or "
                "completion."
            )
            return _vllm_error(400, message, "BadRequestError")
        done = complete(served, prompt, max_tokens, _stops(body))
        envelope = {"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()),
                    "model": served.name}  # fmt: skip
        if body.get("stream"):
            return sse(stream_chunks(envelope, done, {"stop_reason": None}))
        choices = [
            {"index": i, "text": done.text, "logprobs": None,
             "finish_reason": done.finish_reason, "stop_reason": None}
            for i in range(n)
        ]  # fmt: skip
        return JSONResponse({**envelope, "choices": choices, "usage": usage(done)})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    return [
        Route("/health", health), Route("/v1/models", models),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- Ollama


def _ollama_error(status: int, message: str, kind: str) -> JSONResponse:
    error = {"message": message, "type": kind, "param": None, "code": None}
    return JSONResponse({"error": error}, status)


def _ollama_routes(served: Served) -> list[Route]:
    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def models(request: Request) -> Response:
        served.requests.append(("/v1/models", {}))
        entry = {"id": served.name, "object": "model", "created": 0, "owned_by": "library"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def show(request: Request) -> Response:
        body = await _body(request, served)
        if (body.get("model") or body.get("name")) != served.name:
            return JSONResponse({"error": f"model '{body.get('model')}' not found"}, 404)
        parameters = 'stop                           "<|endoftext|>"'
        if served.num_ctx is not None:
            parameters = f"num_ctx                        {served.num_ctx}\n{parameters}"
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": "codegen",
            "families": ["codegen"],
            "parameter_size": "1M",
            "quantization_level": "F16",
        }
        info = {
            "general.architecture": "codegen",
            "general.parameter_count": 1000000,
            "codegen.context_length": served.context,
            "codegen.embedding_length": 64,
        }
        return JSONResponse({
            "modelfile": f"FROM {served.name}\n", "parameters": parameters,
            "template": "{{ .Prompt }}", "details": details, "model_info": info,
            "capabilities": ["completion"], "modified_at": "2026-01-01T00:00:00Z",
        })  # fmt: skip

    async def completions(request: Request) -> Response:
        body = await _body(request, served)
        if body.get("model") != served.name:
            message = f'model "{body.get("model")}" not found, try pulling it first'
            return _ollama_error(404, message, "api_error")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return _ollama_error(400, "invalid prompt: expected a string", "invalid_request_error")
        ids = served.tokenizer.encode(prompt)
        window = served.num_ctx or served.context
        prompt = served.tokenizer.decode(ids[-window:])  # cut silently, as Ollama does
        done = complete(served, prompt, body.get("max_tokens") or 128, _stops(body))
        envelope = {"id": "cmpl-42", "object": "text_completion", "created": int(time.time()),
                    "model": served.name, "system_fingerprint": "fp_ollama"}  # fmt: skip
        if body.get("stream"):
            return sse(stream_chunks(envelope, done, {}))
        choice = {"text": done.text, "index": 0, "finish_reason": done.finish_reason}
        return JSONResponse({**envelope, "choices": [choice], "usage": usage(done)})

    return [
        Route("/", root), Route("/v1/models", models), Route("/api/show", show, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]  # fmt: skip
