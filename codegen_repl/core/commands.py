"""The session commands, implemented once for every front end.

`Commands` does what an input asks (a step, `!` code, `undo`, `edit N`, `mtpb N`, ...) on a
`Session` and shows what happened through a `Frontend`: show text, code and outputs, ask a
question (the shape of aider's `Commands(io)`). The terminal REPL and the `codegen` kernel are two
Frontends, so both get the same help table, the same validation and the same messages, spelled
with the front end's prefix (`/undo`, `%undo`). Turns are numbered from 1 everywhere. The
Frontend protocol, the command table and the parsers are in `frontend.py`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.core.frontend import (
    COMMAND_TABLE,
    SET_KEYS,
    Command,
    Frontend,
    LiveCode,
    help_text,
    parse,
    parse_edit,
    parse_mtpb,
    parse_turn_number,
    unknown_text,
)
from codegen_repl.core.notebook import new_session_path, written_here
from codegen_repl.core.outputs import compact_outputs
from codegen_repl.core.session import RunChoice, Session, Turn
from codegen_repl.core.settings import RunMode, apply_setting, run_mode_of
from codegen_repl.errors import CheckpointError, CodeGenError, ConfigError

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder

__all__ = ["COMMAND_TABLE", "SET_KEYS", "Command", "Commands", "Frontend", "help_text", "parse"]
RUN_QUESTION = "run it? [Enter] run · n no · e edit: "
KEEP_QUESTION = "keep the partial code? k keep · [Enter] drop: "


class Commands:
    """The session commands over one Frontend.

    Args:
        session: the current session (replaced by load, reset and mtpb).
        frontend: what shows the results and answers questions.
        run_mode: "ask" (confirm each step's code), "auto" or "never" (show it only).
        model_name: what `model` reports as loaded.
        load_decoder: loads a model by folder or hub id (`model NAME`).
        folder: where relative paths of save and load are, and new sessions go.
        mtpb_problems: a local MTPB file for `mtpb` (None: the cached one).
    """

    def __init__(
        self,
        session: Session,
        frontend: Frontend,
        run_mode: str = "ask",
        model_name: str = "",
        load_decoder: Callable[[str], Decoder] | None = None,
        folder: Path | None = None,
        mtpb_problems: Path | None = None,
    ) -> None:
        self.frontend = frontend
        self.session = session
        self.run_mode: RunMode = self._checked_mode(run_mode)
        self.model_name = model_name
        self.load_decoder = load_decoder or _open_decoder
        self.folder = folder or Path.cwd()
        self.mtpb_problems = mtpb_problems

    @property
    def session(self) -> Session:
        return self._session

    @session.setter
    def session(self, session: Session) -> None:
        """The current session: it tells the current front end (which the kernel replaces
        per cell) of replays as they go, and asks it for the input its code wants, where
        someone can answer."""
        self._session = session
        session.on_progress = session.executor.on_progress = self._progress
        session.on_input = self._ask_input if self.frontend.can_ask else None

    def _progress(self, text: str) -> None:
        self.frontend.progress(text)

    def _ask_input(self, prompt: str, password: bool) -> str:
        return self.frontend.ask_input(prompt, password)

    def handle(self, text: str) -> Turn | None:
        """One input as the front end's user typed it."""
        return self.run(parse(text, self.frontend.prefix))

    def run(self, command: Command) -> Turn | None:
        """Do what `command` asks; returns the turn it ran, if any. CodeGenErrors say what was
        wrong (the front end shows them); `exit` is the front end's to handle."""
        actions: dict[str, Callable[[str], Turn | None]] = {
            "empty": lambda _: None, "step": self.step, "user_code": self.user_code,
            "unknown": self._unknown, "help": self._help, "undo": self._undo,
            "retry": lambda _: self.step(self.session.prepare_retry()), "edit": self._edit,
            "run": self._run, "fix": lambda _: self.step(self.session.fix_step()),
            "code": self._code, "context": self._context, "model": self._model,
            "set": self._set, "save": self._save, "load": self._load, "reset": self._reset,
            "mtpb": self._mtpb, "exit": lambda _: None,
        }  # fmt: skip
        return actions[command.name](command.argument)

    # ------------------------------------------------------------------------- turns

    def step(self, text: str) -> Turn | None:
        """Generate the step's code (shown live), decide whether it runs, run and record it."""
        step = text.strip()
        if not step:
            raise ConfigError("the step is empty; describe what the next code should do")
        generated = self._generate(step)
        if generated is None:
            return None
        choice, code = self._decide(generated[0])
        number = len(self.session.turns) + 1
        self.frontend.begin_turn(number)
        turn = self.session.add_step(step, code, generated[1], self.frontend.output, choice)
        self.show_status(turn, number)
        return turn

    def user_code(self, code: str) -> Turn:
        if not code.strip():
            raise ConfigError("write the code after the `!`, e.g. !print(x)")
        number = len(self.session.turns) + 1
        self.frontend.begin_turn(number)
        turn = self.session.run_code(code, on_output=self.frontend.output)
        self.show_status(turn, number)
        return turn

    def _generate(self, step: str) -> tuple[str, float] | None:
        """The step's code and seconds, streamed live; None when Ctrl-C stopped it and the
        partial code was dropped."""
        live, pieces, started = self.frontend.live_code(), list[str](), time.perf_counter()

        def on_text(piece: str) -> None:
            pieces.append(piece)
            live.add(piece)

        try:
            code, seconds = self.session.generate(step, on_text)
        except KeyboardInterrupt:
            live.finish("".join(pieces))
            kept = self._keep_partial("".join(pieces))
            return None if kept is None else (kept, time.perf_counter() - started)
        except BaseException:
            live.finish("".join(pieces))  # no half-drawn view left behind
            raise
        live.finish(code)
        if self.session.warning:
            self.frontend.show_text(self.session.warning, "warning")
        if not code.strip():
            self.frontend.show_text("(the model wrote no code)", "note")
        return code, seconds

    def _keep_partial(self, partial: str) -> str | None:
        """After Ctrl-C stopped generation: the partial code, if the user keeps it."""
        show = self.frontend.show_text
        if not partial.strip():
            show("generation stopped", "warning")
            return None
        show("generation stopped; the partial code is above", "warning")
        answer = self._answer(KEEP_QUESTION, "")
        if answer in ("k", "keep", "y", "yes"):
            return partial.rstrip() + "\n"
        show("dropped", "note")
        return None

    def _decide(self, code: str) -> tuple[RunChoice, str]:
        """The run policy: run, skip (run=never) or decline, and the code (maybe edited)."""
        if self.run_mode != "ask":
            return ("run" if self.run_mode == "auto" else "skip"), code
        while True:
            answer = self._answer(RUN_QUESTION, "n")
            if answer == "e":
                try:
                    edited = self.frontend.ask("", code)
                except (KeyboardInterrupt, EOFError):
                    return "decline", code
                return "run", edited if edited.strip() else code
            if answer in ("", "y", "yes"):
                return "run", code
            if answer in ("n", "no"):
                return "decline", code
            self.frontend.show_text("answer Enter (run), n (do not run) or e (edit)")

    def _answer(self, question: str, otherwise: str) -> str:
        """The user's answer, lowercased; `otherwise` when no one can or will answer."""
        if not self.frontend.can_ask:
            return otherwise
        try:
            return self.frontend.ask(question, "").strip().lower()
        except (KeyboardInterrupt, EOFError):
            return otherwise

    def show_status(self, turn: Turn, number: int) -> None:
        """What became of a turn, when its outputs do not say it."""
        show, prefix = self.frontend.show_text, self.frontend.prefix
        if turn.status == "skipped":
            show(f"(not run: run=never; {prefix}set run=auto runs the next steps, "
                 f"{prefix}run {number} runs this one)", "note")  # fmt: skip
        elif turn.status == "declined":
            show(f"(declined: not run, and not part of the program; {prefix}run {number} "
                 "runs it)", "note")  # fmt: skip
        elif turn.status not in ("ok", "error"):
            show(f"[{turn.status}]", "warning")
        if turn.message:
            show(turn.message, "note")

    def show_turns(self, turns: list[Turn], first: int, compact: bool = False) -> None:
        """Turns as they were recorded, numbered: in full after /edit, compactly (outputs cut
        to their head and tail with a count of the lines left out, a traceback to its last
        line) on /load and resume, where they are old."""
        for number, turn in enumerate(turns, start=first):
            title = turn.step if turn.step is not None else "(your code)"
            self.frontend.show_text(f"[{number}] {title}", "title")
            self.frontend.show_code(turn.code)
            self.frontend.begin_turn(number)
            for output in compact_outputs(turn.outputs) if compact else turn.outputs:
                self.frontend.output(output)
            self.show_status(turn, number)

    # ------------------------------------------------------------------------- commands

    def _help(self, _: str) -> None:
        self.frontend.show_text(help_text(self.frontend.prefix))

    def _unknown(self, word: str) -> None:
        raise ConfigError(unknown_text(word, self.frontend.prefix))

    def _undo(self, _: str) -> None:
        number = len(self.session.turns)
        try:
            dropped = self.session.undo()
        except KeyboardInterrupt:  # before the undo began, or just after it ended
            if len(self.session.turns) == number:
                self.frontend.show_text(f"interrupted: nothing was undone (turn {number} and "
                                        "the kernel are as they were)", "warning")  # fmt: skip
                return
            dropped = None
        if dropped is None and len(self.session.turns) == number:
            self.frontend.show_text("nothing to undo")
            return
        self.frontend.show_text(f"undone: turn {number}"
                                + (f" ({dropped.title})" if dropped else ""))  # fmt: skip
        self._show_notice()

    def _edit(self, argument: str) -> None:
        number, code = parse_edit(argument, self.frontend.prefix)
        turn = self.session.turn(len(self.session.turns) if number is None else number)
        number = self.session.turns.index(turn) + 1
        if code is None:
            code = self.frontend.edit_code(turn.code)
        if code is None or not code.strip():
            self.frontend.show_text("edit cancelled")
            return
        later = self.session.edit(number, code)
        self._show_notice()
        self.show_turns(later, number)

    def _run(self, argument: str) -> Turn:
        number = parse_turn_number(argument, self.frontend.prefix, "run")
        turn = self.session.turn(len(self.session.turns) if number is None else number)
        number = self.session.turns.index(turn) + 1
        self.frontend.show_text(f"[{number}] {turn.title}", "title")
        self.frontend.begin_turn(number)
        self.session.run_turn(number, self.frontend.output)
        self.show_status(turn, number)
        return turn

    def _code(self, _: str) -> None:
        if not self.session.program().strip() and not self.session.turns:
            self.frontend.show_text("(the program is empty)")
            return
        self.frontend.show_code(numbered_program(self.session, self.frontend.prefix))

    def _context(self, _: str) -> None:
        program, decoder = self.session.program(), self.session.decoder
        self.frontend.show_code(program)
        new = self.session.settings.sample.max_new_tokens
        self.frontend.show_text(
            f"{decoder.count_tokens(program)} tokens of {decoder.max_context}; the next step's "
            f"comment line and up to {new} new tokens come after it",
            "note",
        )

    def _model(self, argument: str) -> None:
        """Load another model; the session, its kernel and its turns stay."""
        if not argument:
            raise ConfigError(f"{self.frontend.prefix}model needs a checkpoint folder or a hub "
                              f"id (now: {self.model_name})")  # fmt: skip
        self.frontend.show_text(f"loading {argument} ...", "note")
        try:
            decoder = self.load_decoder(argument)
        except CodeGenError:
            raise
        except Exception as error:
            raise CheckpointError(f"could not load the model {argument}: {error}") from error
        self.session.decoder, self.model_name = decoder, argument
        self.frontend.show_text(f"model: {argument}")

    def _set(self, argument: str) -> None:
        if not argument:
            for key in SET_KEYS:
                self.frontend.show_text(f"{key} = {self.setting(key)}")
            return
        settings, mode = apply_setting(
            self.session.settings, self.run_mode, argument, self.frontend.prefix
        )
        self.run_mode = self._checked_mode(mode)
        self.session.settings = settings
        key = argument.partition("=")[0].strip()
        self.frontend.show_text(f"{key} = {self.setting(key)}")

    def setting(self, key: str) -> object:
        """The current value of a `set` key."""
        if key == "run":
            return self.run_mode
        if key == "timeout":
            return self.session.settings.timeout
        return getattr(self.session.settings.sample, key)

    def _checked_mode(self, mode: str) -> RunMode:
        if mode == "ask" and not self.frontend.can_ask:
            raise ConfigError("this front end cannot ask before running a step; use run=auto or "
                              "run=never")  # fmt: skip
        return run_mode_of(mode)

    def _save(self, argument: str) -> None:
        if not argument and self.session.path is None:
            raise ConfigError(f"this session has no file; use {self.frontend.prefix}save "
                              "PATH.ipynb or PATH.py")  # fmt: skip
        path = self._path(argument) if argument else None
        self.frontend.show_text(f"saved to {self.session.save(path)}")

    def _load(self, argument: str) -> None:
        if not argument:
            raise ConfigError(f"use {self.frontend.prefix}load PATH.ipynb")
        path, old = self._path(argument), self.session
        new_path = None
        if path.exists() and not written_here(path):
            new_path = new_session_path(path.parent)
            self._confirm_foreign(path, new_path)
        self._switch(Session.open(path, old.decoder, old.executor, self._progress, new_path))
        as_new = f", as a new session {new_path}" if new_path else ""
        self.frontend.show_text(f"loaded {path}: {_count(len(self.session.turns), 'turn')}{as_new}")
        self.show_turns(self.session.turns, 1, compact=True)
        self._show_notice()

    def _confirm_foreign(self, path: Path, new_path: Path) -> None:
        """A notebook this tool did not write is opened as the first turns of a new session
        file (it is never rewritten), where the user agrees (a kernel cannot ask: it does)."""
        question = (f"{path.name} was not written by codegen-repl: open its code cells as the "
                    f"first turns of a new session {new_path.name} (they run now)? [Enter] yes "
                    "· n no: ")  # fmt: skip
        if self._answer(question, "y") in ("n", "no"):
            raise ConfigError(f"{path} not opened")

    def _reset(self, _: str) -> None:
        old = self.session
        old.executor.restart()
        path = None if old.path is None else new_session_path(old.path.parent)
        self._switch(Session(old.decoder, old.executor, path, old.settings))
        self.session.save()
        self.frontend.show_text(f"new session: {path or '(no file)'}")

    def _mtpb(self, argument: str) -> None:
        """Play an MTPB problem turn by turn in a fresh session (restarted kernel, no earlier
        turns, so the score is the problem's alone), then show MTPB's verdict."""
        from codegen_repl.evals import mtpb

        request = parse_mtpb(argument, self.frontend.prefix)
        given = Path(request.problems).expanduser() if request.problems else None
        problem = mtpb.find_problem(mtpb.load_problems(given or self.mtpb_problems),
                                    request.problem)  # fmt: skip
        session = self._fresh_session(f"mtpb-{problem.id}-{request.index}")
        saved = f", saved in {session.path}" if session.path else ""
        self.frontend.show_text(f"MTPB problem {problem.id} ({problem.name}), input "
                                f"{request.index}: a fresh session{saved}", "title")  # fmt: skip
        live: list[LiveCode] = []
        streamed: list[str] = []

        def on_turn(number: int, prompt: str) -> None:
            self.frontend.show_text(f"[{number}] {prompt}", "title")
            streamed.clear()
            live.append(self.frontend.live_code())

        def on_text(piece: str) -> None:
            streamed.append(piece)
            live[-1].add(piece)

        def confirm(code: str) -> bool:
            live.pop().finish(code)
            choice = self._decide(code)[0]
            self.frontend.begin_turn(len(session.turns) + 1)
            return choice == "run"

        try:
            result = mtpb.replay(session, problem, request.index, on_turn, on_text,
                                 self.frontend.output, confirm)  # fmt: skip
        finally:
            while live:  # Ctrl-C or an error while a turn streamed
                live.pop().finish("".join(streamed))
        verdict = "PASS" if result.passed else "FAIL"
        self.frontend.show_text(f"{verdict}: MTPB problem {problem.id}; got {result.got}, "
                                f"expected {result.expected!r}", "title")  # fmt: skip
        if not result.passed and result.detail:
            self.frontend.show_text(result.detail, "note")

    def _fresh_session(self, name: str) -> Session:
        """A new session beside the current one (`<stem>.<name>.ipynb`), with the current model
        and settings (MTPB's prefix) in a restarted kernel."""
        old = self.session
        old.executor.restart()
        path = old.path
        if path is not None:
            path = path.with_name(f"{path.name.split('.')[0]}.{name}.ipynb")
        settings = dataclasses.replace(old.settings, prefix=MTPB_PREFIX)
        self._switch(Session(old.decoder, old.executor, path, settings))
        self.session.on_input = None  # a benchmark's code gets no typed input
        return self.session

    def _switch(self, session: Session) -> None:
        self.session = session
        self.frontend.session_opened(session)

    def _show_notice(self) -> None:
        if self.session.notice:
            self.frontend.show_text(missing_text(self.session, self.frontend.prefix), "warning")

    def _path(self, argument: str) -> Path:
        path = Path(argument).expanduser()
        return path if path.is_absolute() else self.folder / path


def numbered_program(session: Session, prefix: str = "/") -> str:
    """The program with a `# --- turn N ---` line before each turn; a declined turn is named
    (its code is not part of the program)."""
    parts = [session.settings.prefix]
    for number, turn in enumerate(session.turns, start=1):
        if not turn.in_program:
            parts.append(f"# --- turn {number}: declined, not run: {turn.title} "
                         f"({prefix}run {number} runs it) ---\n\n")  # fmt: skip
            continue
        mark = "" if turn.step is not None else " (your code)"
        parts.append(f"# --- turn {number}{mark} ---\n{turn.text.render()}")
    return "".join(parts)


def missing_text(session: Session, prefix: str = "/") -> str:
    """The session's notice, with how to give the kernel the state it lacks."""
    if not session.missing:
        return session.notice
    runs = " then ".join(f"{prefix}run {number}" for number in session.missing)
    return f"{session.notice}; to replay them: {runs}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _open_decoder(model: str) -> Decoder:
    from codegen_repl.core.decoding import open_decoder

    return open_decoder(model)
