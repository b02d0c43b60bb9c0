"""What a cell of the `codegen` kernel means: a step, the user's own code, or kernel magics.

Parsing is pure (no kernel, no session), so it is tested on its own. A cell is exactly one of:
- a natural-language step (any text; several lines are one step);
- code the user wrote: a first line `%%python`, or every line starting with `!`;
- kernel magics: every non-blank line starts with `%` (`%undo`, `%set top_p=0.9`, ...).
Code cells keep a map from positions in the code back to positions in the cell, so completion
and inspection requests can be forwarded to the child kernel and their answers mapped back.
"""

from __future__ import annotations

import bisect
import dataclasses

from codegen_repl.errors import ConfigError

PYTHON_HEADER = "%%python"
MAGICS: dict[str, str] = {
    "undo": "drop the last turn (the child kernel forgets it too)",
    "retry": "resample the last step (a new seed)",
    "code": "show the whole program",
    "context": "show what the model sees, with its token count",
    "model": "%model NAME: load another checkpoint folder or hub id",
    "set": "%set key=value: temperature, top_p, top_k, max_new_tokens, run=auto|never, timeout",
    "save": "%save PATH.ipynb|PATH.py: save the session (or export the program)",
    "mtpb": "%mtpb N [K] [--problems PATH]: play MTPB problem N (test input K) in a fresh "
    "session and score it",
    "help": "show this help",
}


@dataclasses.dataclass(frozen=True)
class Magic:
    """One `%name argument` line."""

    name: str
    argument: str = ""


@dataclasses.dataclass(frozen=True)
class CodeView:
    """The Python inside a code cell, and where each of its characters sits in the cell.

    Args:
        code: the code as it runs (header line or `!` marks removed).
        positions: for each index 0..len(code) of the code, the index in the cell.
    """

    code: str
    positions: tuple[int, ...]

    def to_code(self, cell_pos: int) -> int:
        """The code position of a cursor in the cell (clamped to the code)."""
        return bisect.bisect_left(self.positions, cell_pos, hi=len(self.code))

    def to_cell(self, code_pos: int) -> int:
        return self.positions[max(0, min(code_pos, len(self.code)))]


@dataclasses.dataclass(frozen=True)
class Cell:
    """A parsed cell.

    Args:
        kind: "empty", "step", "code" or "magics".
        step: the step's text (kind "step").
        view: the code and its position map (kind "code").
        magics: the magic lines in order (kind "magics").
    """

    kind: str
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
    bangs = [line.lstrip().startswith("!") for line in lines]
    if all(bangs):
        return Cell("code", view=bang_view(source))
    magics = [line.lstrip().startswith("%") for line in lines]
    if all(magics):
        return Cell("magics", magics=tuple(parse_magic(line) for line in lines))
    if any(bangs) or any(magics):
        raise ConfigError(
            "this cell mixes a step with `!` code or `%` magic lines; put each in its own cell "
            "(a step; `%%python` then code, or `!` before every line of code; magic lines only)"
        )
    return Cell("step", step=source.strip())


def parse_magic(line: str) -> Magic:
    word, _, argument = line.strip()[1:].partition(" ")
    name = word.lower()
    if name not in MAGICS:
        raise ConfigError(f"unknown magic %{word}; the kernel's magics are: {magic_names()}")
    return Magic(name, argument.strip())


def magic_names() -> str:
    return " ".join(f"%{name}" for name in MAGICS) + f" (and {PYTHON_HEADER} for your own code)"


def help_text() -> str:
    rows = [f"  %{name:<8} {about}" for name, about in MAGICS.items()]
    extra = [
        f"  {PYTHON_HEADER:<9} first line of a cell of Python you wrote (or start lines with !)",
        "  anything else is a step: the model writes its code, the child kernel runs it",
    ]
    return "\n".join(["cells:", *rows, *extra])


def python_cell_view(source: str) -> CodeView:
    """Everything after the `%%python` line."""
    start = source.index(PYTHON_HEADER)
    newline = source.find("\n", start)
    begin = len(source) if newline < 0 else newline + 1
    return CodeView(source[begin:], tuple(range(begin, len(source) + 1)))


def bang_view(source: str) -> CodeView:
    """Each line with the first `!` (and the blanks before it) removed."""
    code: list[str] = []
    positions: list[int] = []
    offset = 0
    for line in source.splitlines(keepends=True):
        mark = line.find("!") if line.lstrip().startswith("!") else -1
        keep_from = mark + 1 if mark >= 0 else 0
        code.append(line[keep_from:])
        positions.extend(range(offset + keep_from, offset + len(line)))
        offset += len(line)
    positions.append(len(source))
    return CodeView("".join(code), tuple(positions))


def magic_completions(source: str, cursor: int) -> tuple[list[str], int]:
    """Magic names for a `%wor` before the cursor: (matches, start of the word)."""
    line_start = source.rfind("\n", 0, cursor) + 1
    before = source[line_start:cursor]
    stripped = before.lstrip()
    if not stripped.startswith("%") or " " in stripped:
        return [], cursor
    word = stripped[1:].lower()
    start = cursor - len(stripped)
    names = [f"%{name}" for name in MAGICS if name.startswith(word)]
    if PYTHON_HEADER.startswith(stripped):
        names.append(PYTHON_HEADER)
    return names, start
