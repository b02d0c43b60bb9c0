"""The terminal REPL: read a line, act on it, show what happened, never die.

`Repl.handle(line)` does one input and is what the tests drive; `Repl.loop(read_line)` is
the outer loop around a line reader: prompt_toolkit on a terminal (`prompt_reader`), plain
`input()` otherwise (`plain_reader`). Answers to "run this code?" come from an injected
`ask(question, default) -> str`, so tests script them too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.text import Text

from codegen_repl.core.commands import (
    apply_setting,
    help_text,
    parse,
    parse_edit,
    parse_mtpb,
    unknown_text,
)
from codegen_repl.core.session import Session, SessionSettings, Turn
from codegen_repl.errors import CodeGenError, ConfigError
from codegen_repl.repl.render import THEME, Renderer, images_folder

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder

Ask = Callable[[str, str], str]  # (question, text to edit) -> answer
RUN_QUESTION = "run it? [Enter] run · n skip · e edit: "
KEEP_QUESTION = "keep the partial code? k keep · [Enter] drop: "


def plain_ask(question: str, default: str = "") -> str:
    """`input()` answers; an edit is read as lines up to an empty line (or the input's end)."""
    if not default:
        return input(question)
    print("new code, ended by an empty line:")
    lines: list[str] = []
    while True:
        try:
            line = input()
        except EOFError:
            break
        if not line.strip():
            break
        lines.append(line)
    return "\n".join(lines)


def new_session_path(folder: Path, now: Callable[[], datetime] = datetime.now) -> Path:
    """A fresh `session-<date>-<time>.ipynb` in `folder` (never an existing file)."""
    stem = now().strftime("session-%Y%m%d-%H%M%S")
    path, number = folder / f"{stem}.ipynb", 1
    while path.exists():
        number += 1
        path = folder / f"{stem}-{number}.ipynb"
    return path


class CodeStream:
    """Generated code shown live and highlighted while it streams (a context manager)."""

    def __init__(self, console: Console, renderer: Renderer) -> None:
        self.renderer, self.pieces = renderer, list[str]()
        self.live = Live(renderer.code_view(""), console=console, refresh_per_second=15,
                         vertical_overflow="visible")  # fmt: skip

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        self.live.update(self.renderer.code_view(self.text))

    def show(self, code: str) -> None:
        """The final code (the cut may have removed a streamed tail)."""
        self.live.update(self.renderer.code_view(code))

    def __enter__(self) -> CodeStream:
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.live.is_started:
            return
        self.live.stop()
        if not self.live.console.is_terminal:  # rich ends the last line only on a terminal
            self.live.console.line()


class Repl:
    """One session in a terminal.

    Args:
        session: the session to drive (replaced by /load and /reset).
        console: where everything is shown.
        run_mode: "ask" (confirm each generated snippet), "auto" or "never".
        ask: answers the run question and edits code inline.
        edit_text: opens code in an editor and returns the new text (None: cancelled).
        model_name: shown in the toolbar.
        load_decoder: loads a model by folder or hub id, for /model.
        renderer: shows code and outputs (default: one on `console`, images beside the session).
        mtpb_problems: a local copy of MTPB for /mtpb (None: the downloaded, checked one).
    """

    def __init__(
        self,
        session: Session,
        console: Console,
        run_mode: str = "ask",
        ask: Ask = plain_ask,
        edit_text: Callable[[str], str | None] | None = None,
        model_name: str = "",
        load_decoder: Callable[[str], Decoder] | None = None,
        renderer: Renderer | None = None,
        mtpb_problems: Path | None = None,
    ) -> None:
        self.session, self.console, self.ask = session, console, ask
        self.load_decoder = load_decoder or _load_local_decoder
        self.run_mode, self.model_name = run_mode, model_name
        self.edit_text = edit_text or _click_edit
        self.renderer = renderer or Renderer(console, images_folder(session.path))
        self.mtpb_problems = mtpb_problems
        self._counted: tuple[str, int] = ("", 0)
        apply_setting(session.settings, "ask", f"run={run_mode}")  # validates the mode

    # ------------------------------------------------------------------------- the loop

    def loop(self, read_line: Callable[[], str]) -> None:
        """Read and handle lines until /exit or the end of input (Ctrl-D)."""
        while True:
            try:
                line = read_line()
            except KeyboardInterrupt:  # at the prompt: the line is cleared, nothing else
                continue
            except EOFError:
                break
            if not self.handle(line):
                break
        self.session.save()
        self.console.print("bye")

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the REPL should end. Never raises."""
        command = parse(line)
        try:
            if command.name == "exit":
                return False
            self._dispatch(command.name, command.argument)
        except CodeGenError as error:
            self.console.print(Text(f"error: {error}", style="bold red"))
        except KeyboardInterrupt:
            self.console.print(Text("interrupted", style="yellow"))
        except Exception as bug:  # a bug must not cost the user the session
            self.console.print(Text(f"internal error: {type(bug).__name__}: {bug}", style="red"))
        finally:
            self.renderer.finish()
        return True

    def toolbar(self) -> str:
        used, window = self.context_tokens(), self.session.decoder.max_context
        kernel = "up" if self.session.executor.alive else "down"
        return (
            f" {self.model_name} · context {used}/{window} tokens · run {self.run_mode}"
            f" · kernel {kernel} · {len(self.session.turns)} turns "
        )

    def context_tokens(self) -> int:
        program = self.session.program()
        if self._counted[0] != program:  # the toolbar asks often; tokenize only on change
            self._counted = (program, self.session.decoder.count_tokens(program))
        return self._counted[1]

    def _dispatch(self, name: str, argument: str) -> None:
        actions: dict[str, Callable[[str], None]] = {
            "empty": lambda _: None,
            "step": self._step,
            "user_code": self._user_code,
            "help": lambda _: self.console.print(help_text(), markup=False, highlight=False),
            "unknown": lambda word: self.console.print(unknown_text(word), markup=False),
            "undo": self._undo,
            "retry": self._retry,
            "edit": self._edit,
            "run": self._rerun,
            "fix": lambda _: self._step(self.session.fix_step()),
            "model": self._model,
            "code": self._show_program,
            "context": self._context,
            "save": self._save,
            "load": self._load,
            "reset": self._reset,
            "mtpb": self._mtpb,
            "set": self._set,
        }
        actions[name](argument)

    # ------------------------------------------------------------------------- turns

    def _step(self, text: str) -> None:
        self.renderer.begin_turn(len(self.session.turns))
        started = time.perf_counter()
        code = self._generate(text)
        if code is None:
            return
        seconds = time.perf_counter() - started
        run, code = self._decide(code)
        self._show_status(self.session.add_step(text, code, seconds, self.renderer.output, run))

    def _generate(self, step: str) -> str | None:
        """Stream the step's code live; None when Ctrl-C stopped it."""
        stream = CodeStream(self.console, self.renderer)
        try:
            with stream:
                code, _ = self.session.generate(step, on_text=stream.add)
                stream.show(code)
        except KeyboardInterrupt:
            return self._keep_partial(stream.text)
        if self.session.warning:
            self.console.print(Text(self.session.warning, style="yellow"))
        if not code.strip():
            self.console.print(Text("(the model wrote no code)", style="dim"))
        return code

    def _keep_partial(self, partial: str) -> str | None:
        """After Ctrl-C stopped generation: the partial code, if the user keeps it."""
        if not partial.strip():
            self.console.print(Text("generation stopped", style="yellow"))
            return None
        self.console.print(Text("generation stopped; the partial code is above", style="yellow"))
        try:
            answer = self.ask(KEEP_QUESTION, "").strip().lower()
        except (KeyboardInterrupt, EOFError):
            answer = ""
        if answer in ("k", "keep", "y", "yes"):
            return partial.rstrip() + "\n"
        self.console.print(Text("dropped", style="dim"))
        return None

    def _decide(self, code: str) -> tuple[bool, str]:
        """The run policy: whether to run, and the code to keep (maybe edited)."""
        if self.run_mode != "ask":
            return self.run_mode == "auto", code
        while True:
            try:
                answer = self.ask(RUN_QUESTION, "").strip().lower()
                if answer == "e":
                    edited = self.ask("", code)
                    return True, edited if edited.strip() else code
            except (KeyboardInterrupt, EOFError):
                answer = "n"
            if answer in ("", "y", "yes"):
                return True, code
            if answer in ("n", "no"):
                return False, code
            self.console.print("answer Enter (run), n (skip) or e (edit)")

    def _user_code(self, code: str) -> None:
        if not code:
            raise ConfigError("write the code after the `!`, e.g. !print(x)")
        self.renderer.begin_turn(len(self.session.turns))
        self._show_status(self.session.run_code(code, on_output=self.renderer.output))

    def _show_status(self, turn: Turn) -> None:
        self.renderer.finish()
        if turn.status == "skipped":
            self.console.print(Text("(not run)", style="dim"))
        elif turn.status not in ("ok", "error"):
            self.console.print(Text(f"[{turn.status}]", style="yellow"))
        if turn.message:
            self.console.print(Text(turn.message, style="dim"))

    def show_turns(self, turns: list[Turn], first: int) -> None:
        for number, turn in enumerate(turns, start=first):
            title = turn.step if turn.step is not None else "(your code)"
            self.console.print(Text(f"[{number}] {title}", style="bold"))
            self.renderer.code(turn.code)
            self.renderer.begin_turn(number)
            self.renderer.outputs(turn.outputs)
            self._show_status(turn)

    # ------------------------------------------------------------------------- commands

    def _undo(self, _: str) -> None:
        dropped = self.session.undo()
        if dropped is None:
            self.console.print("nothing to undo")
        else:
            self.console.print(f"undone: turn {len(self.session.turns)}")

    def _retry(self, _: str) -> None:
        self._step(self.session.prepare_retry())

    def _edit(self, argument: str) -> None:
        index, code = parse_edit(argument, len(self.session.turns))
        if code is None:
            code = self.edit_text(self.session.turns[index].code)
        if code is None or not code.strip():
            self.console.print("edit cancelled")
            return
        later = self.session.edit(index, code)
        self.show_turns(later, index)

    def _rerun(self, _: str) -> None:
        turn = self.session.rerun_last()
        self.show_turns([turn], len(self.session.turns) - 1)

    def _show_program(self, _: str) -> None:
        program = self.session.program()
        empty = "(the program is empty)"
        self.console.print(self.renderer.code_view(program) if program.strip() else empty)

    def _context(self, _: str) -> None:
        self.console.print(self.renderer.code_view(self.session.program()))
        sample = self.session.settings.sample
        self.console.print(
            Text(
                f"{self.context_tokens()} tokens of {self.session.decoder.max_context}; "
                f"the next step's comment line and up to {sample.max_new_tokens} new tokens "
                "come after it",
                style="dim",
            )
        )

    def _save(self, argument: str) -> None:
        path = Path(argument).expanduser() if argument else None
        if path is None and self.session.path is None:
            raise ConfigError("this session has no file; use /save PATH.ipynb or PATH.py")
        self.console.print(f"saved to {self.session.save(path)}", markup=False)

    def _model(self, argument: str) -> None:
        """Load another model; the session, its kernel and its turns stay."""
        if not argument:
            raise ConfigError("/model needs a checkpoint folder or a hub id")
        self.session.decoder = self.load_decoder(argument)
        self.model_name = argument
        self.console.print(f"model: {argument}")

    def _load(self, argument: str) -> None:
        if not argument:
            raise ConfigError("use /load PATH.ipynb")
        path = Path(argument).expanduser()
        old = self.session
        self.session = Session.open(path, old.decoder, old.executor)
        self.renderer.images = images_folder(path)
        self.console.print(f"loaded {path}: {len(self.session.turns)} turns", markup=False)
        self.show_turns(self.session.turns, 0)

    def _reset(self, _: str) -> None:
        old = self.session
        folder = old.path.parent if old.path is not None else Path.cwd()
        old.executor.restart()
        path = new_session_path(folder) if old.path is not None else None
        self.session = Session(old.decoder, old.executor, path, old.settings)
        self.session.save()
        self.renderer.images = images_folder(path)
        self.console.print(f"new session: {path or '(no file)'}", markup=False)

    def _mtpb(self, argument: str) -> None:
        """Play an MTPB problem in a new session (the score is of that program alone)."""
        from codegen_repl.evals import mtpb

        number, index = parse_mtpb(argument)
        problem = mtpb.find_problem(mtpb.load_problems(self.mtpb_problems), number)
        self._reset("")
        self.session.settings = dataclasses.replace(self.session.settings, prefix=mtpb.PREFIX)
        self.console.print(Text(f"MTPB {problem.id}: {problem.name} (input {index})", "bold"))

        stream = CodeStream(self.console, self.renderer)

        def on_turn(number: int, prompt: str) -> None:
            nonlocal stream
            self.renderer.finish()
            self.renderer.begin_turn(len(self.session.turns))
            self.console.print(Text(f"[{number}] {prompt}", style="bold"))
            stream = CodeStream(self.console, self.renderer).__enter__()

        def confirm(code: str) -> bool:
            stream.show(code)
            stream.__exit__(None, None, None)
            return self._decide(code)[0]

        try:
            result = mtpb.replay(
                self.session, problem, index, on_turn=on_turn, on_text=lambda t: stream.add(t),
                on_output=self.renderer.output, confirm=confirm,
            )  # fmt: skip
        finally:
            stream.__exit__(None, None, None)  # Ctrl-C or an error while a turn streamed
        self.renderer.finish()
        verdict = Text("PASS", "bold green") if result.passed else Text("FAIL", "bold red")
        self.console.print(verdict, Text(f"expected {result.expected!r}, got {result.got}"))
        if not result.passed and result.detail:
            self.console.print(Text(result.detail, style="dim"))

    def _set(self, argument: str) -> None:
        settings, self.run_mode = apply_setting(self.session.settings, self.run_mode, argument)
        self.session.settings = settings
        key = argument.partition("=")[0].strip()
        value = self.run_mode if key == "run" else _setting_value(settings, key)
        self.console.print(f"{key} = {value}", markup=False)


def _setting_value(settings: SessionSettings, key: str) -> object:
    return settings.timeout if key == "timeout" else getattr(settings.sample, key)


def _load_local_decoder(model: str) -> Decoder:
    from codegen_repl.core.decoding import open_decoder

    return open_decoder(model)


def _click_edit(code: str) -> str | None:
    import click

    return click.edit(code, extension=".py")


# ----------------------------------------------------------------------------- line readers


def plain_reader(prompt: str = ">>> ") -> Callable[[], str]:
    """Lines from `input()`: for pipes and scripts (no history, no completion)."""
    return lambda: input(prompt)


def prompt_reader(repl: Repl, history: Path) -> Callable[[], str]:
    """prompt_toolkit: Enter submits, Alt-Enter (Esc Enter) inserts a newline, history in
    `history`, Ctrl-R search, completion of slash commands, a bottom toolbar."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    from codegen_repl.repl.input import SlashCompleter

    bindings = KeyBindings()

    @bindings.add("enter")
    def _submit(event) -> None:  # type: ignore[no-untyped-def]
        buffer = event.current_buffer
        state = buffer.complete_state
        choice = None
        if state is not None:  # the selected completion, or the only one offered
            only = state.completions[0] if len(state.completions) == 1 else None
            choice = state.current_completion or only
        if choice is not None and not buffer.text.endswith(choice.text):
            buffer.apply_completion(choice)
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _newline(event) -> None:  # type: ignore[no-untyped-def]
        event.current_buffer.insert_text("\n")

    history.parent.mkdir(parents=True, exist_ok=True)
    prompt: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)),
        completer=SlashCompleter(),
        complete_while_typing=True,
        key_bindings=bindings,
        multiline=True,
        bottom_toolbar=repl.toolbar,
        prompt_continuation="... ",
    )
    return lambda: prompt.prompt(">>> ")


def prompt_ask(question: str, default: str = "") -> str:
    """The run question on a terminal; with `default`, an inline multi-line editor."""
    from prompt_toolkit import prompt

    if not default:
        return prompt(question)
    return prompt(
        "", default=default, multiline=True, bottom_toolbar=" edit the code; Esc Enter runs it "
    )


# ----------------------------------------------------------------------------- `codegen-repl chat`


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """What `codegen-repl chat` was asked for (config.toml merged in by the CLI); None leaves a
    setting as the session has it."""

    model: str
    server: str | None = None
    api_key: str | None = None
    session: Path | None = None
    run_mode: str = "ask"
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    prefix: str | None = None
    dtype: str | None = None
    theme: str = THEME
    images: str = "auto"

    def __post_init__(self) -> None:
        apply_setting(SessionSettings(), "ask", f"run={self.run_mode}")
        self.apply(SessionSettings())  # a bad value fails before the model loads

    def open_decoder(self, model: str) -> Decoder:
        """`model` in this process, or asked of the server when there is one."""
        from codegen_repl.core.decoding import open_decoder

        return open_decoder(model, server=self.server, api_key=self.api_key, dtype=self.dtype)

    def apply(self, settings: SessionSettings) -> SessionSettings:
        given = {"temperature": self.temperature, "top_p": self.top_p,
                 "max_new_tokens": self.max_new_tokens}  # fmt: skip
        changes = {key: value for key, value in given.items() if value is not None}
        sample = dataclasses.replace(settings.sample, **changes)
        prefix = settings.prefix if self.prefix is None else self.prefix
        return dataclasses.replace(settings, sample=sample, prefix=prefix)


def history_path() -> Path:
    """The input history file, in the user's data folder."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(os.environ.get("CODEGEN_REPL_DATA", Path(base) / "codegen-repl")) / "history"


def run_chat(options: ChatOptions, console: Console | None = None) -> int:
    """Load the model, start the kernel, open or create the session, run the REPL.

    CodeGenErrors (no model, a bad session file) propagate for the CLI to report."""
    from codegen_repl.core.executor import Executor, ExecutorConfig

    console = console or Console()
    decoder = options.open_decoder(options.model)
    path = (options.session or new_session_path(Path.cwd())).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    show_banner(console, options, decoder, path)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    with Executor(ExecutorConfig(cwd=path.parent)) as executor:
        resumed = path.exists()
        session = Session.open(path, decoder, executor) if resumed else Session(decoder, executor)
        session.path, session.settings = path, options.apply(session.settings)
        session.save()
        ask = prompt_ask if interactive else plain_ask
        renderer = Renderer(console, images_folder(path), options.theme, options.images)
        repl = Repl(
            session, console, options.run_mode, ask=ask,
            model_name=options.model or str(getattr(decoder, "model", "")),
            load_decoder=options.open_decoder, renderer=renderer,
        )  # fmt: skip
        if resumed:
            repl.show_turns(session.turns, 0)
        console.print(Text("type a step, !code, or /help; Ctrl-D leaves", style="dim"))
        repl.loop(prompt_reader(repl, history_path()) if interactive else plain_reader())
    return 0


def show_banner(console: Console, options: ChatOptions, decoder: Decoder, path: Path) -> None:
    from codegen_repl.decoders.local import LocalDecoder

    if isinstance(decoder, LocalDecoder):
        import jax

        count = sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(decoder.params))
        device = jax.devices()[0]
        kind = getattr(device, "device_kind", "") or device.platform
        where = f"{count / 1e6:,.1f}M parameters · {device.platform.upper()} ({kind}) · "
        where += f"{decoder.dtype}"
        name = options.model
    else:  # asks the server first, so an unreachable one fails before anything is printed
        where = f"server {options.server} · context {decoder.max_context} tokens"
        name = getattr(decoder, "model", options.model)
    console.print(Text("codegen-repl", style="bold"), Text(f"· {name}", style="cyan"))
    console.print(Text(f"{where} · session {path}", style="dim"))
