"""What a cell of the `codegen` kernel means: a step, the user's own code, or kernel magics.

Parsing is pure (no kernel, no session), so it is tested on its own. A cell is exactly one of:
- a natural-language step (any text; several lines are one step);
- code the user wrote: a first line `%%python`, or every line starting with `!`;
- kernel magics: every non-blank line starts with `%` (`%undo`, `%set top_p=0.9`, ...), or a
  first line `%edit [N]` followed by the turn's new code.
The magics are the session commands of `codegen_repl.core.frontend`'s one table, with `%` for
the terminal's `/`; `!` lines are parsed by the same `bang_view` as the terminal's.
Code cells keep a map from positions in the code back to positions in the cell, so completion
and inspection requests can be forwarded to the child kernel and their answers mapped back.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from codegen_repl.core.frontend import (
    PYTHON_HEADER,
    CodeView,
    CommandName,
    bang_view,
    commands_for,
    help_text,
    parse_command,
    unknown_text,
)
from codegen_repl.errors import ConfigError

__all__ = ["PYTHON_HEADER", "Cell", "CellKind", "CodeView", "Magic", "bang_view", "help_text",
           "magic_completions", "parse_cell", "parse_magic"]  # fmt: skip
CellKind = Literal["empty", "step", "code", "magics"]
PREFIX = "%"  # the kernel's commands are magics: %undo, %set top_p=0.9, ...
MAGIC_NAMES: tuple[CommandName, ...] = tuple(info.name for info in commands_for(PREFIX))


@dataclasses.dataclass(frozen=True)
class Magic:
    """One `%name argument` line (for `%edit`, the argument goes on with the cell's code)."""

    name: CommandName
    argument: str = ""


@dataclasses.dataclass(frozen=True)
class Cell:
    """A parsed cell.

    Args:
        kind: what the cell is.
        step: the step's text (kind "step").
        view: the code and its position map (kind "code").
        magics: the magic lines in order (kind "magics").
    """

    kind: CellKind
    step: str = ""
    view: CodeView | None = None
    magics: tuple[Magic, ...] = ()

    @property
    def code(self) -> str:
        return "" if self.view is None else self.view.code


def parse_cell(source: str) -> Cell:
    """The meaning of a cell; a ConfigError says how to write one that is ambiguous."""
    lines = [line for line in source.splitlines() if line.strip()]
    if not lines:
        return Cell("empty")
    first = lines[0].strip()
    if first.split(maxsplit=1)[0] == PYTHON_HEADER:
        return Cell("code", view=python_cell_view(source))
    if first.split(maxsplit=1)[0].lower() == f"{PREFIX}edit":  # `%edit N`, then the new code
        return Cell("magics", magics=(parse_magic(source.strip("\n")),))
    bangs = [line.lstrip().startswith("!") for line in lines]
    if all(bangs):
        return Cell("code", view=bang_view(source))
    magics = [line.lstrip().startswith("%") for line in lines]
    if all(magics):
        return Cell("magics", magics=tuple(parse_magic(line) for line in lines))
    if any(bangs) or any(magics):
        raise ConfigError(
            "this cell mixes a step with ! code or % magic lines; put each in its own cell "
            "(a step; %%python then code, or ! before every line of code; magic lines only)"
        )
    return Cell("step", step=source.strip())


def parse_magic(line: str) -> Magic:
    command = parse_command(line, PREFIX)
    if command.name == "unknown":
        raise ConfigError(unknown_text(command.argument, PREFIX))
    assert command.name in MAGIC_NAMES
    return Magic(command.name, command.argument)  # type: ignore[arg-type]


def python_cell_view(source: str) -> CodeView:
    """Everything after the `%%python` line."""
    start = source.index(PYTHON_HEADER)
    newline = source.find("\n", start)
    begin = len(source) if newline < 0 else newline + 1
    return CodeView(source[begin:], tuple(range(begin, len(source) + 1)))


def magic_completions(source: str, cursor: int) -> tuple[list[str], int]:
    """Magic names for a `%wor` before the cursor: (matches, start of the word)."""
    line_start = source.rfind("\n", 0, cursor) + 1
    before = source[line_start:cursor]
    stripped = before.lstrip()
    if not stripped.startswith("%") or " " in stripped:
        return [], cursor
    word = stripped[1:].lower()
    start = cursor - len(stripped)
    names = [f"%{name}" for name in MAGIC_NAMES if name.startswith(word)]
    if PYTHON_HEADER.startswith(stripped):
        names.append(PYTHON_HEADER)
    return names, start
