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
does (the kernel is rebuilt from the turns before it, the later turns that ran run again); the
cell id is saved with the turn, so this holds after `%load` too. A cell without one adds a turn
each time, and says so. The autosaved session never overwrites the one a previous kernel left:
that one is kept under a numbered name (and after a rename, the old name's file is named). The
kernel's notes go to stderr, apart from the program's stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
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
from codegen_repl.core.notebook import NOTEBOOK_KEY
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
        kernel_id: the Jupyter kernel's id (its connection file's name; a restart keeps it),
            saved with the session so that a kernel restarted under a renamed notebook names
            the file its predecessor wrote; "" for none.
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
    kernel_id: str = ""

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
        # A cell handed to the worker waits there behind the start (`expect_cell`): an
        # interrupt meanwhile stops it before it begins.
        self._lock = threading.RLock()  # reentrant: the kernel's SIGINT handler reads under it
        self._waiting = self._stopped_waiting = False
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
            path = options.session_path
            if path is not None:
                path = self._say_previous(path)
            session = Session(self.decoder, self.executor, path, options.settings)
            session.kernel_id = options.kernel_id
            # no autosave although one was asked for: `%save PATH` moves the session there
            session.autosave_failed = path is None and options.session_path is not None
            session.prepare_next()  # the model prefills and compiles ahead (once loaded)
            self.commands = Commands(
                session, KernelFrontend(self, _NoSink()), options.run_mode, self.model_name,
                self._load, options.cwd,
            )  # fmt: skip
        return self.commands.session

    def _say_previous(self, path: Path) -> Path | None:
        """Keep the previous kernel's session (`keep_previous`) and say where it is; where
        there is none at `path` but this kernel (before a restart, under the notebook's old
        name) saved another one beside it, name that one. Returns where this session autosaves:
        `path`, or None (and a note says why and what to do) when the previous one cannot be
        kept aside, or `path` cannot be looked at (its folder is a file, or unreadable)."""
        shown = self._relative(path)
        try:
            kept = keep_previous(path)
        except OSError as error:  # a new session must neither overwrite that one nor fail
            why = f"{error.strerror or error}: {self._relative(Path(error.filename or path))}"
            self._notes.append(f"the autosave is off: the file of the previous kernel's session "
                               f"cannot be checked or kept aside ({why}); {PREFIX}save "
                               "PATH.ipynb saves this session there, and it autosaves there from "
                               "then on")  # fmt: skip
            return None
        if kept is not None:
            kept = self._relative(kept)
            self._notes.append(f"the session of the previous kernel is kept as {kept}; this "
                               f"one autosaves to {shown}")  # fmt: skip
            return path
        renamed = saved_by(path.parent, self.options.kernel_id, besides=path)
        if renamed is not None:
            self._notes.append(
                f"the previous kernel autosaved to {self._relative(renamed)} (the notebook's "
                f"name then); this one autosaves to {shown}; {PREFIX}load "
                f"{self._relative(renamed)} resumes that session"
            )
        return path

    def _relative(self, path: Path) -> Path:
        """`path` as `%load` takes it: relative to the notebook's folder, where it is in it."""
        return path.relative_to(self.options.cwd) if path.is_relative_to(self.options.cwd) else path

    @property
    def cell_number(self) -> int:
        """Counts the cells run so far; identifies the one running now (or waiting to run:
        `expect_cell`)."""
        with self._lock:
            return self._cell_number + int(self._waiting)

    def interrupt(self, cell: int | None = None) -> None:
        """Stop the generation or interrupt the running code, or stop a cell still waiting to
        begin (`expect_cell`); nothing when idle, or when `cell` (a cell_number read when the
        interrupt came) has ended since."""
        with self._lock:
            if cell is not None and cell != self._cell_number + int(self._waiting):
                return
            if self._waiting:
                self._stopped_waiting = True
                return
        phase = self._phase
        if phase is None:
            return
        self._cancel.set()
        if phase == "running":
            session = self.session
            if session is not None:
                session.request_stop()  # a replay (%undo, %edit, %load) stops, interrupted
            if session is None or not session.replaying:
                self.executor.interrupt()

    def expect_cell(self) -> None:
        """A cell is on its way to `run_cell` (from another thread): an `interrupt` before it
        begins (it waits for the child kernel's start) stops it then, before it does anything."""
        with self._lock:
            self._waiting, self._stopped_waiting = True, False

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
        with self._lock:
            self._cell_number += 1
            stopped, self._waiting, self._stopped_waiting = self._stopped_waiting, False, False
        self._cancel.clear()
        if stopped:
            why = "interrupted before the cell began (the kernel was still starting)"
            return self._fail(sink, "KeyboardInterrupt", f"{why}: nothing ran; run it again")
        try:
            cell = parse_cell(source)
            if cell.kind == "empty":
                return OK
            if cell.kind == "code" and not cell.code.strip():  # `%%python` or `!` alone
                sink.stream("stderr", f"nothing to run: write the code after the ! or on the "
                            f"lines below {PREFIX}{PREFIX}python\n")  # fmt: skip
                return OK
            self.start()
            assert self.commands is not None
            self.commands.frontend = KernelFrontend(self, sink)
            while self._notes:
                sink.stream("stderr", self._notes.pop(0) + "\n")
            if cell.kind != "magics":
                try:
                    turn = self._turn_cell(cell, sink, cell_id)
                finally:  # as `Commands.run` does after a command: a failed autosave, told
                    self.commands.show_background_news()
                return self._outcome(turn, sink)
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
        number = next((at for at, turn in enumerate(session.turns, 1)
                       if cell_id and turn.cell_id == cell_id), None)  # fmt: skip
        if number is not None:
            replace = commands.replace_step if cell.kind == "step" else commands.replace_code
            return replace(number, cell.step or cell.code)
        if cell_id == "":
            self._say_no_cell_id(cell, sink)
        elif cell_id is not None:
            self._say_same_as(cell, sink)
        add = commands.step if cell.kind == "step" else commands.user_code
        session.cell_id = cell_id or ""  # the new turn is this cell's (saved with it)
        try:
            return add(cell.step or cell.code)
        finally:
            session.cell_id = ""

    def _magic(self, magic: Magic, sink: CellSink) -> Turn | None:
        """One magic line; the cell whose step `%retry` samples again owns the new turn."""
        assert self.commands is not None
        if magic.name in ("retry", "fix", "mtpb"):
            self._say_loading(sink)
        return self.commands.run(Command(magic.name, magic.argument))  # %retry: the same cell's

    def _say_loading(self, sink: CellSink) -> None:
        assert self.commands is not None
        if not getattr(self.commands.session.decoder, "loaded", True):
            sink.stream("stderr", f"loading the model {self.commands.model_name} (the first "
                        "step waits for it) ...\n")  # fmt: skip

    def _same_as(self, cell: Cell) -> int | None:
        """The number of the last turn with this cell's step (or code), if one has it."""
        assert self.commands is not None
        turns = self.commands.session.turns
        for number in range(len(turns), 0, -1):
            turn = turns[number - 1]
            if (turn.step == cell.step) if cell.kind == "step" else (turn.code == cell.code):
                return number
        return None

    def _say_same_as(self, cell: Cell, sink: CellSink) -> None:
        """A cell this session has no turn of (a `%load`ed session from another notebook, or
        one saved before cell ids were kept) whose step is a turn's: it does not replace it."""
        assert self.commands is not None
        same = self._same_as(cell)
        if same is not None:
            adds = len(self.commands.session.turns) + 1
            sink.stream("stderr", f"(this cell made no turn of this session: it adds turn {adds}, "
                        f"although turn {same} has the same "
                        f"{'step' if cell.kind == 'step' else 'code'}; {PREFIX}drop {same} "
                        "deletes that one)\n")  # fmt: skip

    def _say_no_cell_id(self, cell: Cell, sink: CellSink) -> None:
        """On the first step cell, and on any cell that repeats a turn: without cell ids, a
        cell run again cannot be told from a new one."""
        assert self.commands is not None
        turns = self.commands.session.turns
        repeated = self._same_as(cell) is not None
        first = cell.kind == "step" and not self._told_no_id
        if not (first or repeated):
            return
        self._told_no_id = self._told_no_id or cell.kind == "step"
        sink.stream(
            "stderr",
            f"(this front end sent no cell id: the cell adds turn "
            f"{len(turns) + 1}, even if it ran before; {PREFIX}drop N deletes a turn)\n",
        )

    def _outcome(self, turn: Turn | None, sink: CellSink) -> CellOutcome:
        """The execute_reply for a cell whose last turn is `turn` (None: no turn ran)."""
        session = self.session
        if turn is None or turn.status in ("ok", "skipped", "declined"):
            stopped = self._cancel.is_set() and (turn is None or turn.status != "ok")
            if stopped and session is not None and session.notice:  # a replay cut short
                return self._fail(sink, "KeyboardInterrupt", session.notice)
            return OK
        errors = [output for output in turn.outputs if output.get("output_type") == "error"]
        if errors:  # shown already; a timeout is named so, not by the KeyboardInterrupt it sent
            last = errors[-1]
            ename, evalue = last["ename"], last["evalue"]
            if turn.status == "timeout":
                ename, evalue = STATUS_ERRORS["timeout"], turn.message or evalue
            return CellOutcome("error", ename, evalue, tuple(last["traceback"]))
        ename = STATUS_ERRORS.get(turn.status, "Error")
        # the status line above gave the whole message: the error names its first part only
        return self._fail(sink, ename, (turn.message or turn.status).split("; ")[0])

    def _fail(
        self, sink: CellSink, ename: str, evalue: str, lines: list[str] | None = None
    ) -> CellOutcome:
        shown = lines or [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]
        sink.error(ename, evalue, shown)
        return CellOutcome("error", ename, evalue, tuple(shown))


