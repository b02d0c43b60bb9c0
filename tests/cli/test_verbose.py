"""`codegen-repl generate --verbose` names the paths fp32 weights and the decode attention take
on the CPU, with the C++ extension and without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen_repl.model import cpu_matmul
from tests.cli.test_cli import PROMPT, run_cli


@pytest.mark.parametrize("switch", ["1", "0"])
def test_generate_verbose_names_the_paths_of_fp32_weights(
    chat_checkpoint: Path, switch: str
) -> None:
    args = ["--model", str(chat_checkpoint), "--verbose", "--max-new-tokens", "2", PROMPT]
    result = run_cli("generate", *args, env={"CODEGEN_CPU_MATMUL": switch})
    assert result.returncode == 0, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "int8/bf16" not in line  # the weights are fp32
    if switch == "1" and cpu_matmul.available():  # the tiny model's head_dim 16 fits the kernel
        assert "· float32 · CPU matmul (float32 weights): C++ kernel (" in line
        assert line.endswith(" · decode attention: C++ kernel")
    else:
        assert "· float32 · CPU matmul (float32 weights): XLA (" in line
        assert line.endswith(" · decode attention: XLA")
