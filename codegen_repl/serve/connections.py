"""Connection-level limits of the server, enforced in uvicorn's HTTP protocol, before any request
reaches the app (so before the API key check): a cap on open connections and a deadline for
receiving each request.

uvicorn alone holds a connection that never finishes sending its headers forever (its
keep-alive timer only runs between requests), and its `limit_concurrency` answers 503 only once
a request's headers have arrived, counting the held connections too. Here:

- a connection beyond `max_connections` open ones is closed at once, unanswered;
- each request (headers and body) must arrive within `request_timeout_s` of the connection's
  opening or of the previous response; otherwise the connection is closed (a request whose
  body stalls then sees the client as gone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from codegen_repl.errors import ConfigError

log = logging.getLogger("codegen_repl.serve.connections")
_RESERVED_FILES = 64  # descriptors kept for the model, logs and the engine, beyond connections


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """Args:
    request_timeout_s: seconds a client has to send a whole request (headers and body).
    max_connections: open connections at most; more are closed on arrival. Never more than the
        process's open-file limit allows (less `_RESERVED_FILES`), so the server keeps room to
        open files and answer /health.
    """

    request_timeout_s: float = 15.0
    max_connections: int = 512

    def __post_init__(self) -> None:
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections must be >= 1, got {self.max_connections}")

    def effective_max_connections(self) -> int:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft - _RESERVED_FILES))


class _GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the connection cap and the request deadline."""

    limits: ConnectionLimits = ConnectionLimits()
    cap: int = ConnectionLimits().max_connections
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.cap:
            log.warning("refused a connection: %d are open (the cap)", self.cap)
            transport.abort()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.request_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.abort()


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(app, http=...)`)."""
    attributes = {"limits": limits, "cap": limits.effective_max_connections()}
    return type("GuardedH11Protocol", (_GuardedProtocol,), attributes)
