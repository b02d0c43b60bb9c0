"""bench/train.py runs (tiny shape, CPU) and reports both implementations in JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_train_reports_jax_and_transformers() -> None:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, str(root / "bench" / "train.py"), "--shape", "tiny"]
    done = subprocess.run(
        [*command, "--steps", "2", "--warmup", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["impl"] for line in lines] == ["codegen-repl (JAX)", "transformers (PyTorch)"]
    for line in lines:
        assert line["shape"] == "tiny" and line["batch"] * line["seq_len"] == 4 * 128
        assert line["tokens_per_s"] > 0 and 0 < line["mfu"] < 1
        assert line["peak_source"].startswith("measured fp32")
    assert lines[0]["flops_per_token"] == lines[1]["flops_per_token"]
