"""The terminal REPL loop: read a line, let the commands act on it, never die.

`Repl.handle(line)` does one input and is what the tests drive; `Repl.loop(read_line)` is the
outer loop around a line reader (input.py). What a line does is `core.commands.Commands`' job;
`TerminalFrontend` is how the terminal shows it (through the Renderer) and answers its questions
(an injected `ask(question, default) -> str`, so tests script the answers).
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from codegen_repl.core.commands import Commands
from codegen_repl.core.frontend import TextStyle, parse
from codegen_repl.core.notebook import new_session_path
from codegen_repl.core.session import Session, Turn, count_of, turns_named
from codegen_repl.core.settings import DEFAULT_RUN_MODE, RunMode
from codegen_repl.errors import CodeGenError
from codegen_repl.paths import data_dir
from codegen_repl.repl.render import CodeStream, Renderer, help_view, images_folder

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder

Ask = Callable[[str, str], str]  # (question, text to edit) -> answer
AskInput = Callable[[str, bool], str]  # (prompt, password) -> the line for the code's input()
STYLES: dict[TextStyle, str] = {"plain": "", "title": "bold", "note": "dim", "warning": "yellow",
                                "error": "bold red"}  # fmt: skip


class TerminalFrontend:
    """The commands' Frontend on a rich Console: text, highlighted code, outputs, questions."""

    prefix = "/"
    can_ask = True

    def __init__(
        self,
        console: Console,
        renderer: Renderer,
        ask: Ask,
        edit_text: Callable[[str], str | None],
        ask_input: AskInput | None = None,
    ) -> None:
        from codegen_repl.repl import input as terminal_input

        self.console, self.renderer = console, renderer
        self._ask, self._edit_text = ask, edit_text
        self._ask_input = ask_input or terminal_input.plain_input

    def show_text(self, text: str, style: TextStyle = "plain") -> None:
        self.renderer.finish()
        self.console.print(Text(text, style=STYLES[style]))

    def show_code(self, code: str) -> None:
        self.renderer.finish()
        self.console.print(self.renderer.code_view(code))

    def show_help(self) -> None:
        """/help as a table that wraps in its columns (the kernel shows `help_text`)."""
        self.renderer.finish()
        self.console.print(help_view(self.prefix))

    def live_code(self) -> CodeStream:
        self.renderer.finish()
        return CodeStream(self.console, self.renderer)

    def begin_turn(self, number: int) -> None:
        self.renderer.begin_turn(number)

    def output(self, output: dict[str, Any]) -> None:
        self.renderer.output(output)

    def ask(self, question: str, default: str = "") -> str:
        self.renderer.finish()
        return self._ask(question, default)

    def edit_code(self, code: str) -> str | None:
        return self._edit_text(code)

    def session_opened(self, session: Session) -> None:
        self.renderer.images = images_folder(session.path)

    def progress(self, text: str) -> None:
        self.renderer.progress(text)

    def ask_input(self, prompt: str, password: bool) -> str:
        self.renderer.finish()
        return self._ask_input(prompt, password)


