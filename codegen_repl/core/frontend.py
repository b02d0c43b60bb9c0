"""What a front end gives the session commands, and what its user's input means.

`Frontend` is the protocol every front end implements for `commands.Commands` (show text, code
and outputs; ask). An input line typed at the REPL (or a line of a `codegen` kernel cell) is a
step, code the user wrote (`!` before each line), or a command: `/undo` in the terminal, `%undo`
in the kernel (the front end's `prefix`). The one command table and the parsers are pure, so
they are tested on their own.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

from codegen_repl.core.settings import SET_KEYS
from codegen_repl.errors import ConfigError

if TYPE_CHECKING:
    from codegen_repl.core.session import Session

CommandName = Literal[
    "help", "undo", "drop", "retry", "edit", "run", "fix", "keep", "code", "context", "model",
    "set", "save", "load", "reset", "mtpb", "exit",
]  # fmt: skip
InputName = Literal[CommandName, "empty", "step", "user_code", "unknown"]
COMMAND_NAMES: tuple[CommandName, ...] = get_args(CommandName)
TextStyle = Literal["plain", "title", "note", "warning", "error"]
PYTHON_HEADER = "%%python"  # the kernel's cell of the user's own code


class LiveCode(Protocol):
    """Code shown while the model writes it."""

    def add(self, piece: str) -> None:
        """One more piece; may raise to stop the generation (the kernel's interrupt)."""

    def finish(self, code: str) -> None:
        """The final code (the cut may have removed a streamed tail); the view is closed."""


class Frontend(Protocol):
    """Where the commands show things, and whom they ask.

    `prefix` is how the front end's commands are spelled ("/" or "%"); `can_ask` says whether
    someone can answer `ask` and `ask_input` (a kernel cannot, so `run=ask` is refused there,
    and its code's `input()` gets one line saying that no one can answer)."""

    prefix: str
    can_ask: bool

    def show_text(self, text: str, style: TextStyle = "plain") -> None: ...

    def show_code(self, code: str) -> None: ...

    def live_code(self) -> LiveCode: ...

    def begin_turn(self, number: int) -> None:
        """The outputs that follow belong to turn `number` (the code is about to run)."""

    def output(self, output: dict[str, Any]) -> None:
        """One nbformat output of the kernel, as it arrives (stream chunks unmerged)."""

    def ask(self, question: str, default: str = "") -> str:
        """The answer; with `default`, the user edits that text (code) and the result is
        returned."""

    def edit_code(self, code: str) -> str | None:
        """`code` changed by the user (None: cancelled); a ConfigError where there is no
        editor."""

    def session_opened(self, session: Session) -> None:
        """A different session is now the current one (/load, /reset, /mtpb)."""

    def progress(self, text: str) -> None:
        """Long work goes on ("replaying 3/11: turn 4"); the next progress replaces it where
        the front end can (the terminal's status line), and any other output ends it."""

    def ask_input(self, prompt: str, password: bool) -> str:
        """The line the user types for the running code's `input(prompt)` (`password`: not
        echoed, as getpass); called only where `can_ask`. Ctrl-C interrupts the code."""


@dataclasses.dataclass(frozen=True)
class CommandInfo:
    """One row of the help table (the name is shown after the front end's prefix)."""

    name: CommandName
    about: str
    usage: str = ""  # the arguments, shown after the name
    terminal_only: bool = False


_RUN_MODES = "run=ask|auto|never"  # where no one can answer (a kernel): run=auto|never
COMMAND_TABLE: tuple[CommandInfo, ...] = (
    CommandInfo("help", "show this help"),
    CommandInfo("undo", "drop the last turn (the kernel forgets it too)"),
    CommandInfo("drop", "delete turn N (default: the last); the kernel is rebuilt without it and "
                "the later turns that ran are run again", "[N]"),
    CommandInfo("retry", "resample the last step (a new seed)"),
    CommandInfo("edit", "replace turn N's code (default: the last) with the lines after it "
                "(or, in the terminal, $EDITOR), then re-run it and the later turns that ran",
                "[N]"),
    CommandInfo("run", "run turn N again, now, without a replay (default: the last turn); a "
                "declined turn runs on this request", "[N]"),
    CommandInfo("fix", "add a step asking the model to fix the last error (the failed turn is "
                "kept in the context, so the model sees it)"),
    CommandInfo("keep", "keep failed turn N (default: the last) in the model's context; a "
                "failed turn is left out of it otherwise", "[N]"),
    CommandInfo("code", "show the whole program, numbered by turn"),
    CommandInfo("context", "show what the model sees, with its token count"),
    CommandInfo("model", "load another checkpoint folder or hub id", "NAME"),
    CommandInfo("set", "change a setting (no argument: list them): "
                + ", ".join(SET_KEYS[:-2]) + f", {_RUN_MODES}, timeout", "[key=value]"),
    CommandInfo("save", "save the session (or export the program)", "[PATH.ipynb|PATH.py]"),
    CommandInfo("load", "open a saved session (its successful turns are replayed)", "PATH"),
    CommandInfo("reset", "a new kernel and an empty session (in a new file)"),
    CommandInfo("mtpb", "play MTPB problem N with test input K (0-4) in a fresh session and "
                "score it", "N [K] [--problems PATH]"),
    CommandInfo("exit", "save and leave (Ctrl-D does the same)", terminal_only=True),
)  # fmt: skip


def commands_for(prefix: str) -> tuple[CommandInfo, ...]:
    """The commands a front end has: all of them in the terminal ("/"), all but exit in the
    kernel ("%")."""
    return tuple(info for info in COMMAND_TABLE if prefix == "/" or not info.terminal_only)


HELP_STEPS = "anything else is a step: the model writes its code"  # the help's last line


def help_rows(prefix: str = "/", can_ask: bool = True) -> list[tuple[str, str]]:
    """The help table's rows, (the command with its arguments, what it does): a row per
    command (`can_ask` False: a front end that cannot ask, whose `set` takes run=auto|never
    only), then the rows of code the user writes. `HELP_STEPS` follows them."""
    rows = []
    for info in commands_for(prefix):
        about = info.about if can_ask else info.about.replace(_RUN_MODES, "run=auto|never")
        rows.append((f"{prefix}{info.name} {info.usage}".rstrip(), about))
    rows.append(("!CODE", "run Python you wrote (! before each line); it enters the context"))
    if prefix == "%":
        rows.append((PYTHON_HEADER, "first line of a cell of Python you wrote"))
    return rows


def help_text(prefix: str = "/", can_ask: bool = True) -> str:
    """The help table as text (`help_rows`); the descriptions start in one column, after the
    longest command."""
    width = max(len(f"{prefix}{info.name} {info.usage}".rstrip()) for info in COMMAND_TABLE)
    rows = [f"  {head:<{width}} {about}" for head, about in help_rows(prefix, can_ask)]
    return "\n".join(["commands:", *rows, f"  {HELP_STEPS}"])


def unknown_text(word: str, prefix: str = "/") -> str:
    names = " ".join(prefix + info.name for info in commands_for(prefix))
    return f"unknown command {word}; the commands are: {names} (and !CODE for your own code)"


# ----------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Command:
    """One input, parsed.

    Args:
        name: "step", "user_code" (lines starting with `!`), "empty", a command name without
            its prefix ("undo", "set", ...), or "unknown" (argument: the word typed).
        argument: the rest of the input (and any lines after the first), stripped.
    """

    name: InputName
    argument: str = ""


def parse(text: str, prefix: str = "/") -> Command:
    """A line (or lines) typed at the REPL: a command, `!` code, or a step."""
    stripped = text.strip()
    if not stripped:
        return Command("empty")
    if stripped.startswith("!"):
        return Command("user_code", bang_view(stripped).code.strip())
    if not stripped.startswith(prefix):
        return Command("step", stripped)
    return parse_command(stripped, prefix)


def parse_command(text: str, prefix: str) -> Command:
    """`{prefix}name argument` (the argument may go on over the following lines)."""
    head, _, rest = text.strip().partition("\n")
    word, _, argument = head.partition(" ")
    argument = (argument.strip() + ("\n" + rest if rest else "")).strip()
    name = word[len(prefix) :].lower()
    for info in commands_for(prefix):
        if info.name == name:
            return Command(info.name, argument)
    return Command("unknown", word)


@dataclasses.dataclass(frozen=True)
class CodeView:
    """The Python inside code the user wrote, and where each of its characters sits in the
    input (so completion requests can be mapped between the two).

    Args:
        code: the code as it runs (`!` marks or a header line removed).
        positions: for each index 0..len(code) of the code, the index in the input.
    """

    code: str
    positions: tuple[int, ...]

    def to_code(self, input_pos: int) -> int:
        """The code position of a cursor in the input (clamped to the code)."""
        return bisect.bisect_left(self.positions, input_pos, hi=len(self.code))

    def to_cell(self, code_pos: int) -> int:
        return self.positions[max(0, min(code_pos, len(self.code)))]


def bang_view(source: str) -> CodeView:
    """`!` code: each line that starts with `!` loses it (and the blanks before it); the lines
    without one (a terminal's continuation lines) stay as they are."""
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


def parse_turn_number(argument: str, prefix: str, command: str) -> int | None:
    """`N` (a turn number, from 1) or nothing (None: the last turn)."""
    word = argument.strip()
    if not word:
        return None
    if not (word.isascii() and word.isdigit()):  # int() refuses "²", which isdigit() takes
        raise ConfigError(f"use {prefix}{command} [N] with N a turn number (from 1), not {word!r}")
    return int(word)


def parse_edit(argument: str, prefix: str = "/") -> tuple[int | None, str | None]:
    """`edit [N]` then the new code on the following lines: (turn number or None for the last,
    code or None when none was given). `edit x = 1` is code for the last turn."""
    head, newline, code = argument.partition("\n")
    head = head.strip()
    if head and not (head.isascii() and head.isdigit()):
        head, code, newline = "", argument, "\n"
    number = parse_turn_number(head, prefix, "edit")
    return number, (code if newline and code.strip() else None)


@dataclasses.dataclass(frozen=True)
class MtpbRequest:
    """`mtpb N [K] [--problems PATH]`: problem id, test input index, problems file (None: the
    configured or cached one)."""

    problem: str
    index: int = 0
    problems: str | None = None


def parse_mtpb(argument: str, prefix: str = "/") -> MtpbRequest:
    words = argument.split()
    usage = (f"use {prefix}mtpb N [K] [--problems PATH]: MTPB problem N (1-115) with test input "
             "K (0-4, default 0)")  # fmt: skip
    problems = None
    if "--problems" in words:
        at = words.index("--problems")
        if at + 1 >= len(words):
            raise ConfigError(f"--problems needs the path of an mtpb.jsonl file; {usage}")
        problems = words[at + 1]
        del words[at : at + 2]
    if not 1 <= len(words) <= 2 or not all(word.isascii() and word.isdigit() for word in words):
        raise ConfigError(usage)
    index = int(words[1]) if len(words) == 2 else 0
    if index > 4:
        raise ConfigError(f"MTPB problems have test inputs 0-4, not {index}; {usage}")
    return MtpbRequest(words[0], index, problems)
