"""Run code in a live IPython kernel and collect what it shows, as nbformat v4 outputs.

`Executor` owns one kernel process (ipykernel on this process's Python, started through
jupyter_client). `run` sends one cell and waits for it; a Ctrl-C in the caller or a timeout
interrupts the kernel instead of escaping, and a kernel that dies (or ignores the interrupt)
is restarted with the successful cells replayed, so the user's variables come back.

Starting and stopping the kernel process is `kernel_process.py`; turning its iopub messages
into a cell's outputs is `outputs.py`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import Empty
from types import TracebackType
from typing import IO, Any, Literal

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

from codegen_repl.core.interrupts import held_interrupts
from codegen_repl.core.kernel_process import discard, exit_description, kernel_popen, start_kernel
from codegen_repl.core.outputs import Cell, InputCallback, Output, OutputCallback
from codegen_repl.errors import ConfigError, KernelError

STATUSES = ("ok", "error", "interrupted", "timeout", "died")
ShellRequest = Literal["complete", "inspect", "is_complete"]  # what `request` may ask
_POLL_S = 0.1  # how often a waiting run checks that the kernel process is still there
_REPLY_WAIT_S = 5.0  # the execute_reply is sent before idle, so this is only a safety net

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
        self._interrupted_at: float | None = None  # when `interrupt` was called (monotonic s)
        self._shell = threading.Lock()  # the client's shell channel: a run or a request
        # Told what takes a while (a restart, waiting out an ignored interrupt), as it begins.
        self.on_progress: Callable[[str], None] | None = None
        self._on_input: InputCallback | None = None

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
        with held_interrupts():  # a Ctrl-C here must not leave no kernel at all
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
                with held_interrupts():
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
        on_input: InputCallback | None = None,
    ) -> RunResult:
        """Run one cell and wait for it to finish, stop, or kill the kernel.

        Args:
            code: the cell's source.
            timeout: seconds after which the cell is interrupted (status "timeout"); None waits.
            on_output: called with each output dict as it arrives (stream chunks unmerged).
                Display updates and clear_output change only the collected outputs.
            on_input: answers the code's `input()` and `getpass()` (prompt, password) -> line;
                None: the code gets a StdinNotImplementedError, shown as one line.
        """
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"timeout must be None or a positive number of seconds: {timeout!r}")
        self._require_started()
        revived = None if self.alive else self._recover("died", self.history)
        history = self.history
        result, healthy = self._execute(code, timeout, on_output, on_input=on_input)
        if result.status == "ok":
            self._history.append(code)
        if not healthy:
            return self._with_recovery(result, self._recover(result.status, history))
        return result if revived is None else self._with_recovery(result, revived, before=True)

    def request(
        self, kind: ShellRequest, content: dict[str, Any], timeout: float
    ) -> dict[str, Any] | None:
        """Ask the kernel for a completion, an inspection or an is-complete answer (the
        message's `content`); the reply's content. None at once while a cell runs (the kernel
        answers only between cells) or no kernel runs, and None after `timeout` seconds."""
        client = self._client
        if client is None or not self._shell.acquire(blocking=False):
            return None
        try:
            msg_id = getattr(client, kind)(**content)
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    reply = client.get_shell_msg(timeout=remaining)
                except Empty:
                    break
                if reply["parent_header"].get("msg_id") == msg_id:
                    return dict(reply["content"])
            return None  # a late reply is skipped by the msg_id check of the next reader
        finally:
            self._shell.release()

    def interrupt(self) -> None:
        """Interrupt the running cell, like Ctrl-C in Jupyter; the waiting `run` returns
        status "interrupted". Any thread. Code that ignores it gets `interrupt_grace` seconds,
        as after a Ctrl-C in the caller; then the kernel is restarted and the history
        replayed (the waiting `run` says so)."""
        manager = self._manager
        if manager is not None:
            self._interrupted_at = time.monotonic()
            self._interrupt_requested.set()
            manager.interrupt_kernel()

    def _execute(
        self,
        code: str,
        timeout: float | None,
        on_output: OutputCallback | None,
        silent: bool = False,
        on_input: InputCallback | None = None,
    ) -> tuple[RunResult, bool]:
        """Run one cell without any recovery. Returns the result and whether the kernel is
        still usable (False: it died or ignored the interrupt)."""
        client = self._require_started()
        self._interrupt_requested.clear()
        self._interrupted_at = None
        started = time.monotonic()
        with self._shell:
            msg_id = client.execute(code, silent=silent, store_history=not silent,
                                    allow_stdin=on_input is not None)  # fmt: skip
            cell = Cell(msg_id, on_output)
            self._on_input = on_input
            try:
                status, healthy = self._follow(cell, timeout)
            finally:
                self._on_input = None
        result = RunResult(
            outputs=tuple(cell.outputs),
            status=status,
            execution_count=cell.execution_count,
            duration_s=time.monotonic() - started,
            message=self._status_message(status, timeout),
        )
        return result, healthy

    def _follow(self, cell: Cell, timeout: float | None) -> tuple[str, bool]:
        """Wait for the cell; on Ctrl-C or timeout interrupt it and wait out the grace."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ending = self._wait(cell, deadline)
            if ending == "idle":
                status = self._reply_status(cell)
                if status == "error" and self._interrupt_requested.is_set():
                    status = "interrupted"
                return status, True
            if ending == "ignored":  # `interrupt` (another thread) and its grace are over
                return "interrupted", False
        except KeyboardInterrupt:  # the caller's Ctrl-C is meant for the kernel, not for us
            ending = "interrupted"
        if ending == "died":
            return "died", False
        try:
            assert self._manager is not None
            self._manager.interrupt_kernel()
            self._progress(f"interrupting the kernel; waiting up to "
                           f"{self.config.interrupt_grace:g} s for the code to stop")  # fmt: skip
            answer = self._wait(cell, time.monotonic() + self.config.interrupt_grace)
            if answer == "idle":
                self._reply_status(cell)
                return ending, True
        except KeyboardInterrupt:  # a second Ctrl-C: the user is done waiting
            answer = "timeout"
        return ("died" if answer == "died" else ending), False

    def _wait(self, cell: Cell, deadline: float | None) -> str:
        """Feed iopub messages to the cell until it is idle: "idle", "timeout", "died", or
        "ignored" (`interrupt` was called more than `interrupt_grace` seconds ago)."""
        client = self._require_started()
        while not cell.idle:
            now = time.monotonic()
            at = self._interrupted_at
            if at is not None and now - at > self.config.interrupt_grace:
                return "ignored"
            remaining = _POLL_S if deadline is None else min(_POLL_S, deadline - now)
            if remaining <= 0:
                return "timeout"
            if self._on_input is not None and client.stdin_channel.msg_ready():
                self._answer_input(cell, client)
            try:
                cell.handle(client.get_iopub_msg(timeout=remaining))
            except Empty:
                if not self.alive:
                    return "died"
        return "idle"

    def _answer_input(self, cell: Cell, client: BlockingKernelClient) -> None:
        """Answer the kernel's input_request (after the outputs sent before it are shown).
        Ctrl-C or the end of input while the user is asked interrupts the cell."""
        request = client.get_stdin_msg(timeout=1)
        if request["msg_type"] != "input_request" or self._on_input is None:
            return
        while True:  # the outputs printed before input() come first
            try:
                cell.handle(client.get_iopub_msg(timeout=0.05))
            except Empty:
                break
        content = request["content"]
        try:
            answer = self._on_input(content.get("prompt", ""), bool(content.get("password")))
        except EOFError:
            raise KeyboardInterrupt from None
        client.input(answer)

    def _reply_status(self, cell: Cell) -> str:
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
        # the cells it ran are the turns of a session (a session runs each turn as one cell)
        turns = "1 turn" if len(history) == 1 else f"{len(history)} turns"
        self._progress(f"{cause}; restarting it and replaying {turns}")
        return cause, self.restart(history), len(history)

    @staticmethod
    def _with_recovery(
        result: RunResult, recovery: tuple[str, list[RunResult], int], before: bool = False
    ) -> RunResult:
        cause, replays, wanted = recovery
        replayed = sum(replay.status == "ok" for replay in replays)
        note = f"{cause}; restarted it and replayed {replayed} of {wanted} turns"
        if replayed < wanted and replays:
            note = _join(note, replays[-1].message)
        if before:
            note += ", then ran this cell"
        return dataclasses.replace(
            result, restarted=True, replayed=replayed, message=_join(result.message, note)
        )

    def _exit_description(self) -> str:
        return exit_description(self._process())

    # ------------------------------------------------------------------------------ the process

    def _launch(self) -> None:
        config = self.config
        self._manager, self._client, self._log = start_kernel(
            config.cwd, config.startup_timeout, config.memory_limit_mb, config.cpu_limit_s
        )
        self._history = []
        if config.inline_matplotlib:
            self._execute(_MATPLOTLIB_SETUP, config.startup_timeout, None, silent=True)

    def _stop(self, now: bool) -> None:
        manager, client, log = self._manager, self._client, self._log
        self._manager = self._client = self._log = None
        if manager is not None:
            discard(manager, client, log, now=now)

    def _process(self) -> subprocess.Popen[bytes] | None:
        return kernel_popen(self._manager)

    def _require_started(self) -> BlockingKernelClient:
        if self._client is None:
            raise KernelError(
                "the kernel is not running (never started, or shut down); call start() or "
                "restart() first, or use the Executor in a `with` block"
            )
        return self._client

    def _progress(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(text)


def _join(*parts: str) -> str:
    return "; ".join(part for part in parts if part)
