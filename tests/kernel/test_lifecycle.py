"""The `codegen` kernel's life: a bad model, an interrupted generated cell, restart and
shutdown (no child kernel left behind). One kernelspec, whose model does not exist."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

from tests.core.test_executor import gone
from tests.kernel.conftest import install, kernel_env
from tests.kernel.helpers import kernel, pid_of, run_cell, shell_reply

pytestmark = pytest.mark.slow
NAME = "codegen-lifecycle-test"
CHILD_PID = "%%python\nimport os\nprint(os.getpid())"
CHILD_SLEEP = (
    "%%python\nimport os, subprocess\nfrom ipykernel.connect import get_connection_file\n"
    "sleep = subprocess.Popen(['sleep', '300'])\n"
    "print(os.getpid(), sleep.pid, get_connection_file())"
)


def wait_for_code(client: BlockingKernelClient, msg_id: str, text: str, timeout: float) -> None:
    """Until the kernel has shown generated code containing `text` (it then runs it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.get_iopub_msg(timeout=deadline - time.monotonic())
        shown = msg["content"].get("data", {}).get("text/plain", "")
        if msg["parent_header"].get("msg_id") == msg_id and text in shown:
            return
    raise AssertionError(f"no code with {text!r} was shown")


def test_bad_model_then_interrupt_restart_and_shutdown(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    data = install(tmp_path / "jupyter", NAME, tmp_path / "no-such-model")
    with kernel_env(data), kernel(NAME, tmp_path) as (manager, client):
        failed = run_cell(client, "say hello")
        assert (failed.status, failed.reply["ename"]) == ("error", "CheckpointError")
        assert "no-such-model" in failed.reply["evalue"] and "%model" in failed.reply["evalue"]
        assert run_cell(client, "%%python\nprint('alive')").stdout() == "alive\n"

        loaded = run_cell(client, f"%model {trained_checkpoint}\n%set temperature=0")
        assert loaded.status == "ok", loaded.reply
        assert run_cell(client, "say hello").stdout() == "hello\n"

        msg_id = client.execute("loop forever")  # generates `while True: pass`, then runs it
        wait_for_code(client, msg_id, "while True", timeout=120)
        time.sleep(1.0)  # let it spin
        manager.interrupt_kernel()
        reply = shell_reply(client, msg_id, timeout=60)
        assert (reply["status"], reply["ename"]) == ("error", "KeyboardInterrupt")
        after = run_cell(client, "%%python\nprint('after')")
        assert after.stdout() == "after\n", after

        child = pid_of(client, CHILD_PID)
        kernel_pid = manager.provisioner.process.pid  # type: ignore[union-attr]
        manager.restart_kernel()
        client.wait_for_ready(timeout=120)
        assert gone(child, 15.0) and gone(kernel_pid, 15.0)
        assert run_cell(client, "%%python\nprint('fresh')").stdout() == "fresh\n"
        child = pid_of(client, CHILD_PID)
    assert gone(child, 15.0)  # shutdown took the child kernel with it


@contextlib.contextmanager
def ended_as_it_may(name: str, cwd: Path) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A started kernel, shut down at the end unless the test has already shut it down."""
    manager, client = start_new_kernel(kernel_name=name, cwd=str(cwd), startup_timeout=120)
    try:
        yield manager, client
    finally:
        client.stop_channels()
        if manager.has_kernel:
            manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("death", ["SIGKILL", "SIGTERM", "restart now", "shutdown now"])
def test_the_child_kernel_dies_with_the_codegen_kernel_however_it_dies(
    tmp_path: Path, death: str
) -> None:
    """The child kernel, what its cells started and its connection file (which holds its key)
    go with the codegen kernel, even when it is killed before it can clean up."""
    data = install(tmp_path / "jupyter", NAME, tmp_path / "no-such-model")
    with kernel_env(data), ended_as_it_may(NAME, tmp_path) as (manager, client):
        ran = run_cell(client, CHILD_SLEEP)
        assert ran.status == "ok", ran.reply
        child, sleep, key_file = ran.stdout().split()
        assert Path(key_file).exists()
        codegen_pid = manager.provisioner.process.pid  # type: ignore[union-attr]
        if death.startswith("SIG"):
            os.kill(codegen_pid, getattr(signal, death))
        elif death == "restart now":
            manager.restart_kernel(now=True)
        else:
            manager.shutdown_kernel(now=True)
        assert gone(codegen_pid, 15.0)
        assert gone(int(child), 5.0) and gone(int(sleep), 5.0)
        assert not Path(key_file).exists()
        if death == "restart now":  # and the restarted kernel has a child of its own
            client.wait_for_ready(timeout=120)
            assert run_cell(client, "%%python\nprint('fresh')").stdout() == "fresh\n"
