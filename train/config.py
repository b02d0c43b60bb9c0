"""The training configuration: one frozen dataclass, presets per model size, key=value overrides.

`TrainConfig.create(preset, **flags, overrides=["lr=1e-4", "model.num_layers=4"])` is the one
way a run is configured; the resolved config is logged and saved beside the checkpoints
(`train_config.json`), and `TrainConfig.from_json` reads it back for a resume or an export.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from codegen_repl.errors import ConfigError
from codegen_repl.model.config import SIZES, CodeGenConfig

PRESETS = ("tiny", *SIZES)
COMPUTE_DTYPES = ("bfloat16", "float32")

# preset -> (learning rate, global batch in sequences), after the CodeGen paper's table 2
# (350M: 1.8e-4; 2B: 1.6e-4; 6B: 1.2e-4; 16B: 0.9e-4) with batches that fit one host.
_PRESET_OPTIMIZATION: dict[str, tuple[float, int]] = {
    "tiny": (3e-3, 8),
    "350M": (1.8e-4, 32),
    "2B": (1.6e-4, 32),
    "6B": (1.2e-4, 64),
    "16B": (0.9e-4, 64),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on.

    Args:
        model: the network's shapes (a preset's, or the `init_from` checkpoint's).
        preset: the name the model shapes came from (tiny, 350M, 2B, 6B, 16B).
        data: the folder `codegen-repl data build` wrote.
        out: the run folder: train_config.json, checkpoints/, metrics.jsonl, tensorboard/.
        init_from: an HF checkpoint (folder or hub id) to fine-tune from; None = random init.
        steps: optimizer steps in the whole run (the cosine schedule ends here).
        batch_size: global batch in sequences per optimizer step (all accumulation steps).
        grad_accum: micro-batches per optimizer step; batch_size must be a multiple of it.
        seq_len: tokens per sequence; at most the data's and the model's sequence length.
        lr, min_lr_ratio, warmup_steps: linear warmup to lr, cosine down to lr * min_lr_ratio.
        b1, b2, eps, weight_decay: AdamW (decay on matrices and embeddings only).
        clip_norm: global gradient-norm clip.
        compute_dtype: activations and matmuls; master weights are always fp32.
        remat: recompute each block's activations in the backward pass.
        mesh_data, mesh_fsdp, mesh_tensor: device mesh sizes (one may be -1: the rest).
        eval_every, eval_batches: validation loss cadence and size (0 = never).
        save_every, keep_checkpoints: checkpoint cadence and how many to keep.
        log_every: metrics cadence in steps.
        seed: parameter init, data order and the run's RNG.
        loader_workers: grain worker processes (0 = read in this process).
        peak_tflops: peak TFLOP/s of one device for MFU (0 = the datasheet value of known
            GPUs/TPUs; CPUs have none, so MFU shows n/a unless you set it).
    """

    model: CodeGenConfig
    preset: str = "tiny"
    data: str = ""
    out: str = ""
    init_from: str | None = None
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 0  # 0 = the data's sequence length
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    compute_dtype: str = "bfloat16"
    remat: bool = False
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    seed: int = 0
    loader_workers: int = 0
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                f"got {self.compute_dtype!r}"
            )
        positive = ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("seq_len", "warmup_steps", "eval_every", "eval_batches", "save_every")
        for name in (*non_negative, "loader_workers", "weight_decay", "lr", "peak_tflops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                f"({self.grad_accum}): each accumulation step takes batch_size / grad_accum"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.b1 < 1 or not 0 <= self.b2 < 1:
            raise ConfigError("min_lr_ratio must be in [0, 1] and b1, b2 in [0, 1)")
        if self.clip_norm <= 0:
            raise ConfigError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.seq_len > self.model.max_positions:
            raise ConfigError(
                f"seq_len ({self.seq_len}) exceeds the model's context "
                f"({self.model.max_positions}); lower seq_len or raise model.max_positions"
            )

    @property
    def micro_batch(self) -> int:
        """Sequences per accumulation step (over all devices)."""
        return self.batch_size // self.grad_accum

    # ----------------------------------------------------------------------------- building

    @classmethod
    def create(
        cls, preset: str = "tiny", overrides: list[str] | tuple[str, ...] = (), **fields: Any
    ) -> TrainConfig:
        """A preset, then explicit fields (None = keep the preset's), then `key=value`
        overrides (`model.KEY=value` changes the network's shape)."""
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        model = CodeGenConfig.tiny() if preset == "tiny" else CodeGenConfig.preset(preset)
        lr, batch_size = _PRESET_OPTIMIZATION[preset]
        values: dict[str, Any] = {"preset": preset, "lr": lr, "batch_size": batch_size}
        values |= {key: value for key, value in fields.items() if value is not None}
        model_changes: dict[str, Any] = {}
        for item in overrides:
            key, value = _split_override(item)
            if key.startswith("model."):
                name = key.removeprefix("model.")
                model_changes[name] = _parse_field(CodeGenConfig, name, value)
            else:
                values[key] = _parse_field(cls, key, value)
        if isinstance(values.get("model"), CodeGenConfig):
            model = values.pop("model")
        try:
            model = dataclasses.replace(model, **model_changes)
        except TypeError as bad:
            raise ConfigError(f"bad model override: {bad}") from None
        return cls(model=model, **values)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"] = dataclasses.asdict(self.model)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        fields = dict(data)
        fields["model"] = CodeGenConfig(**fields["model"])
        return cls(**fields)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist; pass a run folder written by `codegen-repl train`"
            ) from None
        except (json.JSONDecodeError, TypeError, KeyError) as bad:
            raise ConfigError(f"{path} is not a valid training config ({bad})") from None


def _split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not key=value (e.g. lr=1e-4, model.num_layers=4)")
    return key.strip(), value.strip()


def _parse_field(owner: type, name: str, text: str) -> Any:
    """`text` as the type of `owner`'s field `name`, or a ConfigError listing the fields."""
    hints = typing.get_type_hints(owner)
    names = [field.name for field in dataclasses.fields(owner) if field.name != "model"]
    if name not in names:
        prefix = "model." if owner is CodeGenConfig else ""
        raise ConfigError(
            f"unknown setting '{prefix}{name}'; known: {', '.join(prefix + n for n in names)}"
        )
    kind = hints[name]
    optional = isinstance(kind, types.UnionType) and type(None) in kind.__args__
    if optional and text.lower() in ("none", "null", ""):
        return None
    if optional:
        kind = next(arg for arg in kind.__args__ if arg is not type(None))
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind.__name__}") from None
