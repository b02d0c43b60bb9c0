"""SampleParams: how to choose tokens and where to stop. Importable without JAX, so the
session, the remote decoder and the kernel can build requests without loading it."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from codegen_repl.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """How to choose tokens and where to stop.

    Args:
        max_new_tokens: most tokens to generate per sample.
        temperature: 0 is greedy; otherwise logits are divided by it.
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 is off.
        n: samples per prompt, decoded as one batch.
        seed: the random seed; the same seed gives the same samples.
        stop: strings that end a sample (not included in it).
        codegen_rules: apply CodeGen's truncation rules (see codegen_repl.core.truncation).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()
    codegen_rules: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")

    @property
    def mode(self) -> SampleMode:
        """Which sampling code paths a compiled sampler needs (static for jit)."""
        return SampleMode(self.temperature == 0, self.top_k > 0, self.top_p < 1)


class SampleMode(NamedTuple):
    """The static part of the sampling settings: which code paths are compiled in."""

    greedy: bool
    top_k: bool
    top_p: bool
