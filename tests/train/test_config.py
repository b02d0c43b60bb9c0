"""TrainConfig: presets, key=value overrides, validation, JSON round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen_repl.errors import ConfigError
from codegen_repl.train.config import TrainConfig


def test_presets_take_the_published_shapes() -> None:
    config = TrainConfig.create("350M")
    assert (config.model.num_layers, config.model.hidden_size) == (20, 1024)
    assert config.lr == pytest.approx(1.8e-4)
    assert TrainConfig.create("2B").model.hidden_size == 2560
    assert TrainConfig.create("tiny").model.hidden_size == 64


def test_overrides_are_typed_and_reach_the_model() -> None:
    config = TrainConfig.create(
        "tiny",
        ["lr=1e-4", "grad_accum=2", "remat=true", "model.num_layers=3", "init_from=none"],
        batch_size=8,
    )
    assert config.lr == 1e-4 and config.grad_accum == 2 and config.remat is True
    assert config.model.num_layers == 3 and config.init_from is None
    assert config.micro_batch == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learning_rate=1"], "unknown setting 'learning_rate'; known: preset, data"),
        (["model.layers=2"], "unknown setting 'model.layers'"),
        (["steps=ten"], "steps='ten' is not a valid int"),
        (["remat=maybe"], "remat='maybe' is not a valid bool"),
        (["lr"], "is not key=value"),
        (["grad_accum=3"], "must be a multiple of grad_accum"),
        (["compute_dtype=float16"], "compute_dtype must be one of bfloat16, float32"),
        (["seq_len=4096"], "exceeds the model's context"),
        (["model.num_heads=3"], "num_heads must be a multiple of 4"),
    ],
)
def test_bad_settings_say_what_is_allowed(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig.create("tiny", overrides)


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="preset must be one of tiny, 350M, 2B, 6B, 16B"):
        TrainConfig.create("7B")


def test_saved_config_reads_back_equal(tmp_path: Path) -> None:
    config = TrainConfig.create("350M", ["model.max_positions=1024", "seq_len=1024"], steps=7)
    config.save(tmp_path / "train_config.json")
    assert TrainConfig.load(tmp_path / "train_config.json") == config
