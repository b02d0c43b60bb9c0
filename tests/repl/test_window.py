"""The toolbar and /context over a session longer than the model's window: they count what the
model gets (the older turns that do not fit are cut), never the whole program."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

from rich.console import Console

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session, SessionSettings, Turn
from codegen_repl.core.settings import DEFAULT_SAMPLE
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.repl.loop import Repl

TOOLBAR = re.compile(r" · context (\d+)/128 tokens(?: \((\d+) older turns? left out\))? · ")


def test_the_toolbar_counts_the_context_the_model_gets(
    tmp_path: Path, chat_checkpoint: Path
) -> None:
    decoder = LocalDecoder.load(chat_checkpoint)  # a window of 128 tokens
    sample = dataclasses.replace(DEFAULT_SAMPLE, max_new_tokens=32)  # 96 left for the context
    session = Session(decoder, Executor(ExecutorConfig(cwd=tmp_path)),
                      settings=SessionSettings(prefix="", sample=sample))  # fmt: skip
    session.turns = [Turn(f"Set x{i}.", f"x{i} = {i} * {i} + {i}", status="ok") for i in range(30)]
    assert decoder.count_tokens(session.program()) > 128  # the whole program overflows it
    out = io.StringIO()
    repl = Repl(session, Console(file=out, width=100), model_name="tiny")

    match = TOOLBAR.search(repl.toolbar())
    assert match and match[2], repl.toolbar()
    tokens, left_out = int(match[1]), int(match[2])
    assert 0 < left_out < 30 and tokens <= 128 - 32
    kept = "".join(turn.text.render() for turn in session.turns[left_out:])
    assert tokens == decoder.count_tokens(kept)  # the newest turns, as the next prompt has them
    before = session.context("Next.").removesuffix("# Next.\n")  # the step line may cut one more
    assert before in (kept, "".join(turn.text.render() for turn in session.turns[left_out + 1 :]))

    session.turns.append(Turn("Set y.", "y = 1", status="ok"))  # counted again on a change
    again = TOOLBAR.search(repl.toolbar())
    assert again and again[2] and int(again[2]) >= left_out

    repl.handle("/context")  # what the model sees, counted the same way
    shown = out.getvalue()
    assert "x0 = 0 * 0 + 0" not in shown and "y = 1" in shown
    assert re.search(r"\d+ tokens of 128; \d+ older turns left out to fit;", shown), shown

    del session.turns[2:]  # a short session: nothing is left out
    short = TOOLBAR.search(repl.toolbar())
    assert short and short[2] is None
    assert int(short[1]) == decoder.count_tokens(session.program())
