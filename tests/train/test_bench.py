"""bench/train.py runs (tiny shape, CPU) and reports both implementations in JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "train.py"


@pytest.mark.slow
def test_bench_train_reports_jax_and_transformers() -> None:
    command = [sys.executable, str(BENCH), "--shape", "tiny", "--steps", "2", "--warmup", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["impl"] for line in lines] == ["codegen-repl (JAX)", "transformers (PyTorch)"]
    for line in lines:
        assert line["shape"] == "tiny" and line["batch"] * line["seq_len"] == 4 * 128
        assert line["tokens_per_s"] > 0 and 0 < line["mfu"] < 1
        assert line["peak_source"].startswith("measured fp32")
        assert line["flop_formula"].startswith("6*N + 6*L*s*d")
    assert lines[0]["flops_per_token"] == lines[1]["flops_per_token"]
    jax_line = lines[0]
    assert jax_line["attention"] == "xla" and not jax_line["cudnn_attention_in_step"]
    assert jax_line["xla_tflop_per_step"] > 0
    parts = jax_line["breakdown_ms"]
    assert set(parts) == {"attention_xla_all_layers", "lm_head_and_loss", "optimizer_update"}
    assert all(value > 0 for value in parts.values())


@pytest.mark.slow
def test_bench_train_needs_neither_grain_nor_tensorboardx() -> None:
    """The GPU machine may lack the data loader's and the metrics writer's packages."""
    blocked = "import sys; sys.modules.update(grain=None, tensorboardX=None); import runpy; "
    argv = ["train.py", "--impl", "jax", "--shape", "tiny", "--steps", "1", "--warmup", "1"]
    argv += ["--peak-tflops", "1", "--no-breakdown"]
    code = blocked + f"sys.argv = {argv!r}; runpy.run_path({str(BENCH)!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = json.loads(done.stdout.splitlines()[-1])
    assert line["impl"] == "codegen-repl (JAX)" and line["tokens_per_s"] > 0
    assert "breakdown_ms" not in line


def test_bench_train_stops_at_its_budget() -> None:
    """Past --budget-s, each remaining measurement is one JSON line saying it was not made."""
    command = [sys.executable, str(BENCH), "--shape", "tiny", "--budget-s", "0.001"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["impl"] for line in lines] == ["codegen-repl (JAX)", "transformers (PyTorch)"]
    assert all(line["error"] == "not measured: past --budget-s 0.001" for line in lines)
