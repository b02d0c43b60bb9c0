"""The blocking half of the `codegen` kernel: one Session, its child kernel and its model.

`KernelRunner.run_cell` does what a parsed cell asks (a step, the user's code, magics) through
the session commands every front end shares (`codegen_repl.core.commands`), with
`KernelFrontend` as their Frontend; what they show goes to a `CellSink`. The kernel (kernel.py)
calls it in a worker thread and turns the CellSink calls into Jupyter messages. `interrupt` may
be called from any thread: it stops a generation (between streamed pieces) or interrupts the
child kernel. The model loads in the background from the start; a cell that needs it waits for
it, and a load that failed is reported in that cell (the kernel stays up; `%model NAME` loads
another).

A cell is its step: a cell that comes with a cell id (JupyterLab and Notebook send
`metadata.cellId`) and already made a turn replaces that turn when it runs again, as `%edit N`
does (the kernel is rebuilt from the turns before it, the later turns that ran run again); a cell
without one adds a turn each time, and says so. The autosaved session never overwrites the one a
previous kernel left: that one is kept under a numbered name.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from codegen_repl.core.commands import Commands
from codegen_repl.core.decoding import BackgroundDecoder  # no JAX: the load imports it
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.frontend import Command, TextStyle
from codegen_repl.core.session import Session, SessionSettings, Turn
from codegen_repl.core.settings import RunMode
from codegen_repl.errors import CodeGenError, ConfigError
from codegen_repl.kernel.cells import PREFIX, Cell, Magic, parse_cell
from codegen_repl.kernel.display import code_bundle

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder

LoadDecoder = Callable[[str], "Decoder"]
STATUS_ERRORS = {
    "interrupted": "KeyboardInterrupt",
    "timeout": "TimeoutError",
    "died": "KernelDied",
}
KERNEL_RUN_MODES: tuple[RunMode, ...] = ("auto", "never")
_SHOW_EVERY_S = 0.1  # streamed code is redrawn at most this often
Phase = Literal["generating", "running"]


class CellSink(Protocol):
    """Where a cell's results go (the kernel sends them to Jupyter; tests collect them)."""

    def stream(self, name: str, text: str) -> None: ...

    def output(self, output: dict[str, Any]) -> None:
        """An nbformat output of the child kernel (stream chunks unmerged)."""

    def show_code(self, code: str, final: bool) -> None:
        """The code of the step so far (`final`: the whole, truncated code)."""

    def display(self, bundle: dict[str, str]) -> None: ...

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None: ...


@dataclasses.dataclass(frozen=True)
class CellOutcome:
    """The execute_reply's status and, for an error, what it names."""

    status: str = "ok"
    ename: str = ""
    evalue: str = ""
    traceback: tuple[str, ...] = ()

    def reply(self, execution_count: int) -> dict[str, Any]:
        content: dict[str, Any] = {"status": self.status, "execution_count": execution_count}
        if self.status == "ok":
            return content | {"payload": [], "user_expressions": {}}
        return content | {"ename": self.ename, "evalue": self.evalue,
                          "traceback": list(self.traceback)}  # fmt: skip


OK = CellOutcome()


@dataclasses.dataclass(frozen=True)
class RunnerOptions:
    """What the kernel was started with.

    Args:
        model: checkpoint folder or hub id (with `server`: the served model's name).
        server: a decoder server's URL, or None to run the model in the kernel.
        api_key: the server's key (None: $CODEGEN_API_KEY).
        dtype: parameter dtype; None picks fp32 on CPU, bf16 on accelerators.
        cwd: the child kernel's working folder (the notebook's folder).
        session_path: where the session autosaves as a notebook; None: no autosave.
        settings: sampling settings, prefix and run timeout.
        run_mode: "auto" (run each step's code) or "never" (show it only).
        context_window: the server's context window, where the server does not report it.
    """

    model: str
    cwd: Path
    server: str | None = None
    api_key: str | None = None
    dtype: str | None = None
    session_path: Path | None = None
    settings: SessionSettings = dataclasses.field(default_factory=SessionSettings)
    run_mode: RunMode = "auto"
    context_window: int | None = None

    def __post_init__(self) -> None:
        if not self.model and not self.server:
            raise ConfigError("give a model (a checkpoint folder or hub id) or a server URL")
        if self.run_mode not in KERNEL_RUN_MODES:
            raise ConfigError(f"run must be one of {', '.join(KERNEL_RUN_MODES)} in the kernel, "
                              f"got {self.run_mode!r}")  # fmt: skip


