"""What the terminal reads: line readers (prompt_toolkit on a terminal, `input()` otherwise), the
key bindings, the completion of commands, `/set` keys and values, and the paths of `/save` and
`/load`, and the answers to the commands' questions (run it? the code edited inline)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from codegen_repl.core.frontend import commands_for
from codegen_repl.core.settings import RUN_MODES, SET_KEYS
from codegen_repl.errors import ConfigError

PROMPT = ">>> "


class SlashCompleter(Completer):
    """Completes `/com` to a command, `/set k` to a setting key, `/set run=` to a run mode and
    the paths of `/save` and `/load`."""

    def __init__(self) -> None:
        self.paths = PathCompleter(expanduser=True)

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        if text.startswith("/set "):
            yield from _setting_completions(text[len("/set ") :].strip())
            return
        if text.startswith(("/save ", "/load ")):
            path = text.split(" ", 1)[1].lstrip()
            yield from self.paths.get_completions(Document(path), complete_event)
            return
        if " " in text:
            return
        for info in commands_for("/"):
            name = "/" + info.name
            if name.startswith(text):
                yield Completion(name, start_position=-len(text), display_meta=info.about)


def _setting_completions(word: str) -> Iterable[Completion]:
    if word.startswith("run="):
        mode = word[len("run=") :]
        for choice in RUN_MODES:
            if choice.startswith(mode):
                yield Completion(choice, start_position=-len(mode))
        return
    for key in SET_KEYS:
        if key.startswith(word) and "=" not in word:
            yield Completion(key + "=", start_position=-len(word))


# ----------------------------------------------------------------------------- line readers


def plain_reader(prompt: str = PROMPT) -> Callable[[], str]:
    """Lines from `input()`: for pipes and scripts (no history, no completion)."""
    return lambda: input(prompt)


# While the user types, the input so far is handed on (`on_typing`) at most once per this many
# seconds (and once more after the last key): often enough that little is left after Enter,
# rarely enough that a background prefill per call stays a small share of the CPU.
TYPING_INTERVAL = 0.25


def prompt_reader(
    toolbar: Callable[[], str], history: Path, on_typing: Callable[[str], None] | None = None
) -> Callable[[], str]:
    """prompt_toolkit: Enter submits, Alt-Enter (Esc Enter) inserts a newline, history in
    `history`, Ctrl-R search, completion of slash commands, a bottom toolbar. `on_typing` is
    told the input as it is typed (see TYPING_INTERVAL; in the prompt's own thread, so it must
    return at once; an error it raises is dropped: Enter will meet it again)."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    history.parent.mkdir(parents=True, exist_ok=True)
    prompt: PromptSession[str] = PromptSession(
        history=FileHistory(str(history)),
        completer=SlashCompleter(),
        complete_while_typing=True,
        key_bindings=key_bindings(),
        multiline=True,
        bottom_toolbar=toolbar,
        # Redrawn while the user is idle too: the model's load and the kernel's start or
        # replay behind the prompt change what it says.
        refresh_interval=0.5,
        prompt_continuation="... ",
    )
    if on_typing is not None:
        prompt.default_buffer.on_text_changed += _throttled(on_typing)
    return lambda: prompt.prompt(PROMPT)


def _throttled(on_typing: Callable[[str], None]) -> Callable[[object], None]:
    """A Buffer.on_text_changed handler that calls `on_typing(text)` TYPING_INTERVAL seconds
    after a change (later changes within that time join the same call), while the prompt
    runs."""
    import asyncio

    from prompt_toolkit.application import get_app_or_none

    pending: list[object] = [None]  # the event loop a call is pending on (a prompt's own)

    def tell(buffer) -> None:  # type: ignore[no-untyped-def]
        pending[0] = None
        app = get_app_or_none()
        if app is None or not app.is_running or app.is_done:
            return  # submitted meanwhile: the step itself runs now
        with contextlib.suppress(Exception):
            on_typing(buffer.text)

    def changed(buffer) -> None:  # type: ignore[no-untyped-def]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the buffer reset before a prompt runs: nothing typed
            return
        if pending[0] is not loop:  # none pending, or on an earlier prompt's ended loop
            pending[0] = loop
            loop.call_later(TYPING_INTERVAL, tell, buffer)

    return changed


def key_bindings():  # type: ignore[no-untyped-def]
    """Enter takes the offered completion (if it is not typed out yet) or submits the input;
    Esc Enter inserts a newline."""
    from prompt_toolkit.key_binding import KeyBindings

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

    return bindings


# ----------------------------------------------------------------------------- answers


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


def prompt_ask(question: str, default: str = "") -> str:
    """The run question on a terminal; with `default`, an inline multi-line editor."""
    from prompt_toolkit import prompt

    if not default:
        return prompt(question)
    return prompt(
        "", default=default, multiline=True, bottom_toolbar=" edit the code; Esc Enter runs it "
    )


def plain_input(prompt: str, password: bool = False) -> str:
    """A line for the running code's `input()`: `input()` on a pipe; on a terminal, getpass
    (not echoed) for a password."""
    import getpass
    import sys

    if password and sys.stdin.isatty():
        return getpass.getpass(prompt)
    return input(prompt)


def prompt_input(prompt: str, password: bool = False) -> str:
    """A line for the running code's `input()` on a terminal (prompt_toolkit; a password is
    shown as stars)."""
    from prompt_toolkit import prompt as read

    return read(prompt, is_password=password)


def editor_edit(code: str) -> str | None:
    """`code` in $EDITOR (None: closed without saving).

    Raises:
        ConfigError: the editor could not be started (e.g. $EDITOR names no program).
    """
    import click

    try:
        return click.edit(code, extension=".py")
    except click.ClickException as failed:
        raise ConfigError(
            f"{failed.message}; set $EDITOR to an editor, or give the new code on the lines "
            "after /edit N"
        ) from None
