"""Where a completion ends: CodeGen's truncation rules and user stop strings.

CodeGen's rules (as in its MTPB and HumanEval sampling code): cut at a second top-level
`print`, then at a second top-level `def`, then before the first `^#`, `<|endoftext|>`,
`^'''`, `^\"\"\"` or three newlines.

While tokens stream in, `Cutter.settled(text)` says how much of the text no future text can
change, so a decoder can show that much at once and stop as soon as the cut is final.
"""

from __future__ import annotations

import dataclasses
import re

_TERMINALS = [
    re.compile(pattern, re.MULTILINE)
    for pattern in ("^#", re.escape("<|endoftext|>"), "^'''", '^"""', "\n\n\n")
]
# The literal text each rule needs (with "line start" for the `^` ones); a text that ends
# with a proper prefix of one of these may still be cut there.
_LINE_START_LITERALS = ("#", "'''", '"""', "print", "def")
_ANYWHERE_LITERALS = ("<|endoftext|>", "\n\n\n")


def truncate(completion: str) -> str:
    """CodeGen's post-hoc truncation of a completion."""
    prints = list(re.finditer("^print", completion, re.MULTILINE))
    if len(prints) > 1:
        completion = completion[: prints[1].start()]
    defs = list(re.finditer("^def", completion, re.MULTILINE))
    if len(defs) > 1:
        completion = completion[: defs[1].start()]
    found = [m.start() for m in (t.search(completion) for t in _TERMINALS) if m]
    return completion[: min(found)] if found else completion


@dataclasses.dataclass(frozen=True)
class Cutter:
    """The end rules of one request: CodeGen's rules (optional) and stop strings."""

    codegen_rules: bool = True
    stop: tuple[str, ...] = ()

    def cut(self, text: str) -> int | None:
        """Where `text` is cut by a rule that has fired, or None."""
        cuts = [text.find(s) for s in self.stop if s and s in text]
        if self.codegen_rules:
            kept = len(truncate(text))
            if kept < len(text):
                cuts.append(kept)
        return min(cuts) if cuts else None

    def settled(self, text: str) -> int:
        """The length of the prefix of `text` that no text appended later can cut."""
        for start in range(max(0, len(text) - self._longest() + 1), len(text)):
            if self._may_start_match(text, start):
                return start
        return len(text)

    def visible(self, text: str) -> int:
        """How much of `text` can be shown now: settled, and not past a cut."""
        cut = self.cut(text)
        return min(self.settled(text), len(text) if cut is None else cut)

    def final(self, text: str) -> int | None:
        """The cut, if it has fired and nothing appended later can move it."""
        cut = self.cut(text)
        return cut if cut is not None and cut <= self.settled(text) else None

    def apply(self, text: str) -> str:
        cut = self.cut(text)
        return text if cut is None else text[:cut]

    def _longest(self) -> int:
        literals = [*self.stop]
        if self.codegen_rules:
            literals += [*_LINE_START_LITERALS, *_ANYWHERE_LITERALS]
        return max((len(s) for s in literals), default=1)

    def _may_start_match(self, text: str, start: int) -> bool:
        """Is text[start:] a proper prefix of a literal that some rule matches at `start`?"""
        tail = text[start:]
        anywhere = [*self.stop]
        if self.codegen_rules:
            anywhere += _ANYWHERE_LITERALS
            line_start = start == 0 or text[start - 1] == "\n"
            if line_start and any(s.startswith(tail) and s != tail for s in _LINE_START_LITERALS):
                return True
        return any(s.startswith(tail) and s != tail for s in anywhere)