class GenerationStopped(Exception):
    """An interrupt arrived while the model was writing."""


class KernelRunner:
    """One session of the kernel. Cells run one at a time, in one worker thread."""

    def __init__(self, options: RunnerOptions, load_decoder: LoadDecoder | None = None) -> None:
        self.options = options
        self._load = load_decoder or self._open_decoder
        name = options.model or str(options.server)
        self.decoder: Decoder = BackgroundDecoder(  # the REPL's mechanism (core/decoding.py)
            lambda: self._load(name), name, "load another model with %model NAME"
        )
        self.model_name = name
        self.executor = Executor(ExecutorConfig(cwd=options.cwd))
        self.commands: Commands | None = None
        self._cancel = threading.Event()
        self._phase: Phase | None = None
        self._cell_number = 0
        self._cells: dict[str, Turn] = {}  # cell id -> the turn that cell made
        self._told_no_id = False
        self._notes: list[str] = []  # for the next cell (the session start has no cell)

    def _open_decoder(self, model: str) -> Decoder:
        from codegen_repl.core.decoding import open_decoder

        options = self.options
        return open_decoder(
            model, server=options.server, api_key=options.api_key, dtype=options.dtype,
            context_window=options.context_window,
        )  # fmt: skip

    @property
    def session(self) -> Session | None:
        return None if self.commands is None else self.commands.session

    @property
    def run_mode(self) -> RunMode:
        return self.options.run_mode if self.commands is None else self.commands.run_mode

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> Session:
        """Start the child kernel and the session (again, after a failed start)."""
        if self.commands is None:
            self.executor.start()
            options = self.options
            kept = None if options.session_path is None else keep_previous(options.session_path)
            if kept is not None:  # named as `%load` takes it: relative to the folder
                if kept.is_relative_to(options.cwd):
                    kept = kept.relative_to(options.cwd)
                self._notes.append(f"the session of the previous kernel is kept as {kept}; "
                                   f"this one autosaves to {options.session_path}")  # fmt: skip
            session = Session(self.decoder, self.executor, options.session_path, options.settings)
            session.prepare_next()  # the model prefills and compiles ahead (once loaded)
            self.commands = Commands(
                session, KernelFrontend(self, _NoSink()), options.run_mode, self.model_name,
                self._load, options.cwd,
            )  # fmt: skip
        return self.commands.session

    @property
    def cell_number(self) -> int:
        """Counts the cells run so far; identifies the one running now."""
        return self._cell_number

    def interrupt(self, cell: int | None = None) -> None:
        """Stop the generation or interrupt the running code; nothing when idle, or when
        `cell` (a cell_number read when the interrupt came) has ended since."""
        phase = self._phase
        if phase is None or (cell is not None and cell != self._cell_number):
            return
        self._cancel.set()
        if phase == "running":
            session = self.session
            if session is not None:
                session.request_stop()  # a replay (%undo, %edit, %load) stops, interrupted
            if session is None or not session.replaying:
                self.executor.interrupt()

    def shutdown(self) -> None:
        self.executor.shutdown()  # a load still running ends with the process (daemon thread)

    # ------------------------------------------------------------------------- cells

    def run_cell(self, source: str, sink: CellSink, cell_id: str | None = None) -> CellOutcome:
        """Do what the cell asks; never raises (errors become the cell's error output).

        Args:
            source: the cell's text.
            sink: where its results go.
            cell_id: the front end's id of the cell (`metadata.cellId`): a cell that made a
                turn replaces it when run again; "" when the front end sent none (a note says
                that each run adds a turn); None when the caller is no notebook (tests).
        """
        self._cell_number += 1
        self._cancel.clear()
        try:
            cell = parse_cell(source)
            if cell.kind == "empty" or (cell.kind == "code" and not cell.code.strip()):
                return OK
            self.start()
            assert self.commands is not None
            self.commands.frontend = KernelFrontend(self, sink)
            while self._notes:
                sink.stream("stdout", self._notes.pop(0) + "\n")
            if cell.kind != "magics":
                return self._outcome(self._turn_cell(cell, sink, cell_id), sink)
            for magic in cell.magics:
                self._phase = "running"  # replays and MTPB runs: an interrupt stops them
                outcome = self._outcome(self._magic(magic, sink), sink)
                if outcome.status != "ok":
                    return outcome
            return OK
        except GenerationStopped:
            note = "generation stopped; the partial code was dropped"
            return self._fail(sink, "KeyboardInterrupt", note)
        except ConfigError as error:  # a usage mistake, named as IPython names them
            return self._fail(sink, "UsageError", str(error))
        except CodeGenError as error:
            return self._fail(sink, type(error).__name__, str(error))
        except Exception as bug:  # a bug must not cost the user the kernel
            lines = traceback.format_exception(bug)
            return self._fail(sink, "InternalError", f"{type(bug).__name__}: {bug}", lines)
        finally:
            self._phase = None

    def _turn_cell(self, cell: Cell, sink: CellSink, cell_id: str | None) -> Turn | None:
        """A step or code cell: a new turn, or the one this cell made, replaced."""
        assert self.commands is not None
        commands, session = self.commands, self.commands.session
        if cell.kind == "step":
            self._say_loading(sink)
        made = self._cells.get(cell_id or "")
        number = next((at for at, turn in enumerate(session.turns, 1) if turn is made), None)
        if number is not None:
            replace = commands.replace_step if cell.kind == "step" else commands.replace_code
            turn = replace(number, cell.step or cell.code)
        else:
            if cell_id == "":
                self._say_no_cell_id(cell, sink)
            add = commands.step if cell.kind == "step" else commands.user_code
            turn = add(cell.step or cell.code)
        if cell_id and turn is not None:
            self._cells[cell_id] = turn
        return turn

    def _magic(self, magic: Magic, sink: CellSink) -> Turn | None:
        """One magic line; the cell whose step `%retry` samples again owns the new turn."""
        assert self.commands is not None
        session = self.commands.session
        if magic.name in ("retry", "fix", "mtpb"):
            self._say_loading(sink)
        last = session.turns[-1] if session.turns else None
        turn = self.commands.run(Command(magic.name, magic.argument))
        if magic.name == "retry" and turn is not None:
            for cell_id, made in list(self._cells.items()):
                if made is last:
                    self._cells[cell_id] = turn
        return turn

    def _say_loading(self, sink: CellSink) -> None:
        assert self.commands is not None
        if not getattr(self.commands.session.decoder, "loaded", True):
            sink.stream("stdout", f"loading the model {self.commands.model_name} (the first "
                        "step waits for it) ...\n")  # fmt: skip

    def _say_no_cell_id(self, cell: Cell, sink: CellSink) -> None:
        """On the first step cell, and on any cell that repeats a turn: without cell ids, a
        cell run again cannot be told from a new one."""
        assert self.commands is not None
        turns = self.commands.session.turns
        repeated = any(turn.step == cell.step if cell.kind == "step" else turn.code == cell.code
                       for turn in turns)  # fmt: skip
        first = cell.kind == "step" and not self._told_no_id
        if not (first or repeated):
            return
        self._told_no_id = self._told_no_id or cell.kind == "step"
        sink.stream(
            "stdout",
            f"(this front end sent no cell id: the cell adds turn "
            f"{len(turns) + 1}, even if it ran before; {PREFIX}drop N deletes a turn)\n",
        )

    def _outcome(self, turn: Turn | None, sink: CellSink) -> CellOutcome:
        """The execute_reply for a cell whose last turn is `turn` (None: no turn ran)."""
        if turn is None or turn.status in ("ok", "skipped", "declined"):
            return OK
        errors = [output for output in turn.outputs if output.get("output_type") == "error"]
        if errors:
            last = errors[-1]
            return CellOutcome("error", last["ename"], last["evalue"], tuple(last["traceback"]))
        ename = STATUS_ERRORS.get(turn.status, "Error")
        return self._fail(sink, ename, turn.message or turn.status)

    def _fail(
        self, sink: CellSink, ename: str, evalue: str, lines: list[str] | None = None
    ) -> CellOutcome:
        shown = lines or [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]
        sink.error(ename, evalue, shown)
        return CellOutcome("error", ename, evalue, tuple(shown))


