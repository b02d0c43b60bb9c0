"""Training runs end to end: memorization, exact resume after a stop, Ctrl-C in a real process,
fine-tuning from an HF checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from codegen_repl.train.data import BuildConfig, PackedSource, build_dataset, make_loader
from codegen_repl.train.loop import StopFlag, TrainResult, train
from tests.train.conftest import quiet, tiny_config

MEMORIZE_STEPS = 50
MEMORIZE_THRESHOLD = 0.1  # nats per token; a random 2-layer model starts near ln(1000) = 6.9


def test_a_tiny_model_memorizes_a_tiny_corpus(corpus: Path, tokenizer_files, tmp_path: Path):
    data = tmp_path / "data"
    files = [str(file) for file in sorted(corpus.iterdir())[:2]]
    manifest = build_dataset(
        BuildConfig(sources=tuple(files), out=data, tokenizer=str(tokenizer_files), seq_len=32,
                    val_fraction=0.0)
    )  # fmt: skip
    assert manifest["splits"]["train"]["rows"] <= 8  # each row is seen at least 30 times
    config = tiny_config(
        data, tmp_path / "run", "warmup_steps=5", "lr=1e-2", steps=MEMORIZE_STEPS, batch_size=4
    )
    result = train(config, console=quiet())
    first, last = result.losses[0][1], result.losses[-1][1]
    assert first > 5.0
    assert last < MEMORIZE_THRESHOLD, f"loss {last:.3f} after {MEMORIZE_STEPS} steps"


def test_a_stopped_run_resumes_exactly(dataset: Path, trained_run, tmp_path: Path) -> None:
    reference_out, reference = trained_run
    out = tmp_path / "run"

    def stop_after_three(step: int, stop: StopFlag) -> None:
        if step == 3:
            stop.request()  # exactly what the SIGINT handler does

    settings = ("save_every=4", "eval_every=4")
    first = train(tiny_config(dataset, out, *settings), console=quiet(), on_step=stop_after_three)
    assert first.interrupted and first.step == 3 and first.checkpoint == out / "checkpoints" / "3"
    second = train(tiny_config(dataset, out, *settings), console=quiet())
    assert not second.interrupted and second.step == 8
    # Bit-exact on CPU: the same losses, the same final data position and parameters.
    assert first.losses + second.losses == reference.losses
    assert first.eval_losses + second.eval_losses == reference.eval_losses
    assert [step for step, _ in second.losses] == [4, 5, 6, 7, 8]
    data_state = "checkpoints/8/data/process_0-of-1.json"
    assert (out / data_state).read_text() == (reference_out / data_state).read_text()
    assert same_params(out, reference_out, step=8)


def test_a_run_writes_its_config_metrics_and_evaluations(dataset: Path, trained_run) -> None:
    from codegen_repl.train.config import TrainConfig

    out, result = trained_run
    saved = TrainConfig.load(out / "train_config.json")
    assert (saved.steps, saved.seq_len, saved.data) == (8, 32, str(dataset))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    assert train_steps == list(range(1, 9))
    logged = [r["train/loss"] for r in records if "train/loss" in r]
    assert logged == [loss for _, loss in result.losses]
    evaluations = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    assert evaluations == result.eval_losses and [s for s, _ in evaluations] == [4, 8]
    assert all(0 < loss < 10 for _, loss in evaluations)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "8"]


def same_params(run: Path, other: Path, step: int) -> bool:
    from codegen_repl.train.config import TrainConfig
    from codegen_repl.train.export import load_trained_params

    config = TrainConfig.load(run / "train_config.json")
    a, b = (load_trained_params(path, step, config) for path in (run, other))
    import jax

    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "codegen_repl.cli.app", "train", "--data", str(dataset), "--out",
        str(out), "--steps", "100000", "--batch-size", "4", "compute_dtype=float32",
        "log_every=1", "eval_every=0", "save_every=0",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(out / "metrics.jsonl", steps=2, process=process, timeout=180)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"interrupted at step {step}; checkpoint saved in" in stderr
    assert (out / "checkpoints" / str(step) / "params").is_dir()
    assert step < 100000


def wait_for_steps(metrics: Path, steps: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if process.poll() is not None:
            pytest.fail(f"training exited early: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.2)
    pytest.fail(f"no {steps} logged steps within {timeout}s")


def test_fine_tuning_starts_at_the_checkpoint_loss(
    corpus: Path, chat_checkpoint: Path, tmp_path: Path
) -> None:
    import torch
    import transformers

    from codegen_repl.model.checkpoint import read_config

    data = tmp_path / "data"
    build_dataset(
        BuildConfig(sources=(str(corpus),), out=data, tokenizer=str(chat_checkpoint), seq_len=32,
                    val_fraction=0.0)
    )  # fmt: skip
    config = tiny_config(
        data, tmp_path / "run", "lr=1e-4", steps=2, init_from=str(chat_checkpoint),
        model=read_config(chat_checkpoint),
    )  # fmt: skip
    result: TrainResult = train(config, console=quiet())
    rows = next(iter(make_loader(PackedSource(data, "train"), 4, seed=config.seed)))
    hf = transformers.CodeGenForCausalLM.from_pretrained(chat_checkpoint).eval()
    with torch.no_grad():
        logits = hf(torch.as_tensor(np.maximum(rows, 0), dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits, -1).numpy()[:, :-1]  # [batch, seq - 1, vocab]
    targets = rows[:, 1:]
    picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
    expected = -picked[targets >= 0].mean()
    assert result.losses[0][1] == pytest.approx(expected, rel=1e-5)
    assert os.path.samefile(config.init_from or "", chat_checkpoint)


def test_train_cli_reports_bad_input_in_one_line(dataset: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from codegen_repl.cli.app import app

    runner = CliRunner()
    run = ["--out", str(tmp_path / "run")]
    cases = [
        (["--data", str(tmp_path)], "has no manifest.json; build a dataset with"),
        (["--data", str(dataset), "lr=fast"], "lr='fast' is not a valid float"),
        (["--data", str(dataset), "seq_len=64"], "but the data was packed at 32; rebuild"),
        (["--data", str(dataset), "model.vocab_size=100"], "set model.vocab_size="),
        (["--data", str(dataset), "--preset", "7B"], "preset must be one of tiny, 350M"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["train", *args, *run])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.startswith("error: ")
        assert "Traceback" not in result.output
