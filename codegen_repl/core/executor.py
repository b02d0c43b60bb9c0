"""Run code in a live IPython kernel and collect what it shows, as nbformat v4 outputs.

`Executor` owns one kernel process (ipykernel on this process's Python, started through
jupyter_client). `run` sends one cell and waits for it; a Ctrl-C in the caller or a timeout
interrupts the kernel instead of escaping, and a kernel that dies (or ignores the interrupt)
is restarted with the successful cells replayed, so the user's variables come back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import Empty
from types import TracebackType
from typing import IO, Any

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager

from codegen_repl.errors import ConfigError, KernelError

Output = dict[str, Any]
OutputCallback = Callable[[Output], None]

STATUSES = ("ok", "error", "interrupted", "timeout", "died")
KERNEL_NAME = "python3"
_POLL_S = 0.1  # how often a waiting run checks that the kernel process is still there
_REPLY_WAIT_S = 5.0  # the execute_reply is sent before idle, so this is only a safety net
_SHUTDOWN_WAIT_S = 3.0  # a polite shutdown is given this long before the kill
_LOG_TAIL_CHARS = 2000

# Run by the kernel's Python before ipykernel: the limits then bind the kernel (and what it
# spawns) but never this process. argv: -c LAUNCHER MEMORY_MB CPU_S -f CONNECTION_FILE.
_LIMITED_LAUNCHER = """\
import resource, runpy, sys
memory_mb, cpu_s = sys.argv[1:3]
del sys.argv[1:3]
def limit(kind, soft, hard):
    _, ceiling = resource.getrlimit(kind)
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(kind, (soft, hard))
if memory_mb != "-":
    limit(resource.RLIMIT_AS, int(memory_mb) << 20, int(memory_mb) << 20)
if cpu_s != "-":  # SIGXCPU at the soft limit names the cause; SIGKILL would look like OOM
    limit(resource.RLIMIT_CPU, int(cpu_s), int(cpu_s) + 2)
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""

# Silent, so it neither counts as a cell nor shows anything; a missing matplotlib is fine.
_MATPLOTLIB_SETUP = """\
try:
    import matplotlib
except ImportError:
    pass
else:
    get_ipython().run_line_magic("matplotlib", "inline")
    del matplotlib
"""

_SIGNAL_HINTS = {
    "SIGKILL": "usually the system's out-of-memory killer",
    "SIGXCPU": "the CPU time limit",
    "SIGSEGV": "a crash in native code",
}


