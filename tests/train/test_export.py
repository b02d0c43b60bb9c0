"""Export: transformers loads the exported folder with the same logits, and
`codegen-repl generate --model EXPORT` runs it."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from codegen_repl.cli.app import app
from codegen_repl.model.modeling import CodeGen
from codegen_repl.train.config import TrainConfig
from codegen_repl.train.export import export, load_trained_params

TOLERANCE = 1e-4  # largest logit difference relative to the logit scale, as in tests/model


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run, _ = trained_run
    return export(run, tmp_path_factory.mktemp("export") / "model")


def test_transformers_loads_the_export_with_the_same_logits(trained_run, exported: Path):
    import torch
    import transformers

    run, _ = trained_run
    config = TrainConfig.load(run / "train_config.json")
    params = load_trained_params(run, 8, config)
    ids = np.random.default_rng(0).integers(0, 600, (2, 24))
    ours, _ = CodeGen(config.model).apply({"params": params}, jnp.asarray(ids))
    hf = transformers.CodeGenForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    scale = np.abs(theirs).max()
    assert np.abs(np.asarray(ours) - theirs).max() / scale < TOLERANCE
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.decode(tokenizer("def total(count):")["input_ids"]) == "def total(count):"


def test_generate_runs_the_export(exported: Path) -> None:
    result = CliRunner().invoke(
        app, ["generate", "--model", str(exported), "--max-new-tokens", "8", "def total"]
    )
    assert result.exit_code == 0, result.output
    assert result.output  # 8 tokens of a model trained for 8 steps: text, not a given text


def test_export_of_a_step_folder_and_bad_paths(trained_run, tmp_path: Path) -> None:
    run, _ = trained_run
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run / "checkpoints" / "4"), str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert '"step": 4' in (tmp_path / "m" / "training.json").read_text()
    result = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "n")])
    assert result.exit_code == 2
    assert "is neither a run folder of `codegen-repl train`" in result.output
