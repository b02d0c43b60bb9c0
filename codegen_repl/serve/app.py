"""The decoder server: OpenAI-compatible completions over one CodeGen model (starlette + uvicorn).

Routes: `POST /v1/completions` (streamed as server-sent events with `stream: true`),
`GET /v1/models` (with the context length as `max_model_len`), `POST /tokenize` (vLLM's
extension: token ids and count) and `GET /health` (no key needed; 503 while the model loads).
The model loads on a background thread after the port is bound; the `Engine` (batching.py) owns
the device and decodes all requests in slots. Every error is answered in OpenAI's format and
the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from codegen_repl.errors import ConfigError, ServerError
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.serve.engine import Delta, Engine, EngineConfig, Event, Failed, Finish, QueueFull
from codegen_repl.serve.engine import Request as EngineRequest

log = logging.getLogger("codegen_repl.serve.app")
MAX_STOP = 16  # stop strings per request
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Args:
    model: a checkpoint folder or hub id; also the name the server answers to.
    host, port: where to listen; a host other than loopback needs an api_key.
    api_key: the key clients send as `Authorization: Bearer KEY` (None: no key).
    max_body_bytes: larger request bodies get 413.
    engine: batching limits (max_batch, max_concurrency).
    dtype: parameter dtype (None: fp32 on CPU, bf16 on GPU/TPU); int8: weight-only int8.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    dtype: str | None = None
    int8: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.api_key and not is_loopback(self.host):
            raise ConfigError(
                f"refusing to listen on {self.host} without an API key: anyone who can reach "
                "it could use the model; pass --api-key KEY or set CODEGEN_API_KEY (or listen "
                "on 127.0.0.1 and connect through an SSH tunnel)"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ApiError(Exception):
    """An error answered in OpenAI's format: {"error": {message, type, param, code}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------- request parsing


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    prompts: list[list[int]]  # token ids of each prompt
    sample: SampleParams
    stream: bool
    include_usage: bool


