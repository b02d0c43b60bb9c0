"""`codegen-repl chat`: the wiring of the terminal REPL. Load the model (or reach the server),
start the kernel, open or resume the session notebook, then run the loop (loop.py) with the
terminal's reader and answers (input.py) and renderer (render.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from codegen_repl.core.decoding import BackgroundDecoder
from codegen_repl.core.notebook import new_session_path, written_here
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.core.settings import (
    DEFAULT_IMAGES,
    DEFAULT_RUN_MODE,
    DEFAULT_THEME,
    apply_setting,
)
from codegen_repl.errors import CodeGenError
from codegen_repl.paths import data_dir
from codegen_repl.repl.loop import Repl
from codegen_repl.repl.render import Renderer, images_folder

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder

__all__ = ["ChatOptions", "Repl", "history_path", "run_chat", "show_banner"]


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """What `codegen-repl chat` was asked for (config.toml merged in by the CLI); None leaves a
    setting as the session has it."""

    model: str
    server: str | None = None
    api_key: str | None = None
    session: Path | None = None
    run_mode: str = DEFAULT_RUN_MODE
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    prefix: str | None = None
    dtype: str | None = None
    theme: str = DEFAULT_THEME
    images: str = DEFAULT_IMAGES
    context_window: int | None = None  # a server's, where it does not report one

    def __post_init__(self) -> None:
        apply_setting(SessionSettings(), "ask", f"run={self.run_mode}")
        self.apply(SessionSettings())  # a bad value fails before the model loads

    def open_decoder(self, model: str, background: str | None = None) -> Decoder:
        """`model` in this process (loading in the background when `background`, the hint a
        failed load ends with, is given), or asked of the server when there is one."""
        from codegen_repl.core.decoding import open_decoder

        return open_decoder(
            model, server=self.server, api_key=self.api_key, dtype=self.dtype,
            context_window=self.context_window, background=background,
        )  # fmt: skip

    def resume_options(self) -> str:
        """`--model M` and/or `--server URL`, and `--dtype D` when one was given: what the
        resume command needs to load the same model the same way."""
        named = [("--server", self.server), ("--model", self.model), ("--dtype", self.dtype)]
        return " ".join(f"{flag} {shlex.quote(value)}" for flag, value in named if value)

    def apply(self, settings: SessionSettings) -> SessionSettings:
        given = {"temperature": self.temperature, "top_p": self.top_p,
                 "max_new_tokens": self.max_new_tokens}  # fmt: skip
        changes = {key: value for key, value in given.items() if value is not None}
        sample = dataclasses.replace(settings.sample, **changes)
        prefix = settings.prefix if self.prefix is None else self.prefix
        return dataclasses.replace(settings, sample=sample, prefix=prefix)


def history_path() -> Path:
    """The input history file, in the user's data folder."""
    return data_dir() / "history"


def run_chat(options: ChatOptions, console: Console | None = None) -> int:
    """Load the model, start the kernel, open or create the session, run the REPL.

    CodeGenErrors (no model, a bad session file) propagate for the CLI to report."""
    from codegen_repl.core.executor import Executor, ExecutorConfig
    from codegen_repl.repl import input as terminal_input

    console = console or Console()
    # The model loads (and then compiles ahead) in the background: the prompt comes at once.
    decoder = options.open_decoder(options.model, "load another model with /model NAME")
    if isinstance(decoder, BackgroundDecoder):
        decoder.on_status = lambda text: console.print(Text(text, style="dim"))
    path = (options.session or new_session_path(Path.cwd())).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    show_banner(console, options, decoder, path)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    ask = terminal_input.prompt_ask if interactive else terminal_input.plain_ask
    new_path = None
    if path.exists() and not written_here(path):
        new_path = new_session_path(path.parent)
        if not _open_foreign(console, ask, path, new_path):
            return 1
    executor = Executor(ExecutorConfig(cwd=path.parent))
    session: Session | None = None
    repl: Repl | None = None
    try:
        if isinstance(decoder, BackgroundDecoder):
            decoder.checked()  # no such model: one clear error now, not at the first step
        renderer = Renderer(console, images_folder(new_path or path), options.theme,
                            options.images)  # fmt: skip
        resumed = path.exists()
        # The kernel starts (and a resume replays) behind the prompt; code waits for it.
        if resumed:
            session = Session.open(path, decoder, executor, renderer.progress, new_path,
                                   background=True)  # fmt: skip
        else:
            session = Session(decoder, executor, path)
            session.start_kernel(background=True)
        renderer.finish()
        session.settings = options.apply(session.settings)
        session.save()
        session.prepare_next()
        repl = Repl(
            session, console, options.run_mode, ask=ask,
            model_name=options.model or str(getattr(decoder, "model", "")),
            load_decoder=options.open_decoder, renderer=renderer,
            ask_input=terminal_input.prompt_input if interactive else None,
            resume_options=options.resume_options(),
        )  # fmt: skip
        if resumed:  # what its replay lacks, if anything, is told after the next command
            repl.show_turns(session.turns, 1, compact=True)
        console.print(Text("type a step, !code, or /help; Ctrl-D leaves", style="dim"))
        reader = (
            terminal_input.prompt_reader(repl.toolbar, history_path(), repl.typing)
            if interactive
            else terminal_input.plain_reader()
        )
        repl.loop(reader)
    finally:
        current = repl.session if repl is not None else session
        if current is not None:  # its kernel may still start or replay behind the prompt
            with contextlib.suppress(CodeGenError):
                current.stop_kernel_work()
        executor.shutdown()
    return 0


def _open_foreign(
    console: Console, ask: Callable[[str, str], str], path: Path, new_path: Path
) -> bool:
    """Whether the user opens a notebook this tool did not write as the first turns of a new
    session file (it is only read: never replayed without a yes, never rewritten)."""
    question = (
        f"{path.name} was not written by codegen-repl: open its code cells as the first "
        f"turns of a new session {new_path.name} (they run now)? [Enter] yes · n no: "
    )
    try:
        answer = ask(question, "").strip().lower()
    except (EOFError, KeyboardInterrupt):
        answer = "n"
    if answer in ("n", "no"):
        console.print(Text(f"{path} not opened; nothing was run or written"), soft_wrap=True)
        return False
    console.print(Text(f"session {new_path} (its first turns from {path})", "dim"), soft_wrap=True)
    return True


def show_banner(console: Console, options: ChatOptions, decoder: Decoder, path: Path) -> None:
    """The model, what runs it and the session file. The decoder describes itself (a server's
    is asked first, so an unreachable one fails before anything is printed)."""
    loading = not getattr(decoder, "loaded", True)
    where = "the model loads in the background" if loading else decoder.describe()
    name = getattr(decoder, "model", None) if options.server else options.model
    console.print(Text("codegen-repl", style="bold"), Text(f"· {name or options.model}", "cyan"))
    console.print(Text(f"{where} · session {path}", style="dim"))
