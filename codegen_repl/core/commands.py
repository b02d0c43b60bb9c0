"""The session commands, implemented once for every front end.

`Commands` does what an input asks (a step, `!` code, `undo`, `edit N`, `mtpb N`, ...) on a
`Session` and shows what happened through a `Frontend`: show text, code and outputs, ask a
question (the shape of aider's `Commands(io)`). The terminal REPL and the `codegen` kernel are two
Frontends, so both get the same help table, the same validation and the same messages, spelled
with the front end's prefix (`/undo`, `%undo`). Turns are numbered from 1 everywhere. The
Frontend protocol, the command table and the parsers are in `frontend.py`; save, load, reset
and mtpb in `notebook_commands.py`.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from codegen_repl.core.frontend import (
    COMMAND_TABLE,
    SET_KEYS,
    Command,
    Frontend,
    help_text,
    parse,
    parse_edit,
    parse_turn_number,
    unknown_text,
)
from codegen_repl.core.notebook import FAILED, RUNS_AGAIN
from codegen_repl.core.notebook_commands import NotebookCommands
from codegen_repl.core.outputs import compact_outputs
from codegen_repl.core.session import RunChoice, Session, Turn, count_of
from codegen_repl.core.settings import RunMode, apply_setting, run_mode_of
from codegen_repl.errors import CheckpointError, CodeGenError, ConfigError

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder

__all__ = ["COMMAND_TABLE", "SET_KEYS", "Command", "Commands", "Frontend", "help_text", "parse"]
RUN_QUESTION = "run it? [Enter] run · n no · e edit: "
KEEP_QUESTION = "keep the partial code? k keep · [Enter] drop: "


class Commands(NotebookCommands):
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
        session.on_progress = self._progress
        session.executor.on_progress = session.progress  # behind the prompt: its status
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
            "drop": self._drop, "retry": self._retry, "edit": self._edit, "run": self._run,
            "fix": self._fix, "keep": self._keep, "code": self._code, "context": self._context,
            "model": self._model,
            "set": self._set, "save": self._save, "load": self._load, "reset": self._reset,
            "mtpb": self._mtpb, "exit": lambda _: None,
        }  # fmt: skip
        try:
            return actions[command.name](command.argument)
        finally:
            self.show_background_news()

    def show_background_news(self) -> None:
        """What went wrong out of sight during a command, told once: a replay behind the
        prompt that fell short, an autosave that could not write the file. `run` calls it
        after every command; a front end that calls `step`, `user_code` or `replace_*`
        itself calls it after them."""
        session = self.session
        if session.new_notice:
            session.new_notice = False
            self._show_notice()
        if session.save_error:
            self.frontend.show_text(
                f"{session.save_error} ({self.frontend.prefix}save PATH.ipynb writes it there, "
                "and the session autosaves there from then on)",
                "warning",
            )
            session.save_error = ""

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
            raise ConfigError("write the code after the !, e.g. !print(x)")
        number = len(self.session.turns) + 1
        self.frontend.begin_turn(number)
        turn = self.session.run_code(code, on_output=self.frontend.output)
        self.show_status(turn, number)
        return turn

    def replace_step(self, number: int, text: str) -> Turn | None:
        """Turn `number` gets a new step (a notebook cell run again, maybe edited): its code is
        generated from the turns before it (shown live), then `Session.replace` rebuilds the
        kernel, runs it and runs the later turns again. None when Ctrl-C dropped the code (turn
        `number` is then as it was)."""
        step = text.strip()
        if not step:
            raise ConfigError("the step is empty; describe what the next code should do")
        self._say_replacing(number)
        generated = self._generate(step, before=number - 1)
        if generated is None:
            return None
        choice, code = self._decide(generated[0])
        turn = self.session.step_turn(step, code, generated[1])
        return self._replace(number, turn, choice)

    def replace_code(self, number: int, code: str) -> Turn:
        """Turn `number` becomes code the user wrote (a `!` or `%%python` cell run again)."""
        if not code.strip():
            raise ConfigError("write the code after the !, e.g. !print(x)")
        self._say_replacing(number)
        return self._replace(number, Turn(None, code), "run")

    def _say_replacing(self, number: int) -> None:
        """Before a turn is replaced: how many later turns will run again (those that ran to
        the end: `RUNS_AGAIN`; an interrupted or unrun one is left as it is)."""
        later = sum(turn.status in RUNS_AGAIN for turn in self.session.turns[number:])
        after = f"; the {count_of(later, 'later turn')} that ran will run again" if later else ""
        self.frontend.show_text(f"this replaces turn {number} ({self.session.turn(number).title})"
                                f"{after}", "note")  # fmt: skip

    def _replace(self, number: int, turn: Turn, choice: RunChoice) -> Turn:
        self.frontend.begin_turn(number)
        before = _statuses(self.session.turns)
        later = self.session.replace(number, turn, self.frontend.output, choice)[1:]
        self.show_status(turn, number)
        self._show_notice()
        self._show_reruns(later, number + 1, before)
        return turn

    def _show_reruns(self, turns: list[Turn], first: int, before: dict[int, str]) -> None:
        """What changed in the later turns run again after a replaced or dropped turn (their
        outputs are not shown here: in a notebook they stay in their cells): a turn that ran
        without an error before (`before`: `_statuses` then) and failed now, or the reverse.
        A turn that failed before and fails again, or was not run again, is not named."""
        for number, turn in enumerate(turns, first):
            was = before.get(id(turn))
            if was == "ok" and turn.status in FAILED:
                errors = [o for o in turn.outputs if o.get("output_type") == "error"]
                why = f"{errors[-1]['ename']}: {errors[-1]['evalue']}" if errors else turn.status
                self.frontend.show_text(f"turn {number} ({turn.title}) now fails: {why}",
                                        "warning")  # fmt: skip
            elif was in FAILED and turn.status == "ok":
                self.frontend.show_text(f"turn {number} ({turn.title}) now runs without an "
                                        "error", "note")  # fmt: skip

    def _generate(self, step: str, before: int | None = None) -> tuple[str, float] | None:
        """The step's code and seconds, streamed live; None when Ctrl-C stopped it and the
        partial code was dropped, or when the model wrote no code (said here): the caller
        records and runs nothing then. `before`: see `Session.context`."""
        live, pieces, started = self.frontend.live_code(), list[str](), time.perf_counter()

        def on_text(piece: str) -> None:
            pieces.append(piece)
            live.add(piece)

        try:
            code, seconds = self.session.generate(step, on_text, before)
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
        if not code.strip():  # nothing to ask about, run or record
            self._say_no_code()
            return None
        return code, seconds

    def _say_no_code(self) -> None:
        """What to do when the model wrote nothing (the same step and seed write it again)."""
        tries = ["say the step in other words"]
        if self.session.settings.sample.temperature == 0:
            tries.append(f"{self.frontend.prefix}set temperature=0.8 to sample other code")
        self.frontend.show_text(f"the model wrote no code: nothing was recorded or run ("
                                f"{', '.join(tries)}, or write the code yourself: !CODE)",
                                "warning")  # fmt: skip

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
        if turn.status == "skipped" and not turn.message:
            show(f"(not run: run=never; {prefix}set run=auto runs the next steps, "
                 f"{prefix}run {number} runs this one)", "note")  # fmt: skip
            return
        if turn.status == "declined":
            show(f"(declined: not run, and not part of the program; {prefix}run {number} "
                 "runs it)", "note")  # fmt: skip
        # one line for one thing: `[interrupted] the cell was interrupted (turn 10 failed: ...)`
        marked = turn.status not in ("ok", "error", "declined")
        parts = [f"[{turn.status}]"] if marked else []
        parts += [turn.message] if turn.message else []
        if not turn.in_context and turn.in_program:
            why = "did not run" if turn.never_ran else "failed"
            parts.append(f"(turn {number} {why}: it is left out of the model's context; "
                         f"{prefix}keep {number} keeps it there, {prefix}drop {number} deletes "
                         "it)")  # fmt: skip
        if parts:
            show(" ".join(parts), "warning" if marked else "note")

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

    def _no_argument(self, name: str, argument: str, hint: str) -> None:
        """A command that acts on the last turn refuses an argument (never ignores it)."""
        if argument.strip():
            raise ConfigError(f"{self.frontend.prefix}{name} takes no argument ({hint})")

    def _help(self, _: str) -> None:
        """The commands' help: a front end with its own layout of `help_rows` shows it
        (`show_help`: the terminal's table that wraps in its columns), else `help_text`."""
        show_help = getattr(self.frontend, "show_help", None)
        if show_help is not None:
            show_help()
        else:
            self.frontend.show_text(help_text(self.frontend.prefix, self.frontend.can_ask))

    def _unknown(self, word: str) -> None:
        raise ConfigError(unknown_text(word, self.frontend.prefix))

    def _undo(self, argument: str) -> None:
        self._no_argument("undo", argument, f"{self.frontend.prefix}drop N deletes turn N")
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

    def _drop(self, argument: str) -> None:
        number = parse_turn_number(argument, self.frontend.prefix, "drop")
        turn = self.session.turn(len(self.session.turns) if number is None else number)
        number = self.session.turns.index(turn) + 1
        before = _statuses(self.session.turns)
        dropped, later = self.session.drop(number)
        self.frontend.show_text(
            f"deleted turn {number} ({dropped.title})"
            + (f"; turns from {number} on are renumbered" if later else "")
        )
        self._show_notice()
        self._show_reruns(later, number, before)

    def _keep(self, argument: str) -> None:
        number = parse_turn_number(argument, self.frontend.prefix, "keep")
        turn = self.session.turn(len(self.session.turns) if number is None else number)
        number = self.session.turns.index(turn) + 1
        self.session.keep_in_context(number)
        self.frontend.show_text(f"turn {number} ({turn.title}) is kept in the model's context")

    def _fix(self, _: str) -> Turn | None:
        """A step asking for a fix of the last error; the failed turn stays in the context (the
        model must see the code it fixes), unless no fix is recorded (the model wrote none)."""
        step, kept = self.session.fix_step(), 0
        for number in range(len(self.session.turns), 0, -1):
            turn = self.session.turn(number)
            if any(output.get("output_type") == "error" for output in turn.outputs):
                if turn.status in FAILED and not turn.kept:
                    self.session.keep_in_context(number)
                    kept = number
                break
        count = len(self.session.turns)
        try:
            return self.step(step)
        finally:
            if kept and len(self.session.turns) == count:  # no fix was recorded
                self.session.keep_in_context(kept, kept=False)

    def _retry(self, argument: str) -> Turn | None:
        """Resample the last step (the next seed) and say what changed. The new code replaces
        the last turn only once it is written: Ctrl-C while it streams changes nothing."""
        self._no_argument("retry", argument, "it retries the last step")
        settings = self.session.settings
        number, step = self.session.retry_step()
        before = self.session.turn(number).code
        generated = None
        try:
            generated = self._generate(step, before=number - 1)
        finally:
            if generated is None:  # Ctrl-C dropped the new code, or it failed: nothing changes
                self.session.settings = settings  # the seed as it was
        if generated is None:
            return None
        choice, code = self._decide(generated[0])
        turn = self._replace(number, self.session.step_turn(step, code, generated[1]), choice)
        seed = self.session.settings.sample.seed
        if turn.code == before:
            note = "the same code as before"
            if self.session.settings.sample.temperature == 0:
                note += (" (temperature 0 always writes the same; "
                         f"{self.frontend.prefix}set temperature=0.8 samples others)")  # fmt: skip
        else:
            note = f"new code: {count_of(lines_changed(before, turn.code), 'line')} changed"
        self.frontend.show_text(f"retried with seed {seed}: {note}", "note")
        return turn

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
        """What the model gets (older turns that do not fit its window are cut), counted."""
        context, left_out = self.session.fitted_context()
        decoder = self.session.decoder
        self.frontend.show_code(context)
        new = self.session.settings.sample.max_new_tokens
        cut = f"; {count_of(left_out, 'older turn')} left out to fit" if left_out else ""
        self.frontend.show_text(
            f"{decoder.count_tokens(context)} tokens of {decoder.max_context}{cut}; the next "
            f"step's comment line and up to {new} new tokens come after it",
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


def lines_changed(before: str, after: str) -> int:
    """Lines that differ between two versions of code: a line replaced counts once (not as
    one removed and one added), then the lines removed or added beyond it."""
    matcher = difflib.SequenceMatcher(a=before.splitlines(), b=after.splitlines(), autojunk=False)
    return sum(
        max(end_a - start_a, end_b - start_b)
        for tag, start_a, end_a, start_b, end_b in matcher.get_opcodes()
        if tag != "equal"
    )


def numbered_program(session: Session, prefix: str = "/") -> str:
    """The program with a `# --- turn N ---` line before each turn; a declined turn is named
    (its code is not part of the program), a step of several lines on the one comment line."""
    parts = [session.settings.prefix]
    for number, turn in enumerate(session.turns, start=1):
        title = " ".join(turn.title.split())  # the header stays one comment line
        if not turn.in_program:
            parts.append(f"# --- turn {number}: declined, not run: {title} "
                         f"({prefix}run {number} runs it) ---\n\n")  # fmt: skip
            continue
        if not turn.in_context:
            parts.append(f"# --- turn {number}: {turn.status}, left out of the context: "
                         f"{title} ({prefix}keep {number} keeps it) ---\n\n")  # fmt: skip
            continue
        mark = "" if turn.step is not None else " (your code)"
        parts.append(f"# --- turn {number}{mark} ---\n{turn.text.render()}")
    return "".join(parts)


def _statuses(turns: list[Turn]) -> dict[int, str]:
    """Each turn's status by the turn's identity (turns are renumbered by a drop)."""
    return {id(turn): turn.status for turn in turns}


def _open_decoder(model: str) -> Decoder:
    from codegen_repl.core.decoding import open_decoder

    return open_decoder(model)
