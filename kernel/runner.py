"""The blocking half of the `codegen` kernel: one Session, its child kernel and its model.

`KernelRunner.run_cell` does what a parsed cell asks (generate and run a step, run the user's
code, a magic) and reports everything through a `Frontend`; the kernel (kernel.py) calls it in
a worker thread and turns the Frontend calls into Jupyter messages. `interrupt` may be called
from any thread: it stops a generation (between streamed pieces) or interrupts the child kernel.
The model loads in the background from the start; a cell that needs it waits for it, and a load
that failed is reported in that cell (the kernel stays up; `%model NAME` loads another).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from codegen_repl.core.commands import apply_setting
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session, SessionSettings, Turn
from codegen_repl.errors import CheckpointError, CodeGenError, ConfigError
from codegen_repl.kernel.cells import Magic, help_text, parse_cell
from codegen_repl.kernel.display import code_bundle

if TYPE_CHECKING:  # decoder.py imports JAX: the kernel does that in the background, not here
    from codegen_repl.core.decoding import Decoder
    from codegen_repl.model.sample_params import SampleParams

LoadDecoder = Callable[[str], "Decoder"]
STATUS_ERRORS = {
    "interrupted": "KeyboardInterrupt",
    "timeout": "TimeoutError",
    "died": "KernelDied",
}
KERNEL_RUN_MODES = ("auto", "never")
_SHOW_EVERY_S = 0.1  # streamed code is redrawn at most this often


class Frontend(Protocol):
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
    """

    model: str
    cwd: Path
    server: str | None = None
    api_key: str | None = None
    dtype: str | None = None
    session_path: Path | None = None
    settings: SessionSettings = dataclasses.field(default_factory=SessionSettings)
    run_mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.model and not self.server:
            raise ConfigError("give a model (a checkpoint folder or hub id) or a server URL")
        if self.run_mode not in KERNEL_RUN_MODES:
            raise ConfigError(f"run must be one of {', '.join(KERNEL_RUN_MODES)} in the kernel, "
                              f"got {self.run_mode!r}")  # fmt: skip


class GenerationStopped(Exception):
    """An interrupt arrived while the model was writing."""


class DeferredDecoder:
    """A Decoder that is still loading: every use waits for it, and a failed load raises a
    CodeGenError that says how to go on."""

    def __init__(self, future: concurrent.futures.Future[Decoder], name: str) -> None:
        self._future, self.name = future, name

    def get(self) -> Decoder:
        try:
            return self._future.result()
        except CodeGenError as error:
            raise type(error)(f"{error} (load another model with %model NAME)") from error
        except Exception as error:
            raise CheckpointError(
                f"could not load the model {self.name}: {type(error).__name__}: {error} "
                "(load another model with %model NAME)"
            ) from error

    @property
    def max_context(self) -> int:
        return self.get().max_context

    def count_tokens(self, text: str) -> int:
        return self.get().count_tokens(text)

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        return self.get().generate(prompt, sample)

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        return self.get().complete(prompt, sample)