class Repl:
    """One session in a terminal.

    Args:
        session: the session to drive (replaced by /load, /reset and /mtpb).
        console: where everything is shown.
        run_mode: "ask" (confirm each generated snippet), "auto" or "never".
        ask: answers the run question and edits code inline (default: `input()`).
        edit_text: opens code in an editor and returns the new text (None: cancelled).
        model_name: shown in the toolbar.
        load_decoder: loads a model by folder or hub id, for /model.
        renderer: shows code and outputs (default: one on `console`, images beside the session).
        mtpb_problems: a local copy of MTPB for /mtpb (None: the cached, checked one).
        ask_input: answers the code's `input()` (default: `input()`, or getpass for passwords).
        resume_options: the options that name the model (`--model M`, `--server URL`), for the
            command that resumes the session, printed at the end.
    """

    def __init__(
        self,
        session: Session,
        console: Console,
        run_mode: str = "ask",
        ask: Ask | None = None,
        edit_text: Callable[[str], str | None] | None = None,
        model_name: str = "",
        load_decoder: Callable[[str], Decoder] | None = None,
        renderer: Renderer | None = None,
        mtpb_problems: Path | None = None,
        ask_input: AskInput | None = None,
        resume_options: str = "",
    ) -> None:
        from codegen_repl.repl import input as terminal_input

        self.resume_options = resume_options
        self.console = console
        self.renderer = renderer or Renderer(console, images_folder(session.path))
        self.frontend = TerminalFrontend(
            console, self.renderer, ask or terminal_input.plain_ask,
            edit_text or terminal_input.editor_edit, ask_input,
        )  # fmt: skip
        self.commands = Commands(
            session, self.frontend, run_mode, model_name, load_decoder, Path.cwd(), mtpb_problems
        )
        self._counted: tuple[tuple[str, int, int, int], int, int] = (("", 0, 0, 0), 0, 0)

    @property
    def session(self) -> Session:
        return self.commands.session

    @property
    def run_mode(self) -> RunMode:
        return self.commands.run_mode

    @property
    def model_name(self) -> str:
        return self.commands.model_name

    @property
    def load_decoder(self) -> Callable[[str], Decoder]:
        return self.commands.load_decoder

    @load_decoder.setter
    def load_decoder(self, load: Callable[[str], Decoder]) -> None:
        self.commands.load_decoder = load

    @property
    def mtpb_problems(self) -> Path | None:
        return self.commands.mtpb_problems

    @mtpb_problems.setter
    def mtpb_problems(self, path: Path | None) -> None:
        self.commands.mtpb_problems = path

    def loop(self, read_line: Callable[[], str]) -> None:
        """Read and handle lines until /exit or the end of input (Ctrl-D), then save. When
        nothing can be saved (a full disk), the prompt comes back once, so that the user can
        free space or `/save` elsewhere; leaving again then leaves without saving."""
        tried = False
        while True:
            self._read_lines(read_line)
            with contextlib.suppress(CodeGenError):  # a failed start matters no more
                self.session.stop_kernel_work()  # a replay behind the prompt is not waited out
            self.renderer.finish()
            try:
                path = self._save_on_exit()
                break
            except CodeGenError as error:
                if tried:
                    self.frontend.show_text(f"error: {error}; left without saving", "error")
                    return
                tried, self.session.autosave_failed = True, True  # /save moves it, as below
                advice = ("free some space or /save PATH.ipynb elsewhere, then leave again "
                          "(leaving again as it is leaves without saving)")  # fmt: skip
                self.frontend.show_text(f"error: {error}; nothing was saved: {advice}", "error")
        if path is None:
            self.console.print("bye (this session has no file)")
            return
        options = f"{self.resume_options} " if self.resume_options else ""
        if self.run_mode != DEFAULT_RUN_MODE:  # a choice of `never` must outlive the session
            options += f"--run {self.run_mode} "
        resume = f"resume it with: {command_name()} {options}--session {shlex.quote(str(path))}"
        self.console.print(Text(f"saved {path}"), soft_wrap=True)  # paths are copied whole
        self.console.print(Text(resume, style="dim"), soft_wrap=True)

    def _read_lines(self, read_line: Callable[[], str]) -> None:
        while True:
            try:
                line = read_line()
            except KeyboardInterrupt:  # at the prompt: the line is cleared, nothing else
                continue
            except EOFError:
                return
            if not self.handle(line):
                return

    def _save_on_exit(self) -> Path | None:
        """The session's file, or (it cannot be written) a new one in the data folder's
        `unsaved/`. Raises ConfigError when neither can be written."""
        try:
            return self.session.save()
        except CodeGenError as error:  # e.g. the folder became read-only: keep them elsewhere
            path = new_session_path(data_dir() / "unsaved")
            self.frontend.show_text(f"error: {error}; saving to {path} instead", "error")
            return self.session.save(path)

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the REPL should end. Never raises."""
        command = parse(line)
        if command.name == "exit":
            return False
        try:
            self.commands.run(command)
        except CodeGenError as error:
            self.frontend.show_text(f"error: {error}", "error")
        except KeyboardInterrupt:
            self.frontend.show_text("interrupted", "warning")
        except Exception as bug:  # a bug must not cost the user the session
            self.frontend.show_text(f"internal error: {type(bug).__name__}: {bug}", "error")
        finally:
            self.renderer.finish()
        return True

    def show_turns(self, turns: list[Turn], first: int, compact: bool = False) -> None:
        """Recorded turns, numbered from `first` (on resume: 1, `compact`)."""
        self.commands.show_turns(turns, first, compact)

    def typing(self, text: str) -> None:
        """The input as typed so far (the terminal reader calls it as it changes): a step's
        text is prefilled behind the prompt (Session.prepare_next), so Enter finds little left
        to do. Commands and `!` code have nothing for the model."""
        command = parse(text, "/")
        if command.name == "step":
            self.session.prepare_next(command.argument)

    def toolbar(self) -> str:
        decoder = self.session.decoder
        if getattr(decoder, "loaded", True):
            tokens, left_out = self.context_size()
            context = f"context {tokens}/{decoder.max_context} tokens"
            if left_out:  # what the model gets is cut to fit its window
                context += f" ({count_of(left_out, 'older turn')} left out)"
        else:  # a BackgroundDecoder still loading: asking it would freeze the prompt
            context = "loading the model"
        busy = self.session.kernel_status  # its start or a resume's replay, behind the prompt
        if busy.startswith("restarting the kernel"):  # "... to replay 7 turns"
            busy = "restarting"
        kernel = busy or ("up" if self.session.executor.alive else "down")
        if not busy and self.session.missing:  # e.g. a resume's replay fell short
            kernel += f" (lacks the state of {turns_named(self.session.missing)})"
        count = len(self.session.turns)
        turns = f"{count} turn" if count == 1 else f"{count} turns"
        return f" {self.model_name} · {context} · run {self.run_mode} · kernel {kernel} · {turns} "

    def context_size(self) -> tuple[int, int]:
        """The tokens of the context the model gets before the next step (the older turns
        that do not fit its window beside max_new_tokens are cut: `Session.fitted_context`),
        and how many turns are left out."""
        session = self.session
        decoder, new = session.decoder, session.settings.sample.max_new_tokens
        key = (session.program(), id(decoder), decoder.max_context, new)
        if self._counted[0] != key:  # the toolbar asks often; fit and tokenize only on change
            text, left_out = session.fitted_context()
            self._counted = (key, decoder.count_tokens(text), left_out)
        return self._counted[1], self._counted[2]


def command_name() -> str:
    """How to start this command again, for the resume line it prints: `codegen-repl` where that
    name on PATH is the program running; else the path it was started by, as typed (the README's
    install does not put `.venv/bin` on PATH, so `codegen-repl` alone was "command not found"),
    or `python -m codegen_repl`."""
    started = Path(sys.argv[0])
    if started.name == "__main__.py" and started.parent.name == "codegen_repl":
        return f"{shlex.quote(sys.executable)} -m codegen_repl"
    if started.name != "codegen-repl":
        return "codegen-repl"  # not run as the command (a Repl driven in another program)
    found = shutil.which("codegen-repl")
    if found is not None and Path(found).resolve() == started.resolve():
        return "codegen-repl"
    return shlex.quote(str(started))