def keep_previous(path: Path) -> Path | None:
    """Move the session a previous kernel autosaved at `path` aside, to
    `<stem>.<its save time>.ipynb` beside it (numbered further if that exists), so a new session
    never overwrites it; returns where it went (None: there was none)."""
    try:
        saved = path.stat().st_mtime
    except FileNotFoundError:
        return None
    stamp = datetime.datetime.fromtimestamp(saved).strftime("%Y%m%d-%H%M%S")
    kept, number = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():
        number += 1
        kept = path.with_name(f"{path.stem}.{stamp}-{number}{path.suffix}")
    path.rename(kept)
    return kept


class KernelFrontend:
    """The session commands' Frontend in the kernel: text as stream output (warnings on
    stderr), code as highlighted displays, outputs as they come. No one can be asked."""

    prefix = PREFIX
    can_ask = False

    def __init__(self, runner: KernelRunner, sink: CellSink) -> None:
        self.runner, self.sink = runner, sink

    def show_text(self, text: str, style: TextStyle = "plain") -> None:
        self.sink.stream("stderr" if style in ("warning", "error") else "stdout", text + "\n")

    def show_code(self, code: str) -> None:
        self.sink.display(code_bundle(code))

    def live_code(self) -> _LiveCode:
        self.runner._phase = "generating"
        return _LiveCode(self.sink, self.runner._cancel)

    def begin_turn(self, number: int) -> None:
        self.runner._phase = "running"

    def output(self, output: dict[str, Any]) -> None:
        self.sink.output(output)

    def ask(self, question: str, default: str = "") -> str:
        raise ConfigError("a kernel cannot ask; use run=auto or run=never")

    def edit_code(self, code: str) -> str | None:
        raise ConfigError(f"write the new code on the lines after {PREFIX}edit N (in this cell)")

    def session_opened(self, session: Session) -> None:
        pass

    def progress(self, text: str) -> None:
        self.sink.stream("stdout", text + "\n")

    def ask_input(self, prompt: str, password: bool) -> str:
        raise ConfigError("the codegen kernel cannot answer input(); put the value in the code")


