"""The `codegen` kernel's life: a bad model, an interrupted generated cell, restart and
shutdown (no child kernel left behind). One kernelspec, whose model does not exist."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient

from tests.core.test_executor import gone
from tests.kernel.conftest import install, kernel_env
from tests.kernel.helpers import kernel, pid_of, run_cell, shell_reply

pytestmark = pytest.mark.slow
NAME = "codegen-lifecycle-test"
CHILD_PID = "%%python\nimport os\nprint(os.getpid())"


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