@dataclasses.dataclass(frozen=True)
class ExecutorConfig:
    """How the kernel is started and how long the executor waits for it.

    Args:
        cwd: the kernel's working directory; must exist.
        startup_timeout: seconds to wait for a new kernel to answer.
        interrupt_grace: seconds to wait for an interrupted cell to stop before the kernel is
            restarted instead.
        memory_limit_mb: address-space limit (RLIMIT_AS) of the kernel process, or None.
            It counts reserved, not resident, memory, so leave room (about 1 GiB) for the
            interpreter and its threads.
        cpu_limit_s: CPU-time limit (RLIMIT_CPU) of the kernel process over its lifetime.
        inline_matplotlib: run `%matplotlib inline` at start when matplotlib is importable.
    """

    cwd: Path
    startup_timeout: float = 60.0
    interrupt_grace: float = 5.0
    memory_limit_mb: int | None = None
    cpu_limit_s: int | None = None
    inline_matplotlib: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "cwd", Path(self.cwd))
        if not self.cwd.is_dir():
            raise ConfigError(f"cwd must be an existing folder, got {str(self.cwd)!r}")
        for name in ("startup_timeout", "interrupt_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        for name, unit in (("memory_limit_mb", "megabytes"), ("cpu_limit_s", "seconds")):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"{name} must be None (no limit) or a positive whole number of {unit}, "
                    f"got {value!r}"
                )
            if sys.platform == "win32":
                raise ConfigError(f"{name} needs POSIX resource limits; leave it None on Windows")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one `run` produced.

    `outputs` are nbformat v4 output dicts (stream, execute_result, display_data, error), ready
    to be stored in a notebook cell. `status` is one of STATUSES.
    """

    outputs: tuple[Output, ...]
    status: str
    execution_count: int | None
    duration_s: float
    restarted: bool = False
    replayed: int = 0
    message: str = ""


class Executor:
    """One IPython kernel, driven synchronously. Not for concurrent `run`s from several
    threads; `interrupt` may be called from any thread."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config
        self._manager: KernelManager | None = None
        self._client: BlockingKernelClient | None = None
        self._log: IO[bytes] | None = None
        self._history: list[str] = []
        self._interrupt_requested = threading.Event()

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the kernel and wait until it answers; does nothing if it is already running."""
        if self._manager is None:
            self._launch()

    def shutdown(self) -> None:
        """Stop the kernel and everything it started. Safe to call more than once."""
        self._history.clear()
        self._stop(now=False)

    def restart(self, replay: Sequence[str] = ()) -> list[RunResult]:
        """Replace the kernel with a fresh one, then run each cell of `replay` in order.

        Replay stops at the first cell that does not succeed; its result says so and is the
        last in the returned list.
        """
        self._stop(now=True)  # its state is being thrown away, so no polite shutdown
        self._launch()
        results: list[RunResult] = []
        for index, code in enumerate(replay, start=1):
            result, healthy = self._execute(code, timeout=None, on_output=None)
            results.append(result)
            if result.status == "ok":
                self._history.append(code)
                continue
            if not healthy:  # leave a usable kernel behind, even without the replayed state
                self._stop(now=True)
                self._launch()
            note = f"replay stopped at cell {index} of {len(replay)} ({result.status})"
            results[-1] = dataclasses.replace(result, message=_join(note, result.message))
            break
        return results

    @property
    def alive(self) -> bool:
        process = self._process()
        return process is not None and process.poll() is None

    @property
    def connection_info(self) -> dict[str, Any] | None:
        """The running kernel's ports and key, for a second client of its own (completion and
        inspection requests beside a run); None when no kernel runs. A restart changes it."""
        manager = self._manager
        return None if manager is None else dict(manager.get_connection_info())

    @property
    def history(self) -> tuple[str, ...]:
        """Code of the successful runs since the last start or restart, replays included."""
        return tuple(self._history)

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()

    # ------------------------------------------------------------------------------ running

    def run(
        self,
        code: str,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        """Run one cell and wait for it to finish, stop, or kill the kernel.

        Args:
            code: the cell's source.
            timeout: seconds after which the cell is interrupted (status "timeout"); None waits.
            on_output: called with each output dict as it arrives (stream chunks unmerged).
                Display updates and clear_output change only the collected outputs.
        """
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be None or a positive number of seconds: {timeout!r}")
        self._require_started()
        revived = None if self.alive else self._recover("died", self.history)
        history = self.history
        result, healthy = self._execute(code, timeout, on_output)
        if result.status == "ok":
            self._history.append(code)
        if not healthy:
            return self._with_recovery(result, self._recover(result.status, history))
        return result if revived is None else self._with_recovery(result, revived, before=True)

    def interrupt(self) -> None:
        """Interrupt the running cell, like Ctrl-C in Jupyter; the waiting `run` returns
        status "interrupted"."""
        manager = self._manager
        if manager is not None:
            self._interrupt_requested.set()
            manager.interrupt_kernel()

    def _execute(
        self,
        code: str,
        timeout: float | None,
        on_output: OutputCallback | None,
        silent: bool = False,
    ) -> tuple[RunResult, bool]:
        """Run one cell without any recovery. Returns the result and whether the kernel is
        still usable (False: it died or ignored the interrupt)."""
        client = self._require_started()
        self._interrupt_requested.clear()
        started = time.monotonic()
        msg_id = client.execute(code, silent=silent, store_history=not silent, allow_stdin=False)
        cell = _Cell(msg_id, on_output)
        status, healthy = self._follow(cell, timeout)
        result = RunResult(
            outputs=tuple(cell.outputs),
            status=status,
            execution_count=cell.execution_count,
            duration_s=time.monotonic() - started,
            message=self._status_message(status, timeout),
        )
        return result, healthy

    def _follow(self, cell: _Cell, timeout: float | None) -> tuple[str, bool]:
        """Wait for the cell; on Ctrl-C or timeout interrupt it and wait out the grace."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ending = self._wait(cell, deadline)
            if ending == "idle":
                status = self._reply_status(cell)
                if status == "error" and self._interrupt_requested.is_set():
                    status = "interrupted"
                return status, True
        except KeyboardInterrupt:  # the caller's Ctrl-C is meant for the kernel, not for us
            ending = "interrupted"
        if ending == "died":
            return "died", False
        try:
            assert self._manager is not None
            self._manager.interrupt_kernel()
            answer = self._wait(cell, time.monotonic() + self.config.interrupt_grace)
            if answer == "idle":
                self._reply_status(cell)
                return ending, True
        except KeyboardInterrupt:  # a second Ctrl-C: the user is done waiting
            answer = "timeout"
        return ("died" if answer == "died" else ending), False

    def _wait(self, cell: _Cell, deadline: float | None) -> str:
        """Feed iopub messages to the cell until it is idle: "idle", "timeout" or "died"."""
        client = self._require_started()
        while not cell.idle:
            remaining = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
            if remaining <= 0:
                return "timeout"
            try:
                cell.handle(client.get_iopub_msg(timeout=remaining))
            except Empty:
                if not self.alive:
                    return "died"
        return "idle"

    def _reply_status(self, cell: _Cell) -> str:
        """Read the cell's execute_reply (also draining it from the shell channel)."""
        client = self._require_started()
        deadline = time.monotonic() + _REPLY_WAIT_S
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                reply = client.get_shell_msg(timeout=remaining)
            except Empty:
                break
            if reply["parent_header"].get("msg_id") == cell.msg_id:
                content = reply["content"]
                if cell.execution_count is None:
                    cell.execution_count = content.get("execution_count")
                return "ok" if content.get("status") == "ok" else "error"
        return "error" if cell.has_error else "ok"  # no reply came; the outputs tell

    def _status_message(self, status: str, timeout: float | None) -> str:
        if status == "timeout":
            return f"the cell ran longer than {timeout:g} s and was interrupted"
        if status == "interrupted":
            return "the cell was interrupted"
        return ""

    # ------------------------------------------------------------------------------ recovery

    def _recover(self, status: str, history: Sequence[str]) -> tuple[str, list[RunResult], int]:
        """Restart the kernel and replay `history`: (what happened, replay results, count)."""
        if status == "died":
            cause = f"the kernel died ({self._exit_description()})"
        else:
            grace = self.config.interrupt_grace
            cause = f"the kernel did not stop within {grace:g} s of the interrupt"
        return cause, self.restart(history), len(history)

    @staticmethod
    def _with_recovery(
        result: RunResult, recovery: tuple[str, list[RunResult], int], before: bool = False
    ) -> RunResult:
        cause, replays, wanted = recovery
        replayed = sum(replay.status == "ok" for replay in replays)
        note = f"{cause}; restarted it and replayed {replayed} of {wanted} cells"
        if replayed < wanted and replays:
            note = _join(note, replays[-1].message)
        if before:
            note += ", then ran this cell"
        return dataclasses.replace(
            result, restarted=True, replayed=replayed, message=_join(result.message, note)
        )

    def _exit_description(self) -> str:
        process = self._process()
        code = None if process is None else process.poll()
        if code is None:
            return "no exit code"
        if code >= 0:
            return f"exit code {code}"
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = _SIGNAL_HINTS.get(name)
        return f"killed by {name}" + (f", {hint}" if hint else "")

    # ------------------------------------------------------------------------------ the process

    def _launch(self) -> None:
        spec = KernelSpec(
            argv=self._kernel_argv(),
            display_name="Python 3 (codegen-repl)",
            language="python",
            interrupt_mode="signal",
        )
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=_OneSpec(spec))
        manager.shutdown_wait_time = _SHUTDOWN_WAIT_S
        # The kernel's own stdout/stderr: quoted when it fails to start, closed with it.
        log = tempfile.TemporaryFile()  # noqa: SIM115
        client: BlockingKernelClient | None = None
        try:
            manager.start_kernel(cwd=str(self.config.cwd), stdout=log, stderr=log, env=self._env())
            client = manager.client()
            client.start_channels()
            client.wait_for_ready(timeout=self.config.startup_timeout)
        except BaseException as error:
            tail = _tail(log)
            _discard(manager, client, log, now=True)
            if not isinstance(error, Exception):
                raise
            raise KernelError(
                f"could not start the Python kernel: {error}{tail}; check that ipykernel is "
                f"installed in {sys.executable} (`{sys.executable} -m pip install ipykernel`)"
            ) from error
        self._manager, self._client, self._log = manager, client, log
        self._history = []
        if self.config.inline_matplotlib:
            self._execute(_MATPLOTLIB_SETUP, self.config.startup_timeout, None, silent=True)

    def _kernel_argv(self) -> list[str]:
        memory, cpu = self.config.memory_limit_mb, self.config.cpu_limit_s
        if memory is None and cpu is None:
            return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        limits = ["-" if value is None else str(value) for value in (memory, cpu)]
        return [sys.executable, "-c", _LIMITED_LAUNCHER, *limits, "-f", "{connection_file}"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.config.memory_limit_mb is not None:
            # glibc reserves 64 MiB of address space per thread arena, and RLIMIT_AS counts it
            env.setdefault("MALLOC_ARENA_MAX", "2")
        return env

    def _stop(self, now: bool) -> None:
        manager, client, log = self._manager, self._client, self._log
        self._manager = self._client = self._log = None
        if manager is not None:
            _discard(manager, client, log, now=now)

    def _process(self) -> subprocess.Popen[bytes] | None:
        provisioner = None if self._manager is None else self._manager.provisioner
        return getattr(provisioner, "process", None)

    def _require_started(self) -> BlockingKernelClient:
        if self._client is None:
            raise KernelError(
                "the kernel is not running (never started, or shut down); call start() or "
                "restart() first, or use the Executor in a `with` block"
            )
        return self._client


class _Cell:
    """The outputs of one execute_request, built up from its iopub messages."""

    def __init__(self, msg_id: str, on_output: OutputCallback | None) -> None:
        self.msg_id = msg_id
        self.outputs: list[Output] = []
        self.execution_count: int | None = None
        self.idle = False
        self.has_error = False
        self._on_output = on_output
        self._clear_on_next = False
        self._displays: dict[str, list[int]] = {}  # display_id -> indices into outputs

    def handle(self, msg: dict[str, Any]) -> None:
        if msg["parent_header"].get("msg_id") != self.msg_id:
            return  # left over from an earlier, interrupted cell
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status":
            self.idle = content.get("execution_state") == "idle"
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count")
        elif kind == "clear_output":
            self._clear_on_next = True
            if not content.get("wait", False):
                self._clear()
        elif kind == "update_display_data":
            self._update_display(content)
        elif kind in ("stream", "display_data", "execute_result", "error"):
            self._add(_to_output(kind, content), content)

    def _add(self, output: Output, content: dict[str, Any]) -> None:
        if self._clear_on_next:
            self._clear()
        self.has_error = self.has_error or output["output_type"] == "error"
        last = self.outputs[-1] if self.outputs else None
        if output["output_type"] == "stream" and last and last.get("name") == output["name"]:
            last["text"] += output["text"]  # one output per run of same-stream chunks, as Jupyter
        else:
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:
                self._displays.setdefault(display_id, []).append(len(self.outputs))
            self.outputs.append(dict(output))
        if self._on_output is not None:
            self._on_output(output)

    def _update_display(self, content: dict[str, Any]) -> None:
        display_id = (content.get("transient") or {}).get("display_id", "")
        for index in self._displays.get(display_id, []):
            self.outputs[index]["data"] = dict(content.get("data", {}))
            self.outputs[index]["metadata"] = dict(content.get("metadata", {}))

    def _clear(self) -> None:
        self.outputs.clear()
        self._displays.clear()
        self._clear_on_next = False


class _OneSpec(KernelSpecManager):
    """Serves the one kernelspec the executor builds, so the kernel runs on this process's
    Python whatever kernelspecs are installed."""

    def __init__(self, spec: KernelSpec) -> None:
        super().__init__()
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec


def _to_output(kind: str, content: dict[str, Any]) -> Output:
    """An iopub message's content as an nbformat v4 output dict."""
    if kind == "stream":
        return {"output_type": "stream", "name": content["name"], "text": content["text"]}
    if kind == "error":
        return {
            "output_type": "error",
            "ename": content.get("ename", ""),
            "evalue": content.get("evalue", ""),
            "traceback": list(content.get("traceback", [])),
        }
    output: Output = {
        "output_type": kind,
        "data": dict(content.get("data", {})),
        "metadata": dict(content.get("metadata", {})),
    }
    if kind == "execute_result":
        output["execution_count"] = content.get("execution_count")
    return output


def _discard(
    manager: KernelManager, client: BlockingKernelClient | None, log: IO[bytes] | None, now: bool
) -> None:
    """Stop a kernel, its channels and every process in its process group."""
    provisioner = manager.provisioner
    pgid = getattr(provisioner, "pgid", None)  # read now: shutdown forgets the provisioner
    if client is not None:
        client.stop_channels()
    # A half-started or already dead kernel makes shutdown complain; it is going away anyway.
    with contextlib.suppress(Exception):
        manager.shutdown_kernel(now=now)
    # The kernel's own children (subprocesses of user code) share its group and would
    # outlive a kernel that exited politely; never signal our own group.
    if pgid and pgid != os.getpgrp():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if log is not None:
        log.close()


def _tail(log: IO[bytes]) -> str:
    with contextlib.suppress(OSError, ValueError):
        log.seek(0)
        text = log.read().decode("utf-8", "replace").strip()
        if text:
            return f"\n--- kernel output ---\n{text[-_LOG_TAIL_CHARS:]}\n---"
    return ""


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)
