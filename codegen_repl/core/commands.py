"""What a line typed at the REPL means: a step, code the user wrote, or a slash command.

Parsing is pure (no session, no console) so it is tested on its own; the REPL acts on the
parsed `Command`.
"""

from __future__ import annotations

import dataclasses

from codegen_repl.core.session import SessionSettings
from codegen_repl.errors import ConfigError
from codegen_repl.model.sample_params import SampleParams

COMMANDS: dict[str, str] = {
    "/help": "show this help",
    "/undo": "drop the last turn (the kernel forgets it too)",
    "/retry": "resample the last step",
    "/edit": "/edit [N] then new code on the next lines (or $EDITOR): replace turn N's code",
    "/run": "re-run the last turn",
    "/fix": "add a step asking the model to fix the last error",
    "/model": "/model MODEL: switch to another checkpoint folder or hub id",
    "/code": "show the whole program",
    "/context": "show what the model sees, with its token count",
    "/save": "/save [PATH.ipynb|PATH.py]: save the session (or export the program)",
    "/load": "/load PATH: open a saved session",
    "/reset": "a new kernel and an empty session (in a new file)",
    "/mtpb": "/mtpb N [K]: play MTPB problem N with test input K (0-4) in a new session",
    "/set": "/set key=value: "
    + ", ".join(
        ["temperature", "top_p", "top_k", "max_new_tokens", "run=ask|auto|never", "timeout"]
    ),
    "/exit": "save and leave (Ctrl-D does the same)",
}
SAMPLE_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")
SET_KEYS = (*SAMPLE_KEYS, "run", "timeout")
RUN_MODES = ("ask", "auto", "never")


@dataclasses.dataclass(frozen=True)
class Command:
    """One input line, parsed.

    Args:
        name: "step", "user_code" (a line starting with `!`), "empty", or a slash command without
            its slash ("undo", "set", ...); "unknown" for a slash command we do not have.
        argument: the rest of the line (and any lines after it), stripped.
    """

    name: str
    argument: str = ""


def parse(line: str) -> Command:
    text = line.strip()
    if not text:
        return Command("empty")
    if text.startswith("!"):
        return Command("user_code", text[1:].strip())
    if not text.startswith("/"):
        return Command("step", text)
    head, _, rest = text.partition("\n")
    word, _, argument = head.partition(" ")
    argument = (argument.strip() + ("\n" + rest if rest else "")).strip()
    if word.lower() not in COMMANDS:
        return Command("unknown", word)
    return Command(word[1:].lower(), argument)


def help_text() -> str:
    rows = [f"  {name:<9} {about}" for name, about in COMMANDS.items()]
    extra = [
        "  !CODE     run Python you wrote; it enters the context as code",
        "  anything else is a step: the model writes its code",
    ]
    return "\n".join(["commands:", *rows, *extra])


def unknown_text(word: str) -> str:
    return f"unknown command {word}; the commands are: {' '.join(COMMANDS)} (and !CODE)"


def parse_edit(argument: str, turn_count: int) -> tuple[int, str | None]:
    """`/edit [N]` then optional code on the following lines: (turn index, code or None)."""
    head, newline, code = argument.partition("\n")
    head = head.strip()
    if head and not head.lstrip("-").isdigit():  # `/edit x = 1`: code for the last turn
        head, code, newline = "", argument, "\n"
    index = int(head) if head else turn_count - 1
    if turn_count == 0:
        raise ConfigError("there is no turn to edit yet")
    if not 0 <= index < turn_count:
        raise ConfigError(f"there is no turn {index}; turns are 0..{turn_count - 1}")
    return index, (code if newline and code.strip() else None)


def parse_mtpb(argument: str) -> tuple[str, int]:
    """`/mtpb N [K]`: (problem id, test input index)."""
    words = argument.split()
    usage = "use /mtpb N [K]: MTPB problem N (1-115) with test input K (0-4, default 0)"
    if not 1 <= len(words) <= 2 or not all(word.isdigit() for word in words):
        raise ConfigError(usage)
    index = int(words[1]) if len(words) == 2 else 0
    if index > 4:
        raise ConfigError(f"MTPB problems have test inputs 0-4, not {index}; {usage}")
    return words[0], index


def apply_setting(
    settings: SessionSettings, run_mode: str, assignment: str
) -> tuple[SessionSettings, str]:
    """`key=value` applied to the settings and run mode; a ConfigError says what is allowed."""
    key, equals, value = (part.strip() for part in assignment.partition("="))
    if not equals or key not in SET_KEYS:
        raise ConfigError(f"use /set key=value with key one of {', '.join(SET_KEYS)}")
    if key == "run":
        if value not in RUN_MODES:
            raise ConfigError(f"run must be one of {', '.join(RUN_MODES)}, got {value!r}")
        return settings, value
    if key == "timeout":
        timeout = None if value.lower() in ("none", "off", "0") else _number(key, value, float)
        return dataclasses.replace(settings, timeout=timeout), run_mode
    kind = float if key in ("temperature", "top_p") else int
    sample: SampleParams = dataclasses.replace(settings.sample, **{key: _number(key, value, kind)})
    return dataclasses.replace(settings, sample=sample), run_mode


def _number(key: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}") from None