def parse_completion(body: object, engine: Engine) -> CompletionRequest:
    """Validate a /v1/completions body (OpenAI's fields, plus top_k and codegen_truncation)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _refuse_unsupported(body)
    prompts = [_prompt_ids(p, engine) for p in _prompt_list(body.get("prompt"))]
    vocab = engine.config.vocab_size
    max_tokens = _integer(body, "max_tokens", 16, 1, engine.max_context)
    sample = SampleParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
        top_k=max(0, _integer(body, "top_k", 0, -1, vocab)),  # -1 is off, as in vLLM
        n=_integer(body, "n", 1, 1, engine.settings.max_batch),
        seed=_integer(body, "seed", secrets.randbelow(MAX_SEED), 0, MAX_SEED),
        stop=_stop(body.get("stop")),
        codegen_rules=_flag(body, "codegen_truncation"),
    )
    for ids in prompts:
        _check_fits(len(ids), max_tokens, engine.max_context)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = _flag(options, "include_usage")
    return CompletionRequest(prompts, sample, _flag(body, "stream"), include_usage)


def _refuse_unsupported(body: dict) -> None:
    """Fields we accept only at their neutral values (never silently ignore a wish)."""
    neutral: dict[str, tuple[object, ...]] = {
        "echo": (None, False),
        "logprobs": (None,),
        "suffix": (None, ""),
        "presence_penalty": (None, 0, 0.0),
        "frequency_penalty": (None, 0, 0.0),
        "logit_bias": (None, {}),
    }
    for name, allowed in neutral.items():
        if name in body and body[name] not in allowed:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError(400, "best_of is not supported by this server; leave it out", "best_of")


def _prompt_list(prompt: object) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]  # type: ignore[list-item]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or _is_ids(p) for p in prompt)
    ):
        return prompt
    raise ApiError(
        400, "prompt must be a string, a list of token ids, or a non-empty list of those", "prompt"
    )


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value) and bool(value)


def _prompt_ids(prompt: str | list[int], engine: Engine) -> list[int]:
    if isinstance(prompt, str):
        ids = engine.tokenizer.encode(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty; give at least one token of context", "prompt")
        return ids
    vocab = engine.config.vocab_size
    bad = [x for x in prompt if not 0 <= x < vocab]
    if bad:
        raise ApiError(
            400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt"
        )
    return prompt


def _check_fits(prompt_tokens: int, max_tokens: int, context: int) -> None:
    over = prompt_tokens + max_tokens - context
    if over > 0:
        raise ApiError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {context} tokens by {over}; shorten the prompt or lower "
            "max_tokens",
            "prompt",
            "context_length_exceeded",
        )


def _integer(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is not int:
        raise ApiError(400, f"{name} must be an integer, got {json.dumps(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be in {low}..{high}, got {value}", name)
    return value


def _number(
    body: dict, name: str, default: float, low: float, high: float, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)}", name)
    if not (low < value if open_low else low <= value) or value > high:
        bounds = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise ApiError(400, f"{name} must be in {bounds}, got {value}", name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {json.dumps(value)}", name)
    return value


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    return tuple(stops)


# ------------------------------------------------------------------------- the app


@dataclasses.dataclass
class _State:
    name: str
    api_key: str | None
    max_body_bytes: int
    engine: Engine | None = None
    load_error: str | None = None


def create_app(
    name: str,
    loader: Callable[[], Engine],
    api_key: str | None = None,
    max_body_bytes: int = 1 << 20,
    on_load_error: Callable[[str], None] | None = None,
) -> Starlette:
    """The server app; `loader` builds the engine on a background thread at start-up (the
    routes answer 503 until it returns; if it fails, they say why)."""
    state = _State(name, api_key, max_body_bytes)

    def load() -> None:
        try:
            state.engine = loader()
        except Exception as error:  # any load failure is shown to clients
            state.load_error = f"{type(error).__name__}: {error}"
            log.error("the model failed to load: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(state.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        threading.Thread(target=load, name="codegen-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.close()

    routes = [
        Route("/health", _route(state, _health, auth=False), methods=["GET"]),
        Route("/v1/models", _route(state, _models), methods=["GET"]),
        Route("/tokenize", _route(state, _tokenize), methods=["POST"]),
        Route("/v1/completions", _route(state, _completions), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.server = state
    return app


Handler = Callable[[_State, HttpRequest], Any]


def _route(state: _State, handler: Handler, auth: bool = True) -> Callable:
    async def endpoint(request: HttpRequest) -> Response:
        try:
            if auth:
                _check_key(state, request)
            return await handler(state, request)
        except ApiError as error:
            return error.response()

    return endpoint


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"
    ).response()


async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
    log.exception("internal error", exc_info=exc)
    return ApiError(500, f"internal server error: {type(exc).__name__}: {exc}").response()


def _check_key(state: _State, request: HttpRequest) -> None:
    if not state.api_key:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), state.api_key.encode()):
        what = "a wrong API key" if given else "no API key"
        raise ApiError(
            401,
            f"{what}: send 'Authorization: Bearer KEY' with the key the server was started with "
            "(codegen-repl: --api-key KEY or CODEGEN_API_KEY)",
            code="invalid_api_key",
        )


def _engine(state: _State) -> Engine:
    if state.engine is not None:
        return state.engine
    if state.load_error is not None:
        raise ApiError(503, f"the model failed to load: {state.load_error}", code="model_failed")
    raise ApiError(503, "the model is still loading; try again shortly", code="model_loading")


async def _health(state: _State, request: HttpRequest) -> Response:
    if state.engine is None:
        status = "loading" if state.load_error is None else f"failed: {state.load_error}"
        return JSONResponse({"status": status}, status_code=503)
    engine = state.engine
    return JSONResponse(
        {
            "status": "ok",
            "model": state.name,
            "slots": {"total": engine.settings.max_batch, "busy": engine.busy_slots()},
            "in_flight": engine.in_flight(),
            **engine.stats,
        }
    )


async def _models(state: _State, request: HttpRequest) -> Response:
    engine = _engine(state)
    entry = {
        "id": state.name,
        "object": "model",
        "created": 0,
        "owned_by": "codegen-repl",
        "max_model_len": engine.max_context,
    }
    return JSONResponse({"object": "list", "data": [entry]})


async def _tokenize(state: _State, request: HttpRequest) -> Response:
    engine = _engine(state)
    body = await _read_json(state, request)
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, str):
        raise ApiError(400, "tokenize needs {'prompt': STRING}", "prompt")
    ids = engine.tokenizer.encode(prompt)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": engine.max_context})


async def _read_json(state: _State, request: HttpRequest) -> object:
    """The body as JSON; 413 past the size limit (checked while reading, not only the header)."""
    limit = state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}") from None


# ------------------------------------------------------------------------- completions


class _Job:
    """The engine requests of one HTTP request (one per prompt) and their events."""

    def __init__(self, parsed: CompletionRequest, engine: Engine) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.n = parsed.sample.n
        self.prompt_tokens = sum(len(ids) for ids in parsed.prompts)
        self.completion_tokens = 0
        self.open = len(parsed.prompts) * self.n  # choices not finished yet
        self.requests = [
            EngineRequest(ids, parsed.sample, self._emitter(loop, k))
            for k, ids in enumerate(parsed.prompts)
        ]

    def _emitter(self, loop: asyncio.AbstractEventLoop, k: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:  # on the engine thread
            loop.call_soon_threadsafe(self.queue.put_nowait, (k, event))

        return emit

    def submit(self, engine: Engine) -> None:
        try:
            for request in self.requests:
                engine.submit(request)
        except QueueFull:
            self.cancel()
            raise ApiError(
                429, "the server is busy (its queue is full); retry shortly", code="queue_full"
            ) from None

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def choices(self) -> AsyncIterator[dict[str, Any]]:
        """Choice updates ({index, text, finish_reason}) until every choice has finished."""
        while self.open:
            k, event = await self.queue.get()
            if isinstance(event, Failed):
                raise ApiError(500, event.message, code="decoder_failed")
            index = k * self.n + event.index
            if isinstance(event, Delta):
                yield {"index": index, "text": event.text, "logprobs": None, "finish_reason": None}
            elif isinstance(event, Finish):
                self.open -= 1
                self.completion_tokens += event.tokens
                yield {"index": index, "text": "", "logprobs": None, "finish_reason": event.reason}

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


async def _completions(state: _State, request: HttpRequest) -> Response:
    engine = _engine(state)
    parsed = parse_completion(await _read_json(state, request), engine)
    job = _Job(parsed, engine)
    job.submit(engine)
    envelope = {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.name,
    }
    if parsed.stream:
        from sse_starlette.sse import EventSourceResponse

        return EventSourceResponse(_stream(job, envelope, parsed.include_usage), ping=15)
    return await _collect(job, envelope, request)


async def _stream(
    job: _Job, envelope: dict[str, Any], include_usage: bool
) -> AsyncIterator[dict[str, str]]:
    """SSE data lines: one chunk per text piece or finish, [DONE] last. A client that goes
    away cancels this generator, and `finally` frees its slots."""
    try:
        async for choice in job.choices():
            yield {"data": json.dumps({**envelope, "choices": [choice]})}
        if include_usage:
            yield {"data": json.dumps({**envelope, "choices": [], "usage": job.usage()})}
        yield {"data": "[DONE]"}
    except ApiError as error:
        yield {"data": json.dumps(error.body())}
    finally:
        job.cancel()


async def _collect(job: _Job, envelope: dict[str, Any], request: HttpRequest) -> Response:
    """The whole completion; stop decoding if the client disconnects while it waits."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    watcher = asyncio.create_task(_wait_disconnect(request, job))
    try:
        async for choice in job.choices():
            texts.setdefault(choice["index"], []).append(choice["text"])
            if choice["finish_reason"]:
                reasons[choice["index"]] = choice["finish_reason"]
    finally:
        watcher.cancel()
        job.cancel()
    choices = [
        {"index": i, "text": "".join(texts[i]), "logprobs": None, "finish_reason": reasons.get(i)}
        for i in sorted(texts)
    ]
    return JSONResponse({**envelope, "choices": choices, "usage": job.usage()})


