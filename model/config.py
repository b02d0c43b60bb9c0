"""Model configuration: one frozen dataclass, presets for every published CodeGen-1 checkpoint.

The HF `config.json` of a CodeGen checkpoint is read into `CodeGenConfig` and written back from
it; nothing else in the project reads `config.json` keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

from codegen_repl.errors import ConfigError

MP_NUM = 4  # CodeGen-1 was trained on 4 model-parallel shards; its fused qkv keeps that layout.
SIZES = ("350M", "2B", "6B", "16B")
VARIANTS = ("nl", "multi", "mono")
ACTIVATIONS = ("gelu_new",)

FieldKind = Literal["int", "int or null", "number", "bool", "str or null", "names", "activation"]
_REQUIRED = object()  # the default of a config.json key that must be present
# Every config.json key that is read, with the JSON type it must have and its default when absent.
HF_FIELDS: dict[str, tuple[FieldKind, object]] = {
    "model_type": ("str or null", None),
    "architectures": ("names", None),
    "tie_word_embeddings": ("bool", False),
    "vocab_size": ("int", _REQUIRED),
    "n_positions": ("int", 2048),
    "n_embd": ("int", _REQUIRED),
    "n_layer": ("int", _REQUIRED),
    "n_head": ("int", _REQUIRED),
    "rotary_dim": ("int or null", _REQUIRED),
    "n_inner": ("int or null", None),
    "layer_norm_epsilon": ("number", 1e-5),
    "activation_function": ("activation", "gelu_new"),
    "bos_token_id": ("int or null", 50256),
    "eos_token_id": ("int", 50256),
}
_EXPECTED: dict[FieldKind, str] = {
    "int": "an integer",
    "int or null": "an integer or null",
    "number": "a finite number",
    "bool": "true or false",
    "str or null": "a string",
    "names": "a list of class names",
    "activation": f"one of {', '.join(ACTIVATIONS)}",
}

# size -> (num_layers, hidden_size, num_heads, rotary_dim), from the published config.json files.
_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "350M": (20, 1024, 16, 32),
    "2B": (32, 2560, 32, 64),
    "6B": (33, 4096, 16, 64),
    "16B": (34, 6144, 24, 64),
}


@dataclasses.dataclass(frozen=True)
class CodeGenConfig:
    """Shapes and constants of a CodeGen-1 network.

    Args:
        vocab_size: rows of the embedding and of `lm_head` (51200 for every published model).
        max_positions: the context window in tokens (`n_positions`, 2048).
        hidden_size: model width `d` (`n_embd`).
        num_layers: transformer blocks (`n_layer`).
        num_heads: attention heads (`n_head`); a multiple of 4 (the mp_num=4 qkv layout).
        rotary_dim: leading dims of each head that get rotary embeddings; even, <= head_dim.
        intermediate_size: MLP width (`n_inner`, default 4 * hidden_size).
        layer_norm_epsilon: LayerNorm epsilon.
        activation: MLP activation; CodeGen-1 uses `gelu_new` (tanh approximation).
        bos_token_id, eos_token_id: special token ids (`<|endoftext|>` = 50256).
        hub_id: the HF hub repository this config belongs to, if it is a published one.
    """

    vocab_size: int = 51200
    max_positions: int = 2048
    hidden_size: int = 1024
    num_layers: int = 20
    num_heads: int = 16
    rotary_dim: int = 32
    intermediate_size: int = 4096
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    hub_id: str | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "max_positions", "hidden_size", "num_layers", "num_heads")
        for name in (*positive, "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(
                f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon}"
            )
        if self.num_heads % MP_NUM:
            raise ConfigError(
                f"num_heads must be a multiple of {MP_NUM} (CodeGen's fused qkv layout), "
                f"got {self.num_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"rotary_dim must be even and in 2..head_dim ({self.head_dim}), "
                f"got {self.rotary_dim}"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    # ----------------------------------------------------------------------------- presets

    @classmethod
    def preset(cls, size: str, variant: str = "mono") -> CodeGenConfig:
        """The config of a published checkpoint, e.g. `preset("350M", "mono")`."""
        if size not in _SHAPES:
            raise ConfigError(f"unknown CodeGen size {size!r}; choose one of {', '.join(SIZES)}")
        if variant not in VARIANTS:
            raise ConfigError(
                f"unknown CodeGen variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        num_layers, hidden_size, num_heads, rotary_dim = _SHAPES[size]
        return cls(
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            rotary_dim=rotary_dim,
            intermediate_size=4 * hidden_size,
            bos_token_id=1,  # as in the published config.json files; CodeGen never emits BOS
            hub_id=f"Salesforce/codegen-{size}-{variant}",
        )

    @classmethod
    def from_hub_id(cls, hub_id: str) -> CodeGenConfig:
        """The preset for `Salesforce/codegen-{size}-{variant}`."""
        for size in SIZES:
            for variant in VARIANTS:
                if hub_id == f"Salesforce/codegen-{size}-{variant}":
                    return cls.preset(size, variant)
        raise ConfigError(
            f"{hub_id!r} is not a published CodeGen-1 checkpoint; known ids are "
            f"Salesforce/codegen-{{{','.join(SIZES)}}}-{{{','.join(VARIANTS)}}}"
        )

    @classmethod
    def tiny(cls) -> CodeGenConfig:
        """A very small config for tests and smoke runs (random weights only)."""
        return cls(
            vocab_size=1000,
            max_positions=256,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            rotary_dim=8,
            intermediate_size=256,
        )

    # ----------------------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf_dict(
        cls, hf: dict[str, Any], hub_id: str | None = None, source: str = "config.json"
    ) -> CodeGenConfig:
        """Read the fields of an HF CodeGen `config.json` (already parsed), each type-checked.

        Raises:
            ConfigError: one line naming `source`, the field, its value and what is expected.
        """
        for key, (kind, default) in HF_FIELDS.items():
            value = hf.get(key, default)
            if value is _REQUIRED:
                raise ConfigError(f"{source} lacks the required key '{key}'")
            if not _is_kind(value, kind):
                raise ConfigError(
                    f"{source}: {key} is {_shown(value)}, expected {_EXPECTED[kind]}; "
                    "fix that field or download the checkpoint again"
                )
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or ["CodeGenForCausalLM"]
        if model_type != "codegen" or "CodeGenForCausalLM" not in architectures:
            raise ConfigError(
                f"{source}: unsupported architecture: model_type={model_type!r}, "
                f"architectures={architectures}; only CodeGen-1 checkpoints "
                "(model_type 'codegen', CodeGenForCausalLM) can be loaded"
            )
        if hf.get("tie_word_embeddings", False):
            raise ConfigError(
                f"{source}: tie_word_embeddings=true is not CodeGen-1 (lm_head is untied)"
            )
        hidden_size, num_heads = hf["n_embd"], hf["n_head"]
        try:
            return cls(
                vocab_size=hf["vocab_size"],
                max_positions=hf.get("n_positions", 2048),
                hidden_size=hidden_size,
                num_layers=hf["n_layer"],
                num_heads=num_heads,
                rotary_dim=hf["rotary_dim"] or max(hidden_size // max(num_heads, 1), 1),
                intermediate_size=hf.get("n_inner") or 4 * hidden_size,
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
                activation=hf.get("activation_function", "gelu_new"),
                bos_token_id=hf.get("bos_token_id", 50256) or 0,
                eos_token_id=hf.get("eos_token_id", 50256),
                hub_id=hub_id,
            )
        except ConfigError as bad:
            raise ConfigError(f"{source}: {bad}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers' `CodeGenForCausalLM` loads."""
        return {
            "architectures": ["CodeGenForCausalLM"],
            "model_type": "codegen",
            "activation_function": self.activation,
            "vocab_size": self.vocab_size,
            "n_positions": self.max_positions,
            "n_ctx": self.max_positions,
            "n_embd": self.hidden_size,
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "rotary_dim": self.rotary_dim,
            "n_inner": self.intermediate_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }

    @classmethod
    def from_json_file(cls, path: Path, hub_id: str | None = None) -> CodeGenConfig:
        """Read an HF `config.json`; every failure is one ConfigError line naming `path`."""
        try:
            hf = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist; a checkpoint folder needs config.json"
            ) from None
        except IsADirectoryError:
            raise ConfigError(
                f"{path} is a folder; a checkpoint's config.json must be a JSON file"
            ) from None
        except OSError as bad:
            raise ConfigError(f"{path} cannot be read: {bad.strerror or bad}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as bad:
            raise ConfigError(
                f"{path} is not valid JSON ({bad}); re-download the checkpoint"
            ) from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(hf).__name__}")
        return cls.from_hf_dict(hf, hub_id=hub_id, source=str(path))

    def to_json_file(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")


def _is_kind(value: object, kind: FieldKind) -> bool:
    """Whether a parsed JSON value has the type `kind` (JSON true/false are not integers)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    match kind:
        case "int":
            return is_int
        case "int or null":
            return is_int or value is None
        case "number":
            return is_int or (isinstance(value, float) and math.isfinite(value))
        case "bool":
            return isinstance(value, bool)
        case "str or null":
            return isinstance(value, str) or value is None
        case "names":
            return value is None or (
                isinstance(value, list) and all(isinstance(name, str) for name in value)
            )
        case "activation":
            return value in ACTIVATIONS
    return False


def _shown(value: object) -> str:
    """A JSON value as config.json spells it, cut to one short line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
