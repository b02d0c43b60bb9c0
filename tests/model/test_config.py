"""Presets, HF config.json round trips, and validation messages."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import transformers

from codegen_repl.errors import ConfigError
from codegen_repl.model.config import SIZES, VARIANTS, CodeGenConfig

# Parameter counts of the published checkpoints, as transformers counts them (millions).
PUBLISHED_MILLIONS = {"350M": 356.7, "2B": 2779.2, "6B": 7107.9, "16B": 16032.1}


def parameter_count(config: CodeGenConfig) -> int:
    d, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    block = 2 * d + 3 * d * d + d * d + (d * inner + inner) + (inner * d + d)
    return vocab * d + config.num_layers * block + 2 * d + d * vocab + vocab


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_presets_cover_every_published_checkpoint(size: str, variant: str) -> None:
    config = CodeGenConfig.preset(size, variant)
    assert config.hub_id == f"Salesforce/codegen-{size}-{variant}"
    assert CodeGenConfig.from_hub_id(config.hub_id) == config
    assert (config.vocab_size, config.max_positions) == (51200, 2048)
    millions = parameter_count(config) / 1e6
    assert abs(millions - PUBLISHED_MILLIONS[size]) / PUBLISHED_MILLIONS[size] < 0.01


def test_preset_shapes() -> None:
    shapes = {
        size: (c.num_layers, c.hidden_size, c.num_heads, c.rotary_dim)
        for size in SIZES
        for c in [CodeGenConfig.preset(size)]
    }
    assert shapes == {
        "350M": (20, 1024, 16, 32),
        "2B": (32, 2560, 32, 64),
        "6B": (33, 4096, 16, 64),
        "16B": (34, 6144, 24, 64),
    }


def test_hf_config_round_trip_through_transformers(tmp_path) -> None:
    config = CodeGenConfig.preset("2B", "multi")
    config.to_json_file(tmp_path / "config.json")
    hf = transformers.CodeGenConfig.from_pretrained(tmp_path)
    assert (hf.n_layer, hf.n_embd, hf.n_head, hf.rotary_dim) == (32, 2560, 32, 64)
    hf.save_pretrained(tmp_path / "again")
    again = CodeGenConfig.from_json_file(tmp_path / "again" / "config.json")
    assert again == dataclasses.replace(config, hub_id=None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_heads": 6, "hidden_size": 96}, "num_heads must be a multiple of 4"),
        ({"hidden_size": 100}, "hidden_size (100) must be divisible by num_heads (16)"),
        ({"rotary_dim": 7}, "rotary_dim must be even and in 2..head_dim (64), got 7"),
        ({"rotary_dim": 128}, "rotary_dim must be even and in 2..head_dim (64), got 128"),
        ({"activation": "relu"}, "activation must be one of ('gelu_new',), got 'relu'"),
        ({"num_layers": 0}, "num_layers must be a positive integer, got 0"),
    ],
)
def test_validation_lists_what_is_allowed(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        CodeGenConfig(**change)
    assert message in str(error.value)


def test_unknown_preset_names() -> None:
    with pytest.raises(ConfigError, match=r"choose one of 350M, 2B, 6B, 16B"):
        CodeGenConfig.preset("7B")
    with pytest.raises(ConfigError, match=r"choose one of nl, multi, mono"):
        CodeGenConfig.preset("2B", "python")
    with pytest.raises(ConfigError, match=r"not a published CodeGen-1 checkpoint"):
        CodeGenConfig.from_hub_id("Salesforce/codegen2-1B")


def test_config_json_errors(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"is not valid JSON"):
        CodeGenConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{"model_type": "codegen", "n_embd": 64}')
    with pytest.raises(ConfigError, match=r"lacks the required key 'vocab_size'"):
        CodeGenConfig.from_json_file(tmp_path / "config.json")
    broken = CodeGenConfig.tiny().to_hf_dict() | {"vocab_size": "many"}
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match=r'vocab_size is "many", expected an integer'):
        CodeGenConfig.from_json_file(tmp_path / "config.json")


INTEGER_FIELDS = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "eos_token_id"]
NULLABLE_INTEGER_FIELDS = ["rotary_dim", "n_inner", "bos_token_id"]
WRONG_TYPES = [
    *[(key, value, "an integer") for key in INTEGER_FIELDS for value in (64.5, "64", True, None)],
    *[(key, 64.0, "an integer") for key in INTEGER_FIELDS],
    *[
        (key, value, "an integer or null")
        for key in NULLABLE_INTEGER_FIELDS
        for value in (8.5, "8", False, [8])
    ],
    ("layer_norm_epsilon", "1e-5", "a finite number"),
    ("layer_norm_epsilon", float("nan"), "a finite number"),
    ("layer_norm_epsilon", float("inf"), "a finite number"),
    ("layer_norm_epsilon", True, "a finite number"),
    ("activation_function", "relu", "one of gelu_new"),
    ("activation_function", 1, "one of gelu_new"),
    ("tie_word_embeddings", "false", "true or false"),
    ("tie_word_embeddings", 0, "true or false"),
    ("architectures", "CodeGenForCausalLM", "a list of class names"),
    ("architectures", [1], "a list of class names"),
    ("model_type", 7, "a string"),
]


@pytest.mark.parametrize(("key", "value", "expected"), WRONG_TYPES)
def test_every_config_json_field_is_type_checked(tmp_path, key, value, expected) -> None:
    """`"n_embd": 64.5` or `"64"` used to load as 64; now each is one line naming all of it."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CodeGenConfig.tiny().to_hf_dict() | {key: value}))
    with pytest.raises(ConfigError) as error:
        CodeGenConfig.from_json_file(path)
    assert str(error.value) == (
        f"{path}: {key} is {json.dumps(value)}, expected {expected}; "
        "fix that field or download the checkpoint again"
    )


def test_nulls_and_defaults_that_are_allowed(tmp_path) -> None:
    hf = CodeGenConfig.tiny().to_hf_dict() | {"n_inner": None, "rotary_dim": None}
    hf |= {"bos_token_id": None, "layer_norm_epsilon": 1, "architectures": None}
    for key in ("n_positions", "activation_function", "tie_word_embeddings", "model_type"):
        hf.pop(key)
    hf["model_type"] = "codegen"
    config = CodeGenConfig.from_hf_dict(hf)
    assert (config.intermediate_size, config.rotary_dim, config.bos_token_id) == (256, 16, 0)
    assert (config.max_positions, config.layer_norm_epsilon) == (2048, 1.0)


def test_validation_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "config.json"
    hf = CodeGenConfig.tiny().to_hf_dict()
    for change, message in [
        ({"n_head": 6, "n_embd": 96}, "num_heads must be a multiple of 4"),
        ({"n_layer": -1}, "num_layers must be a positive integer, got -1"),
        ({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon must be a positive number"),
    ]:
        path.write_text(json.dumps(hf | change))
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(message)}"):
            CodeGenConfig.from_json_file(path)


def test_config_json_that_is_a_folder(tmp_path) -> None:
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ConfigError) as error:
        CodeGenConfig.from_json_file(tmp_path / "config.json")
    assert str(error.value) == (
        f"{tmp_path / 'config.json'} is a folder; a checkpoint's config.json must be a JSON file"
    )