async def _wait_disconnect(request: HttpRequest, job: _Job) -> None:
    """Cancel the job when the client goes away (its samples then finish as cancelled)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    job.cancel()


# ------------------------------------------------------------------------- loading and running


def load_engine(config: ServerConfig) -> Engine:
    """Load the checkpoint, shard it over the local devices when there are several (tensor
    parallel), and start the engine."""
    from codegen_repl.decoders.local import LocalDecoder
    from codegen_repl.userconfig import default_cache_dir

    decoder = LocalDecoder.load(
        config.model, dtype=config.dtype, int8=config.int8,
        compilation_cache=default_cache_dir() / "jax",
    )  # fmt: skip
    params, cache_sharding = shard_over_local_devices(decoder.params, decoder.config.num_heads)
    return Engine(
        decoder.config, params, decoder.tokenizer, decoder.logits_fn, config.engine,
        decoder.dtype, cache_sharding,
    )  # fmt: skip


def shard_over_local_devices(params: Any, num_heads: int) -> tuple[Any, Any]:
    """Tensor-parallel params over all local devices, and the KV cache's sharding (heads
    split the same way as the attention weights); unchanged on one device."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from codegen_repl.model.sharding import TENSOR, make_mesh, shard_params

    if jax.local_device_count() == 1:
        return params, None
    mesh = make_mesh(tensor=-1, devices=jax.local_devices())
    heads = TENSOR if num_heads % mesh.shape[TENSOR] == 0 else None
    return shard_params(params, mesh), NamedSharding(mesh, PartitionSpec(None, heads, None, None))


def make_app(config: ServerConfig, on_load_error: Callable[[str], None] | None = None) -> Starlette:
    def load() -> Engine:
        return load_engine(config)

    return create_app(config.model, load, config.api_key, config.max_body_bytes, on_load_error)


def run_server(config: ServerConfig) -> None:
    """Serve until Ctrl-C (blocking); stop with a ServerError if the model fails to load."""
    import uvicorn

    servers: list[uvicorn.Server] = []
    app = make_app(config, on_load_error=lambda _: setattr(servers[0], "should_exit", True))
    servers.append(
        uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="info"))
    )
    servers[0].run()
    state: _State = app.state.server
    if state.load_error is not None:
        raise ServerError(f"the model failed to load: {state.load_error}")


@contextlib.contextmanager
def serve_in_thread(app: Starlette, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` on a real uvicorn in a thread, on a free port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
