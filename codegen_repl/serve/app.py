"""The decoder server: OpenAI-compatible completions over one CodeGen model (starlette + uvicorn).

Routes: `POST /v1/completions` and `POST /v1/chat/completions` (CodeGen's multi-turn format,
chat.py), streamed as server-sent events with `stream: true`,
`GET /v1/models` (with the context length as `max_model_len`), `POST /tokenize` (vLLM's
extension: token ids and count) and `GET /health` (no key needed; 503 while the model loads).
The model loads on a background thread after the port is bound; the `Engine` (engine.py) owns
the device and decodes all requests in slots. Every error is answered in OpenAI's format and
the server goes on serving. Request bodies are checked and errors shaped in `protocol.py`; the
connection cap and the per-request read deadline, which act before any route (and before the
key check), are in `connections.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from codegen_repl.errors import ConfigError, ServerError
from codegen_repl.serve.chat import CHAT, TEXT, Job, Shape, collect, parse_chat, stream_chunks
from codegen_repl.serve.connections import ConnectionLimits, guarded_protocol
from codegen_repl.serve.engine import Engine, EngineConfig
from codegen_repl.serve.protocol import ApiError, CompletionRequest, parse_completion, parse_json

log = logging.getLogger("codegen_repl.serve.app")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Args:
    model: a checkpoint folder or hub id; also the name the server answers to.
    host, port: where to listen; a host other than loopback needs an api_key.
    api_key: the key clients send as `Authorization: Bearer KEY` (None: no key).
    max_body_bytes: larger request bodies get 413.
    engine: batching limits (max_batch, max_concurrency).
    connections: the connection cap and the per-request read deadline (connections.py).
    dtype: parameter dtype (None: fp32 on CPU, bf16 on GPU/TPU); int8: weight-only int8.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    connections: ConnectionLimits = dataclasses.field(default_factory=ConnectionLimits)
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
        Route("/v1/chat/completions", _route(state, _chat_completions), methods=["POST"]),
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
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise ApiError(
                    413, f"the request body is over {limit} bytes", code="request_too_large"
                )
    except ClientDisconnect:  # gone, or cut off by the read deadline: nobody reads the answer
        raise ApiError(400, "the client went away before sending the whole body") from None
    return parse_json(bytes(body))


# ------------------------------------------------------------------------- completions


async def _completions(state: _State, request: HttpRequest) -> Response:
    engine = _engine(state)
    parsed = parse_completion(await _read_json(state, request), engine)
    return await _answer(state, engine, request, parsed, TEXT)


async def _chat_completions(state: _State, request: HttpRequest) -> Response:
    engine = _engine(state)
    parsed = parse_chat(await _read_json(state, request), engine)
    return await _answer(state, engine, request, parsed, CHAT)


async def _answer(
    state: _State, engine: Engine, request: HttpRequest, parsed: CompletionRequest, shape: Shape
) -> Response:
    """Run a checked request; answer it whole or streamed, as `shape` says (chat.py)."""
    job = Job(parsed, engine)
    job.submit(engine)
    envelope = {
        "id": f"{shape.id_prefix}-{secrets.token_hex(12)}",
        "object": shape.object(parsed.stream),
        "created": int(time.time()),
        "model": state.name,
    }
    if parsed.stream:
        from sse_starlette.sse import EventSourceResponse

        chunks = stream_chunks(job, envelope, parsed.include_usage, shape)
        return EventSourceResponse(chunks, ping=15)
    return await collect(job, envelope, request, shape)


# ------------------------------------------------------------------------- loading and running


def load_engine(config: ServerConfig) -> Engine:
    """Load the checkpoint, split over the local devices when there are several (tensor
    parallel, see decoders.local.load_for_decoding), and start the engine."""
    from codegen_repl.decoders.local import load_for_decoding
    from codegen_repl.paths import default_cache_dir

    ready = load_for_decoding(
        config.model, dtype=config.dtype, int8=config.int8,
        compilation_cache=default_cache_dir() / "jax", shard=True,
    )  # fmt: skip
    return Engine(
        ready.config, ready.params, ready.tokenizer, ready.logits_fn, config.engine,
        ready.dtype, ready.cache_sharding,
    )  # fmt: skip


def make_app(config: ServerConfig, on_load_error: Callable[[str], None] | None = None) -> Starlette:
    def load() -> Engine:
        return load_engine(config)

    return create_app(config.model, load, config.api_key, config.max_body_bytes, on_load_error)


def run_server(config: ServerConfig) -> None:
    """Serve until Ctrl-C (blocking); stop with a ServerError if the model fails to load."""
    import uvicorn

    servers: list[uvicorn.Server] = []
    app = make_app(config, on_load_error=lambda _: setattr(servers[0], "should_exit", True))
    protocol = guarded_protocol(config.connections)
    settings = uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info", http=protocol
    )
    servers.append(uvicorn.Server(settings))
    servers[0].run()
    state: _State = app.state.server
    if state.load_error is not None:
        raise ServerError(f"the model failed to load: {state.load_error}")


@contextlib.contextmanager
def serve_in_thread(
    app: Starlette, host: str = "127.0.0.1", limits: ConnectionLimits | None = None
) -> Iterator[str]:
    """Run `app` on a real uvicorn in a thread, on a free port, with the connection `limits`
    (default: ConnectionLimits()); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    protocol = guarded_protocol(limits or ConnectionLimits())
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, http=protocol)
    )
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
