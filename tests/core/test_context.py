"""The multi-turn context format and fitting it into the window."""

from __future__ import annotations

import pytest

from codegen_repl.core.context import MTPB_PREFIX, TurnText, build_context, fit_context
from codegen_repl.errors import ConfigError


def words(text: str) -> int:  # a stand-in tokenizer: one token per whitespace-separated word
    return len(text.split())


TURNS = [TurnText(f"step {i}", f"x{i} = {i}") for i in range(5)]


def test_mtpb_format() -> None:
    turns = [TurnText("Assign 1 to a.", "a = 1"), TurnText(None, "b = a + 1")]
    assert build_context(MTPB_PREFIX, turns, "Print b.") == (
        "# Import libraries.\n\nimport numpy as np\n\n"
        "# Assign 1 to a.\na = 1\n\n"
        "b = a + 1\n\n"
        "# Print b.\n"
    )


def test_multi_line_step_becomes_comment_lines() -> None:
    assert build_context("", [], "first line\nsecond line") == "# first line\n# second line\n"


def test_everything_fits() -> None:
    fitted = fit_context(MTPB_PREFIX, TURNS, "next", 1000, words)
    assert fitted.dropped == 0 and fitted.warning is None
    assert fitted.text == build_context(MTPB_PREFIX, TURNS, "next")


def test_oldest_turns_go_first_and_the_prefix_stays() -> None:
    full = words(build_context(MTPB_PREFIX, TURNS, "next"))
    fitted = fit_context(MTPB_PREFIX, TURNS, "next", full - 7, words)
    assert fitted.dropped == 2  # each turn is 6 words
    assert fitted.text == build_context(MTPB_PREFIX, TURNS[2:], "next")
    assert fitted.text.startswith(MTPB_PREFIX)
    assert fitted.warning == "context window full: the oldest 2 turns are left out of the prompt"


def test_prefix_and_step_that_cannot_fit() -> None:
    alone = words(build_context(MTPB_PREFIX, [], "next"))
    message = (rf"the prefix and the step alone take {alone} tokens \(2 of them the step's\); "
               r"at most 3 fit")  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        fit_context(MTPB_PREFIX, TURNS, "next", 3, words)
