"""The executor against real IPython kernels. Few kernel starts: most tests share one kernel."""

from __future__ import annotations

import _thread
import base64
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from codegen_repl.core import kernel_process
from codegen_repl.core.executor import Executor, ExecutorConfig, RunResult
from codegen_repl.errors import ConfigError, KernelError

SLEEP = "import time\ntime.sleep(30)"


def tiny_png() -> bytes:
    """A valid 1x1 red PNG, built by hand (no PIL)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte, then one red pixel
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def value(result: RunResult) -> str:
    """The text/plain of the cell's execute_result."""
    assert result.status == "ok", result
    (shown,) = [out for out in result.outputs if out["output_type"] == "execute_result"]
    return shown["data"]["text/plain"]


def gone(pid: int, wait_s: float = 5.0) -> bool:
    """True once `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def make(folder: Path, **options: object) -> Iterator[Executor]:
    executor = Executor(ExecutorConfig(cwd=folder, **options))  # type: ignore[arg-type]
    with executor:
        yield executor


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Executor]:
    yield from make(tmp_path_factory.mktemp("kernel_cwd"), interrupt_grace=5.0)


@pytest.fixture(scope="module")
def recovering(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Executor]:
    """A kernel the tests kill; a short grace so an ignored interrupt costs one second."""
    yield from make(tmp_path_factory.mktemp("recovering"), interrupt_grace=1.0)


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "options",
    [
        {"startup_timeout": 0},
        {"interrupt_grace": -1.0},
        {"memory_limit_mb": 0},
        {"memory_limit_mb": 1.5},
        {"cpu_limit_s": True},
    ],
)
def test_config_rejects_bad_values(tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        ExecutorConfig(cwd=tmp_path, **options)  # type: ignore[arg-type]


def test_config_needs_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="existing folder"):
        ExecutorConfig(cwd=tmp_path / "missing")


# ------------------------------------------------------------------------------------ outputs


def test_streams_displays_and_result_arrive_in_order(executor: Executor) -> None:
    png = tiny_png()
    code = (
        "import sys\n"
        "from IPython.display import HTML, Image, display\n"
        "print('to stdout')\n"
        "print('to stderr', file=sys.stderr)\n"
        "display(HTML('<b>bold</b>'))\n"
        f"display(Image(data={png!r}))\n"
        "41 + 1\n"
    )
    seen: list[dict] = []
    result = executor.run(code, on_output=seen.append)
    assert result.status == "ok"
    assert [out["output_type"] for out in result.outputs] == [
        "stream",
        "stream",
        "display_data",
        "display_data",
        "execute_result",
    ]
    stdout, stderr, html, image, shown = result.outputs
    assert (stdout["name"], stdout["text"]) == ("stdout", "to stdout\n")
    assert (stderr["name"], stderr["text"]) == ("stderr", "to stderr\n")
    assert html["data"]["text/html"] == "<b>bold</b>"
    assert "text/plain" in html["data"]
    assert base64.b64decode(image["data"]["image/png"]) == png
    assert shown["data"]["text/plain"] == "42"
    assert shown["execution_count"] == result.execution_count
    assert seen == list(result.outputs)


def test_outputs_are_valid_nbformat(executor: Executor) -> None:
    result = executor.run("from IPython.display import HTML\nprint('x')\nHTML('<i>y</i>')")
    failed = executor.run("raise KeyError('z')")
    cell = nbformat.v4.new_code_cell("x", outputs=[*result.outputs, *failed.outputs])
    notebook = nbformat.v4.new_notebook(cells=[cell])
    nbformat.validate(notebook)


def test_stream_chunks_are_merged_but_streamed_one_by_one(executor: Executor) -> None:
    seen: list[dict] = []
    code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)"
    result = executor.run(code, on_output=seen.append)
    assert result.outputs == ({"output_type": "stream", "name": "stdout", "text": "0\n1\n2\n"},)
    assert len(seen) == 3
    assert "".join(chunk["text"] for chunk in seen) == "0\n1\n2\n"


def test_error_has_name_value_and_traceback(executor: Executor) -> None:
    result = executor.run("def f():\n    return 1 / 0\nf()")
    assert result.status == "error"
    (error,) = result.outputs
    assert error["output_type"] == "error"
    assert (error["ename"], error["evalue"]) == ("ZeroDivisionError", "division by zero")
    assert any("f()" in line for line in error["traceback"])


def test_clear_output_and_display_updates(executor: Executor) -> None:
    cleared = executor.run(
        "from IPython.display import clear_output\n"
        "print('old')\nclear_output()\nprint('new')\n"
        "clear_output(wait=True)\nprint('newest')"
    )
    assert cleared.outputs == ({"output_type": "stream", "name": "stdout", "text": "newest\n"},)
    updated = executor.run("handle = display('first', display_id=True)\nhandle.update('second')")
    (shown,) = updated.outputs
    assert shown["data"]["text/plain"] == "'second'"


def test_state_count_cwd_and_python(executor: Executor) -> None:
    first = executor.run("import os, sys\nkept = 41")
    second = executor.run("kept + 1")
    assert value(second) == "42"
    assert first.execution_count is not None
    assert second.execution_count == first.execution_count + 1
    assert value(executor.run("os.getcwd()")) == repr(str(executor.config.cwd))
    assert value(executor.run("sys.executable")) == repr(sys.executable)


def test_history_keeps_only_successful_runs(executor: Executor) -> None:
    executor.run("good = 1")
    executor.run("raise ValueError('bad')")
    assert executor.history[-1] == "good = 1"
    assert "raise ValueError('bad')" not in executor.history


# ------------------------------------------------------------------------------ interruption


def test_timeout_interrupts_and_keeps_the_kernel(executor: Executor) -> None:
    executor.run("survivor = 'still here'")
    started = time.monotonic()
    result = executor.run(SLEEP, timeout=1)
    assert result.status == "timeout"
    assert not result.restarted
    assert time.monotonic() - started < 10
    assert result.outputs[-1]["ename"] == "KeyboardInterrupt"
    assert value(executor.run("survivor")) == "'still here'"


@pytest.mark.parametrize(
    "interrupter",
    [
        pytest.param("interrupt", id="interrupt-from-another-thread"),
        pytest.param("ctrl-c", id="ctrl-c-in-the-caller"),  # KeyboardInterrupt in this thread
    ],
)
def test_an_interrupt_stops_the_cell_not_the_caller(executor: Executor, interrupter: str) -> None:
    action = executor.interrupt if interrupter == "interrupt" else _thread.interrupt_main
    timer = threading.Timer(1.0, action)
    timer.start()
    try:
        result = executor.run(SLEEP)
    finally:
        timer.cancel()
    assert result.status == "interrupted"
    assert not result.restarted
    assert value(executor.run("1 + 1")) == "2"


# ---------------------------------------------------------------------------------- recovery


def test_kernel_death_restarts_and_replays(recovering: Executor) -> None:
    recovering.run("a = 1")
    recovering.run("b = a + 1")
    recovering.run("1 / 0")  # an error: not replayed
    before = recovering.history
    result = recovering.run("import os\nos._exit(1)")
    assert result.status == "died"
    assert result.restarted
    assert result.replayed == len(before)
    assert "exit code 1" in result.message
    assert recovering.history == before  # the killing cell is not kept
    assert value(recovering.run("a, b")) == "(1, 2)"


def test_ignored_interrupt_restarts_and_replays(recovering: Executor) -> None:
    recovering.run("c = 3")
    before = recovering.history
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)"
    started = time.monotonic()
    result = recovering.run(stubborn, timeout=1)
    assert result.status == "timeout"
    assert result.restarted
    assert result.replayed == len(before)
    assert time.monotonic() - started < 20
    assert value(recovering.run("c")) == "3"


def test_restart_replays_and_stops_at_the_first_failure(recovering: Executor) -> None:
    results = recovering.restart(["x = 1", "y = x + 1", "1 / 0", "z = 3"])
    assert [result.status for result in results] == ["ok", "ok", "error"]
    assert "replay stopped at cell 3 of 4" in results[-1].message
    assert recovering.history == ("x = 1", "y = x + 1")
    assert value(recovering.run("x, y")) == "(1, 2)"
    assert recovering.run("z").status == "error"


# ---------------------------------------------------------------------------------- limits


def test_memory_and_cpu_limits_bind_only_the_kernel(tmp_path: Path) -> None:
    ours = resource.getrlimit(resource.RLIMIT_AS)
    with Executor(ExecutorConfig(cwd=tmp_path, memory_limit_mb=1024, cpu_limit_s=4)) as limited:
        check = "import resource\nresource.getrlimit(resource.RLIMIT_AS)"
        assert value(limited.run(check)) == f"({1024 << 20}, {1024 << 20})"
        limited.run("kept = 'kept'")
        hog = limited.run("hog = bytearray(16 * 1024**3)", timeout=60)
        assert hog.status in ("error", "died"), hog
        if hog.status == "error":
            assert hog.outputs[-1]["ename"] == "MemoryError"
        else:
            assert hog.restarted
        assert value(limited.run("kept")) == "'kept'"
        spin = limited.run("while True:\n    pass", timeout=60)
        assert (spin.status, spin.restarted) == ("died", True)
        assert "SIGXCPU" in spin.message
        assert value(limited.run("kept")) == "'kept'"
    assert resource.getrlimit(resource.RLIMIT_AS) == ours


# ---------------------------------------------------------------------------------- lifecycle


def test_shutdown_leaves_no_process_and_run_then_fails(tmp_path: Path) -> None:
    executor = Executor(ExecutorConfig(cwd=tmp_path))
    executor.start()
    assert executor.alive
    spawn = "import os, subprocess\nchild = subprocess.Popen(['sleep', '60'])\n"
    spawn += "os.getpid(), child.pid"
    kernel_pid, child_pid = map(int, value(executor.run(spawn)).strip("()").split(","))
    executor.shutdown()
    executor.shutdown()  # idempotent
    assert not executor.alive
    assert gone(kernel_pid)
    assert gone(child_pid)
    with pytest.raises(KernelError, match="not running"):
        executor.run("1")


def test_exiting_the_with_block_on_an_error_stops_the_kernel(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor,
    ):
        pid = int(value(executor.run("import os\nos.getpid()")))
        raise RuntimeError("boom")
    assert gone(pid)


def test_a_kernel_that_cannot_start_raises_kernel_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [sys.executable, "-c", "import sys; sys.exit('no kernel in here')"]
    monkeypatch.setattr(kernel_process, "_kernel_argv", lambda memory, cpu: broken)
    executor = Executor(ExecutorConfig(cwd=tmp_path, startup_timeout=30))
    with pytest.raises(KernelError, match="could not start the Python kernel") as raised:
        executor.start()
    assert "no kernel in here" in str(raised.value)
    assert "ipykernel" in str(raised.value)
    assert not executor.alive


# The owner of a kernel (the REPL, the codegen kernel), killed in the tests below. It starts the
# kernel from a thread that then ends (that must not end the kernel), starts a `sleep` from a
# cell and prints: the kernel's pid, the sleep's pid, the kernel's connection file.
OWNER = """\
import sys, threading, time
from pathlib import Path
from codegen_repl.core.executor import Executor, ExecutorConfig
executor = Executor(ExecutorConfig(cwd=Path(sys.argv[1]), inline_matplotlib=False))
starter = threading.Thread(target=executor.start)
starter.start()
starter.join()
result = executor.run(
    "import os, subprocess\\nfrom ipykernel.connect import get_connection_file\\n"
    "child = subprocess.Popen(['sleep', '300'])\\n"
    "print(os.getpid(), child.pid, get_connection_file())"
)
print(result.outputs[0]["text"], end="", flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_the_kernel_its_processes_and_its_key_file_go_with_a_killed_owner(
    tmp_path: Path, how: str
) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        kernel, sleep, key_file = owner.stdout.readline().split()  # type: ignore[union-attr]
        time.sleep(1.0)  # the starting thread has ended: the kernel lives on with its owner
        assert not gone(int(kernel), 0.1) and not gone(int(sleep), 0.1)
        assert Path(key_file).exists()
    finally:
        owner.send_signal(getattr(signal, how))
        owner.wait(timeout=30)
    assert gone(int(kernel), 5.0) and gone(int(sleep), 5.0)
    assert not Path(key_file).exists()


def test_connection_files_of_ended_owners_are_removed_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f"{kernel_process.CONNECTION_PREFIX}{ended.stdout.strip()}-0a1b.json"
    live = tmp_path / f"{kernel_process.CONNECTION_PREFIX}{os.getpid()}-0a1b.json"
    other = tmp_path / "kernel-123.json"  # not ours: left alone
    for path in (stale, live, other):
        path.write_text("{}")
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        assert not stale.exists() and live.exists() and other.exists()
        assert executor._manager is not None
        own = Path(executor._manager.connection_file)
        assert own.parent == tmp_path and own.exists() and (own.stat().st_mode & 0o077) == 0
    assert not own.exists()
