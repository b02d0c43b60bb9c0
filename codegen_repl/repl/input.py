"""What the terminal offers while a line is typed: completion of slash commands, `/set` keys and
values, and the paths of `/save` and `/load`."""

from __future__ import annotations

from collections.abc import Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from codegen_repl.core.commands import COMMANDS, RUN_MODES, SET_KEYS


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
        for name, about in COMMANDS.items():
            if name.startswith(text):
                yield Completion(name, start_position=-len(text), display_meta=about)


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
