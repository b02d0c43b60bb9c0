"""The trained fixture does what end-to-end tests rely on: known code for known steps."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.model.sample_params import SampleParams
from tests.trained import PAIRS, expected_prompt


@pytest.mark.slow
def test_greedy_decoding_writes_each_steps_code_after_any_history(
    trained_checkpoint: Path,
) -> None:
    decoder = LocalDecoder.load(trained_checkpoint)
    rng = random.Random(0)
    greedy = SampleParams(max_new_tokens=48, codegen_rules=True)
    for step, code in PAIRS.items():
        others = [other for other in PAIRS if other != step]
        for prefix in (MTPB_PREFIX, ""):
            history = rng.sample(others, rng.randint(0, 4))
            [text] = decoder.complete(expected_prompt(step, history, prefix), greedy)
            assert text.rstrip("\n") == code, (step, history)  # the cut keeps the blank line