def saved_by(folder: Path, kernel_id: str, besides: Path, newest: int = 20) -> Path | None:
    """The newest session notebook in `folder` (other than `besides`) that kernel `kernel_id`
    autosaved (our metadata's `kernel_id`), among the `newest` files there; None: none (or no
    id). Only those are read, so a crowded folder costs no time at the start."""
    if not kernel_id:
        return None
    candidates = [path for path in folder.glob("*.ipynb") if path != besides]
    with_times = []
    for path in candidates:
        with contextlib.suppress(OSError):  # gone or unreadable meanwhile: not ours to name
            with_times.append((path.stat().st_mtime, path))
    for _, path in sorted(with_times, reverse=True)[:newest]:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))["metadata"][NOTEBOOK_KEY]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(meta, dict) and meta.get("kernel_id") == kernel_id:
            return path
    return None


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
        """A command's answer (plain, title) on stdout; the kernel's notes and warnings about
        the work on stderr, as tools write progress, so they never merge into one block with
        the program's own stdout (Jupyter joins consecutive stream outputs of one name)."""
        self.sink.stream("stdout" if style in ("plain", "title") else "stderr", text + "\n")

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
        session.kernel_id = self.runner.options.kernel_id  # `%load`ed: this kernel saves it now

    def progress(self, text: str) -> None:
        self.sink.stream("stderr", text + "\n")  # a note (see show_text)

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
