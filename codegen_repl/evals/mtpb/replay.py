"""MTPB replay: play one problem's turns in a live `Session` (generate, show, run in the
kernel), then score the session's program exactly as `mtpb evaluate` would.

The kernel is not asked for the verdict: its state may hold the outputs of undone turns and
of the user's own experiments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from codegen_repl.evals.mtpb.problems import Problem
from codegen_repl.evals.mtpb.scoring import Result, score_program
from codegen_repl.evals.sandbox import SandboxConfig

if TYPE_CHECKING:  # these import JAX and jupyter; sandbox workers import this package
    from codegen_repl.core.outputs import OutputCallback
    from codegen_repl.core.session import Session


def replay(
    session: Session,
    problem: Problem,
    index: int,
    on_turn: Callable[[int, str], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_output: OutputCallback | None = None,
    confirm: Callable[[str], bool] | None = None,
    config: SandboxConfig | None = None,
) -> Result:
    """Play problem `problem` with test input `index` in a live session: for each turn,
    `on_turn(number, prompt)`, generate (streamed to `on_text`), ask `confirm(code)` (None:
    run everything), run in the kernel (outputs to `on_output`); then score the program.
    The session samples each turn with the problem's max_gen_length (at most half the
    model's window, so a small model still gets context)."""

    before = session.settings
    tokens = min(problem.max_gen_length, max(1, session.decoder.max_context // 2))
    sample_params = dataclasses.replace(before.sample, max_new_tokens=tokens)
    session.settings = dataclasses.replace(before, sample=sample_params)
    try:
        for number, prompt in enumerate(problem.turns(index), start=1):
            if on_turn:
                on_turn(number, prompt)
            code, seconds = session.generate(prompt, on_text)
            session.add_step(prompt, code, seconds, on_output, confirm(code) if confirm else True)
    finally:
        session.settings = before
    return score_program(session.program(), problem, index, config)