class _NoSink:
    """Where a frontend sends things before the first cell gives it a sink: nowhere."""

    def stream(self, name: str, text: str) -> None:
        pass

    def output(self, output: dict[str, Any]) -> None:
        pass

    def show_code(self, code: str, final: bool) -> None:
        pass

    def display(self, bundle: dict[str, str]) -> None:
        pass

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        pass


class _LiveCode:
    """Streams a step's code to the sink as it is written, at most every _SHOW_EVERY_S;
    raises GenerationStopped at the next piece once an interrupt is asked for."""

    def __init__(
        self,
        sink: CellSink,
        cancel: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink, self.cancel, self.clock = sink, cancel, clock
        self.pieces: list[str] = []
        self.shown_at = clock()
        sink.show_code("", final=False)

    def add(self, piece: str) -> None:
        if self.cancel.is_set():
            raise GenerationStopped
        self.pieces.append(piece)
        now = self.clock()
        if now - self.shown_at >= _SHOW_EVERY_S:
            self.sink.show_code("".join(self.pieces), final=False)
            self.shown_at = now

    def finish(self, code: str) -> None:
        """The final code; then GenerationStopped if an interrupt came while it was written
        (the code must not run)."""
        self.sink.show_code(code, final=True)
        if self.cancel.is_set():
            raise GenerationStopped
