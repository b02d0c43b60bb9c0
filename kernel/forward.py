"""Completion, inspection and is-complete requests, forwarded to the child kernel.

The child (the Executor's IPython kernel) is asked through a client of our own, with its own
sockets, so its replies never mix with the Executor's. The child answers only between cells (the
kernel does not ask while one runs) and every request has a timeout, so a frontend never hangs.
Not thread-safe: the kernel calls it from one thread.
"""

from __future__ import annotations

import time
from queue import Empty
from typing import Any

from jupyter_client.blocking import BlockingKernelClient

from codegen_repl.core.executor import Executor

REQUEST_TIMEOUT_S = 15.0  # IPython's first completion imports jedi: seconds on a busy CPU


class ChildRequests:
    """A shell-channel client of the Executor's current kernel (reconnected after restarts)."""

    def __init__(self, executor: Executor, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.executor, self.timeout = executor, timeout
        self._client: BlockingKernelClient | None = None
        self._info: dict[str, Any] | None = None

    def complete(self, code: str, cursor_pos: int) -> dict[str, Any] | None:
        return self._ask("complete", code=code, cursor_pos=cursor_pos)

    def inspect(self, code: str, cursor_pos: int, detail_level: int) -> dict[str, Any] | None:
        return self._ask("inspect", code=code, cursor_pos=cursor_pos, detail_level=detail_level)

    def is_complete(self, code: str) -> dict[str, Any] | None:
        return self._ask("is_complete", code=code)

    def close(self) -> None:
        if self._client is not None:
            self._client.stop_channels()
        self._client = self._info = None

    def _ask(self, request: str, **content: Any) -> dict[str, Any] | None:
        """The reply's content, or None when no kernel runs or it did not answer in time."""
        client = self._connected()
        if client is None:
            return None
        msg_id = getattr(client, request)(**content)
        deadline = time.monotonic() + self.timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = client.get_shell_msg(timeout=remaining)
            except Empty:
                break
            if reply["parent_header"].get("msg_id") == msg_id:
                return dict(reply["content"])
        return None  # the late reply is skipped by the msg_id check of the next request

    def _connected(self) -> BlockingKernelClient | None:
        info = self.executor.connection_info
        if info != self._info:
            self.close()
            if info is not None:
                client = BlockingKernelClient()
                client.load_connection_info(info)  # type: ignore[arg-type]
                client.start_channels(shell=True, iopub=False, stdin=False, hb=False,
                                      control=False)  # fmt: skip
                self._client, self._info = client, info
        return self._client