class KernelRunner:
    """One session of the kernel. Cells run one at a time, in one worker thread."""

    def __init__(self, options: RunnerOptions, load_decoder: LoadDecoder | None = None) -> None:
        self.options = options
        self.run_mode = options.run_mode
        self._load = load_decoder or self._open_decoder
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-load")
        name = options.model or str(options.server)
        self.decoder: Decoder = DeferredDecoder(self._loader.submit(self._load, name), name)
        self.model_name = name
        self.executor = Executor(ExecutorConfig(cwd=options.cwd))
        self.session: Session | None = None
        self._cancel = threading.Event()
        self._phase: str | None = None  # "generating" | "running" | None
        self._cell_number = 0

    def _open_decoder(self, model: str) -> Decoder:
        from codegen_repl.core.decoding import open_decoder

        options = self.options
        return open_decoder(
            model, server=options.server, api_key=options.api_key, dtype=options.dtype
        )

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> Session:
        """Start the child kernel and the session (again, after a failed start)."""
        if self.session is None:
            self.executor.start()
            self.session = Session(
                self.decoder, self.executor, self.options.session_path, self.options.settings
            )
        return self.session

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
            self.executor.interrupt()

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown()

    # ------------------------------------------------------------------------- cells

    def run_cell(self, source: str, frontend: Frontend) -> CellOutcome:
        """Do what the cell asks; never raises (errors become the cell's error output)."""
        self._cell_number += 1
        self._cancel.clear()
        try:
            cell = parse_cell(source)
            if cell.kind == "empty":
                return OK
            session = self.start()
            if cell.kind == "step":
                return self._step(session, cell.step, frontend)
            if cell.kind == "code":
                return self._run_code(session, cell.code, frontend)
            for magic in cell.magics:
                outcome = self._magic(session, magic, frontend)
                if outcome.status != "ok":
                    return outcome
            return OK
        except GenerationStopped:
            note = "generation stopped; the partial code was dropped"
            return self._fail(frontend, "KeyboardInterrupt", note)
        except CodeGenError as error:
            return self._fail(frontend, type(error).__name__, str(error))
        except Exception as bug:  # a bug must not cost the user the kernel
            lines = traceback.format_exception(bug)
            return self._fail(frontend, "InternalError", f"{type(bug).__name__}: {bug}", lines)
        finally:
            self._phase = None

    def _step(self, session: Session, text: str, frontend: Frontend) -> CellOutcome:
        live = _LiveCode(frontend, self._cancel)
        self._phase = "generating"
        try:
            code, seconds = session.generate(text, on_text=live.add)
        except BaseException:
            live.finish("".join(live.pieces))  # no "writing code…" left behind
            raise
        live.finish(code)
        if session.warning:
            frontend.stream("stderr", session.warning + "\n")
        if not code.strip():
            frontend.stream("stderr", "(the model wrote no code)\n")
        if self._cancel.is_set():
            raise GenerationStopped
        self._phase = "running"
        turn = session.add_step(text, code, seconds, frontend.output, self.run_mode == "auto")
        return self._turn_outcome(turn, frontend)

    def _run_code(self, session: Session, code: str, frontend: Frontend) -> CellOutcome:
        if not code.strip():
            return OK
        self._phase = "running"
        return self._turn_outcome(session.run_code(code, frontend.output), frontend)

    def _turn_outcome(self, turn: Turn, frontend: Frontend) -> CellOutcome:
        if turn.message:
            frontend.stream("stderr", turn.message + "\n")
        if turn.status == "skipped":
            frontend.stream("stdout", "(not run: run=never; `%set run=auto` runs steps)\n")
        if turn.status in ("ok", "skipped"):
            return OK
        errors = [output for output in turn.outputs if output.get("output_type") == "error"]
        if errors:
            last = errors[-1]
            return CellOutcome("error", last["ename"], last["evalue"], tuple(last["traceback"]))
        ename = STATUS_ERRORS.get(turn.status, "Error")
        return self._fail(frontend, ename, turn.message or turn.status)

    def _fail(
        self, frontend: Frontend, ename: str, evalue: str, lines: list[str] | None = None
    ) -> CellOutcome:
        shown = lines or [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"]
        frontend.error(ename, evalue, shown)
        return CellOutcome("error", ename, evalue, tuple(shown))

    # ------------------------------------------------------------------------- magics

    def _magic(self, session: Session, magic: Magic, frontend: Frontend) -> CellOutcome:
        if magic.name == "retry":
            return self._step(session, session.prepare_retry(), frontend)
        if magic.name == "mtpb":
            return self._mtpb(magic.argument, frontend)
        actions: dict[str, Callable[[Session, str, Frontend], None]] = {
            "undo": self._undo,
            "code": self._code,
            "context": self._context,
            "model": self._model,
            "set": self._set,
            "save": self._save,
            "help": lambda _, __, frontend: frontend.stream("stdout", help_text() + "\n"),
        }
        actions[magic.name](session, magic.argument, frontend)
        return OK

    def _undo(self, session: Session, _: str, frontend: Frontend) -> None:
        dropped = session.undo()
        if dropped is None:
            frontend.stream("stdout", "nothing to undo\n")
            return
        what = dropped.step if dropped.step is not None else "your code"
        frontend.stream("stdout", f"undone: turn {len(session.turns)} ({what})\n")

    def _code(self, session: Session, _: str, frontend: Frontend) -> None:
        program = session.program()
        if program.strip():
            frontend.display(code_bundle(program))
        else:
            frontend.stream("stdout", "(the program is empty)\n")

    def _context(self, session: Session, _: str, frontend: Frontend) -> None:
        program = session.program()
        frontend.display(code_bundle(program))
        used, window = session.decoder.count_tokens(program), session.decoder.max_context
        new = session.settings.sample.max_new_tokens
        frontend.stream(
            "stdout",
            f"{used} tokens of {window}; the next step's comment line and up to {new} new "
            "tokens come after it\n",
        )

    def _model(self, session: Session, argument: str, frontend: Frontend) -> None:
        if not argument:
            raise ConfigError(f"%model needs a checkpoint folder or a hub id (now: "
                              f"{self.model_name})")  # fmt: skip
        frontend.stream("stdout", f"loading {argument} ...\n")
        try:
            decoder = self._load(argument)
        except CodeGenError:
            raise
        except Exception as error:
            raise CheckpointError(f"could not load the model {argument}: {error}") from error
        session.decoder, self.decoder, self.model_name = decoder, decoder, argument
        frontend.stream("stdout", f"model: {argument}\n")

    def _set(self, session: Session, argument: str, frontend: Frontend) -> None:
        settings, run_mode = apply_setting(session.settings, self.run_mode, argument)
        if run_mode not in KERNEL_RUN_MODES:
            raise ConfigError("a kernel cannot ask before running; use run=auto or run=never")
        session.settings, self.run_mode = settings, run_mode
        key = argument.partition("=")[0].strip()
        value: object = run_mode if key == "run" else None
        if key == "timeout":
            value = settings.timeout
        elif key != "run":
            value = getattr(settings.sample, key)
        frontend.stream("stdout", f"{key} = {value}\n")

    def _save(self, session: Session, argument: str, frontend: Frontend) -> None:
        if not argument and session.path is None:
            raise ConfigError("this session does not autosave; use %save PATH.ipynb or PATH.py")
        path = Path(argument).expanduser() if argument else None
        if path is not None and not path.is_absolute():
            path = self.options.cwd / path
        frontend.stream("stdout", f"saved to {session.save(path)}\n")

    def _mtpb(self, argument: str, frontend: Frontend) -> CellOutcome:
        """Play an MTPB problem turn by turn in a fresh session (new child kernel, no earlier
        turns, so the score is the problem's alone), then show MTPB's verdict."""
        from codegen_repl.evals import mtpb

        number, index, problems = parse_mtpb(argument)
        problem = mtpb.find_problem(mtpb.load_problems(problems), number)
        session = self._fresh_session(f"mtpb-{problem.id}-{index}")
        saved = f", saved in {session.path}" if session.path else ""
        frontend.stream("stdout", f"MTPB problem {problem.id} ({problem.name}), input {index}: "
                                  f"a fresh session{saved}\n")  # fmt: skip
        live: list[_LiveCode] = []

        def on_turn(turn: int, prompt: str) -> None:
            if live:
                live[-1].finish("".join(live[-1].pieces))
            frontend.stream("stdout", f"[{turn}] {prompt}\n")
            live.append(_LiveCode(frontend, self._cancel))

        self._phase = "running"  # an interrupt stops the generation and the code alike

        def on_text(piece: str) -> None:
            live[-1].add(piece)

        confirm = None if self.run_mode == "auto" else (lambda code: False)
        try:
            result = mtpb.replay(
                session, problem, index, on_turn, on_text, frontend.output, confirm
            )
        finally:
            if live:
                live[-1].finish("".join(live[-1].pieces))
        verdict = "passed" if result.passed else f"failed ({result.detail})"
        frontend.stream("stdout", f"MTPB problem {problem.id}: {verdict}; got {result.got}, "
                                  f"expected {result.expected!r}\n")  # fmt: skip
        return OK

    def _fresh_session(self, name: str) -> Session:
        """A new session with the current model and settings, in a restarted child kernel."""
        old = self.start()
        self.executor.restart()
        path = old.path
        if path is not None:
            path = path.with_name(f"{path.name.split('.')[0]}.{name}.ipynb")
        self.session = Session(old.decoder, self.executor, path, old.settings)
        return self.session


def parse_mtpb(argument: str) -> tuple[str, int, Path | None]:
    """`N [K] [--problems PATH]`: problem id, test input index, problems file (None: cached)."""
    words = argument.split()
    problems = None
    if "--problems" in words:
        at = words.index("--problems")
        if at + 1 >= len(words):
            raise ConfigError("--problems needs the path of an mtpb.jsonl file")
        problems = Path(words[at + 1]).expanduser()
        del words[at : at + 2]
    if not 1 <= len(words) <= 2 or not all(word.isdigit() for word in words):
        raise ConfigError("use %mtpb N [K] [--problems PATH]: problem N, test input K (from 0)")
    return words[0], int(words[1]) if len(words) == 2 else 0, problems


class _LiveCode:
    """Streams a step's code to the frontend as it is written, at most every _SHOW_EVERY_S;
    raises GenerationStopped at the next piece once an interrupt is asked for."""

    def __init__(
        self,
        frontend: Frontend,
        cancel: threading.Event,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.frontend, self.cancel, self.clock = frontend, cancel, clock
        self.pieces: list[str] = []
        self.shown_at = clock()
        frontend.show_code("", final=False)

    def add(self, piece: str) -> None:
        if self.cancel.is_set():
            raise GenerationStopped
        self.pieces.append(piece)
        now = self.clock()
        if now - self.shown_at >= _SHOW_EVERY_S:
            self.frontend.show_code("".join(self.pieces), final=False)
            self.shown_at = now

    def finish(self, code: str) -> None:
        self.frontend.show_code(code, final=True)
