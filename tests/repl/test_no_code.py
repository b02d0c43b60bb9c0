"""A step, /fix or /retry for which the model writes no code: said, with what to try; nothing is
asked, recorded or run."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from codegen_repl.core.commands import RUN_QUESTION
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.repl.loop import Repl
from tests.core.test_session import ScriptedDecoder

NO_CODE = "the model wrote no code: nothing was recorded or run"


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as running:
        yield running


def asking_repl(
    tmp_path: Path, executor: Executor, *codes: str
) -> tuple[Repl, list[str], io.StringIO]:
    """A REPL that asks before running each step (every answer: Enter, run it), and the
    questions it asked."""
    out, asked = io.StringIO(), list[str]()

    def ask(question: str, default: str) -> str:
        asked.append(question)
        return ""

    session = Session(
        ScriptedDecoder(*codes), executor, tmp_path / "s.ipynb", SessionSettings(prefix="")
    )
    return Repl(session, Console(file=out, width=200), "ask", ask=ask), asked, out


def test_a_step_without_code_is_not_recorded(tmp_path: Path, executor: Executor) -> None:
    repl, asked, out = asking_repl(tmp_path, executor, "", "x = 1")
    repl.handle("Set x.")
    assert NO_CODE in out.getvalue() and "!CODE" in out.getvalue()
    assert asked == [] and repl.session.turns == []
    repl.handle("Set x.")  # the next step goes on as usual
    assert asked == [RUN_QUESTION] and [turn.code for turn in repl.session.turns] == ["x = 1"]


def test_fix_without_code_leaves_the_failed_turn_as_it_was(
    tmp_path: Path, executor: Executor
) -> None:
    repl, asked, out = asking_repl(tmp_path, executor, "total = 1 / 0", "")
    repl.handle("Divide.")
    assert repl.session.turns[0].status == "error" and not repl.session.turns[0].in_context
    repl.handle("/fix")
    assert NO_CODE in out.getvalue() and "internal error" not in out.getvalue()
    assert asked == [RUN_QUESTION]  # the step's question only: /fix asked nothing
    assert len(repl.session.turns) == 1
    assert not repl.session.turns[0].kept  # still left out of the model's context


def test_retry_without_code_keeps_the_last_turn(tmp_path: Path, executor: Executor) -> None:
    repl, asked, out = asking_repl(tmp_path, executor, "x = 1", "")
    repl.handle("Set x.")
    repl.handle("/retry")
    assert NO_CODE in out.getvalue() and asked == [RUN_QUESTION]
    repl.handle("/set temperature=0")
    repl.session.decoder.codes.append("")
    repl.handle("/retry")  # greedy: the same again, unless sampled
    assert "/set temperature=0.8 to sample other code" in out.getvalue()
    assert [turn.code for turn in repl.session.turns] == ["x = 1"]
    assert repl.session.settings.sample.seed == 0  # the seed as it was
