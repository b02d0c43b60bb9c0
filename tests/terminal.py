"""Patterns for what rich and prompt_toolkit write to a real pseudo-terminal (pexpect)."""

from __future__ import annotations

import re

# What may sit between two characters of text as a terminal shows it: SGR colour codes, cursor
# show/hide, and the "carriage return, erase line" (CR + CSI 2K) that rich's Live display writes
# when it stops (its last frame is cleared; it is at the start of a line, so nothing visible moves).
CONTROLS = r"(?:\x1b\[[0-9;?]*[A-Za-z]|\r\x1b\[2K)*"


def styled(text: str) -> str:
    """A pattern for `text` as it shows on the terminal, with the control sequences rich may
    write between any two of its characters."""
    return CONTROLS.join(re.escape(char) for char in text)


def plain(output: str) -> str:
    """`output` without its CSI control sequences (what is left is the text)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
