"""The multi-turn prompt: CodeGen's (MTPB's) context format, fitted to the model's window.

Format: an optional prefix (MTPB's is `# Import libraries.\\n\\nimport numpy as np\\n\\n`), then
per turn `# {step}\\n` followed by the turn's code and `\\n\\n`, then the new step's comment line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from codegen_repl.errors import ConfigError

MTPB_PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"


@dataclasses.dataclass(frozen=True)
class TurnText:
    """One turn as the model sees it: the step (None for code the user wrote) and its code."""

    step: str | None
    code: str
    verbatim: bool = False  # the step is written as given (see `step_line`)

    def render(self) -> str:
        comment = "" if self.step is None else step_line(self.step, self.verbatim)
        return f"{comment}{self.code}\n\n"


def step_line(step: str, verbatim: bool = False) -> str:
    """`# step` (a step of several lines becomes several comment lines). `verbatim`: exactly
    `# {step}\\n`, MTPB's reference format (its prompts carry their own `# ` on continuation
    lines, and some end in a space that is part of the benchmark's prompt)."""
    if verbatim:
        return f"# {step}\n"
    return "".join(f"# {line}\n" for line in step.strip().splitlines() or [""])


def build_context(prefix: str, turns: Sequence[TurnText], step: str, verbatim: bool = False) -> str:
    """The prompt for generating the code of `step` after `turns` (`verbatim`: see step_line)."""
    return prefix + "".join(turn.render() for turn in turns) + step_line(step, verbatim)


@dataclasses.dataclass(frozen=True)
class FittedContext:
    text: str
    dropped: int  # how many of the oldest turns were left out

    @property
    def warning(self) -> str | None:
        if not self.dropped:
            return None
        turns = "turn" if self.dropped == 1 else "turns"
        return f"context window full: the oldest {self.dropped} {turns} are left out of the prompt"


def fit_context(
    prefix: str,
    turns: Sequence[TurnText],
    step: str,
    budget: int,
    count_tokens: Callable[[str], int],
) -> FittedContext:
    """The longest context of at most `budget` tokens that keeps the prefix (the imports) and
    the newest turns, dropping the oldest turns first."""
    for dropped in range(len(turns) + 1):
        text = build_context(prefix, turns[dropped:], step)
        if count_tokens(text) <= budget:
            return FittedContext(text, dropped)
    alone = count_tokens(build_context(prefix, [], step))
    raise ConfigError(
        f"the prefix and the step alone take {alone} tokens ({count_tokens(step_line(step))} "
        f"of them the step's); at most {budget} fit in the model's window beside max_new_tokens: "
        "shorten the step or the prefix, or lower max_new_tokens"
    )
