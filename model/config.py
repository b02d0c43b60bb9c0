"""Model configuration: one frozen dataclass, presets for every published CodeGen-1 checkpoint.

The HF `config.json` of a CodeGen checkpoint is read into `CodeGenConfig` and written back from
it; nothing else in the project reads `config.json` keys.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from codegen_repl.errors import ConfigError

MP_NUM = 4  # CodeGen-1 was trained on 4 model-parallel shards; its fused qkv keeps that layout.
SIZES = ("350M", "2B", "6B", "16B")
VARIANTS = ("nl", "multi", "mono")
ACTIVATIONS = ("gelu_new",)

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
    def from_hf_dict(cls, hf: dict[str, Any], hub_id: str | None = None) -> CodeGenConfig:
        """Read the fields of an HF CodeGen `config.json` (already parsed)."""
        model_type = hf.get("model_type")
        architectures = hf.get("architectures") or ["CodeGenForCausalLM"]
        if model_type != "codegen" or "CodeGenForCausalLM" not in architectures:
            raise ConfigError(
                f"unsupported architecture: model_type={model_type!r}, "
                f"architectures={architectures}; only CodeGen-1 checkpoints "
                "(model_type 'codegen', CodeGenForCausalLM) can be loaded"
            )
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=true is not CodeGen-1 (lm_head is untied)")
        try:
            hidden_size = int(hf["n_embd"])
            return cls(
                vocab_size=int(hf["vocab_size"]),
                max_positions=int(hf.get("n_positions", 2048)),
                hidden_size=hidden_size,
                num_layers=int(hf["n_layer"]),
                num_heads=int(hf["n_head"]),
                rotary_dim=int(hf["rotary_dim"] or hidden_size // int(hf["n_head"])),
                intermediate_size=int(hf.get("n_inner") or 4 * hidden_size),
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
                activation=str(hf.get("activation_function", "gelu_new")),
                bos_token_id=int(hf.get("bos_token_id", 50256) or 0),
                eos_token_id=int(hf.get("eos_token_id", 50256)),
                hub_id=hub_id,
            )
        except KeyError as missing:
            raise ConfigError(f"config.json lacks the required key {missing}") from None
        except (TypeError, ValueError) as bad:
            if isinstance(bad, ConfigError):
                raise
            raise ConfigError(f"config.json has a value of the wrong type: {bad}") from None

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
        try:
            hf = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist; a checkpoint folder needs config.json"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as bad:
            raise ConfigError(
                f"{path} is not valid JSON ({bad}); re-download the checkpoint"
            ) from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(hf).__name__}")
        return cls.from_hf_dict(hf, hub_id=hub_id)

    def to_json_file(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
