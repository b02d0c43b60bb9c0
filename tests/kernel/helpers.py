"""Driving real kernels through jupyter_client: run a cell, collect what it sent."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

CELL_TIMEOUT_S = 120.0  # generous: a loaded 2-core machine, JAX compiling on first use


@dataclasses.dataclass
class Ran:
    """One cell's execute_reply content and its IOPub messages (status and input left out)."""

    reply: dict[str, Any]
    messages: list[dict[str, Any]]

    @property
    def status(self) -> str:
        return self.reply["status"]

    def of(self, *kinds: str) -> list[dict[str, Any]]:
        return [m["content"] for m in self.messages if m["msg_type"] in kinds]

    def stdout(self) -> str:
        return "".join(c["text"] for c in self.of("stream") if c["name"] == "stdout")

    def stderr(self) -> str:
        return "".join(c["text"] for c in self.of("stream") if c["name"] == "stderr")

    def results(self) -> list[str]:
        return [c["data"]["text/plain"] for c in self.of("execute_result")]


def run_cell(
    client: BlockingKernelClient,
    code: str,
    timeout: float = CELL_TIMEOUT_S,
    cell_id: object = None,
) -> Ran:
    """Execute `code` and wait for its reply and for the kernel to go idle; with `cell_id`, the
    request's metadata carries it as JupyterLab sends it (`metadata.cellId`)."""
    if cell_id is None:
        msg_id = client.execute(code, allow_stdin=False)
    else:
        msg_id = send(client, code, cell_id)
    return collect(client, msg_id, timeout)


def send(client: BlockingKernelClient, code: str, cell_id: object) -> str:
    """Send an execute request as JupyterLab does (`metadata.cellId`), without waiting;
    returns its msg_id."""
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}  # fmt: skip
    msg = client.session.msg("execute_request", content, metadata={"cellId": cell_id})
    client.shell_channel.send(msg)
    return msg["header"]["msg_id"]


def collect(client: BlockingKernelClient, msg_id: str, timeout: float) -> Ran:
    """The IOPub messages of request `msg_id` until the kernel goes idle, and its reply."""
    deadline = time.monotonic() + timeout
    messages = []
    while True:
        msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "status" and msg["content"]["execution_state"] == "idle":
            return Ran(shell_reply(client, msg_id, deadline - time.monotonic()), messages)
        if kind not in ("status", "execute_input"):
            messages.append(msg)


def shell_reply(client: BlockingKernelClient, msg_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + max(timeout, 5.0)
    while True:
        reply = client.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


def drain(client: BlockingKernelClient) -> None:
    for get in (client.get_iopub_msg, client.get_shell_msg):
        with contextlib.suppress(Empty):
            while True:
                get(timeout=0.2)


@contextlib.contextmanager
def kernel(
    name: str, cwd: Path, extra_arguments: list[str] | None = None
) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A started kernel of kernelspec `name`; always shut down (and its children with it)."""
    manager, client = start_new_kernel(
        kernel_name=name, cwd=str(cwd), extra_arguments=extra_arguments or [], startup_timeout=120
    )
    try:
        yield manager, client
    finally:
        client.stop_channels()
        manager.shutdown_kernel()


def pid_of(client: BlockingKernelClient, code: str) -> int:
    """Run `code` (which prints a pid) and return that pid."""
    ran = run_cell(client, code)
    assert ran.status == "ok", ran
    return int(ran.stdout().strip())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
