"""SampleParams: how to choose tokens and where to stop. Importable without JAX, so the
session, the remote decoder and the kernel can build requests without loading it."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from codegen_repl.errors import ConfigError

# Below this, a temperature is greedy (vLLM's _SAMPLING_EPS): dividing fp32 logits by a tinier
# one overflows to inf (inf - inf is NaN in the softmax), and above it logits/temperature stays
# finite for any logit under 3e33 while ties aside the draw is already the argmax.
GREEDY_BELOW = 1e-5
MAX_TEMPERATURE = 2.0  # OpenAI's limit, which the server enforces: the same limit in-process
TOP_K_OFF = 2**31 - 1  # at or above this (int32's largest), top_k is off whatever the vocabulary
MAX_SEED = 2**63 - 1  # the largest seed JAX's key takes (an int64)


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """How to choose tokens and where to stop.

    Args:
        max_new_tokens: most tokens to generate per sample.
        temperature: 0 is greedy; otherwise logits are divided by it. At most MAX_TEMPERATURE.
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: keep the k most likely tokens; 0 is off.
        n: samples per prompt, decoded as one batch.
        seed: the random seed; the same seed gives the same samples.
        stop: strings that end a sample (not included in it).
        codegen_rules: apply CodeGen's truncation rules (see codegen_repl.core.truncation).

    The numeric edges, decided here once so that every sampler (in-process, the server's
    engine) and every request to a server see the same values:
    - a temperature below GREEDY_BELOW (1e-5), down to the smallest positive float, is greedy:
      it is stored as 0.0 (greedy ignores top_p and top_k, which are kept for a later change);
    - a top_p below GREEDY_BELOW is stored as GREEDY_BELOW: both keep only the likeliest token
      (the mass before the second one is at least 1/vocab, about 2e-5 for CodeGen's 51,200
      tokens), and a smaller one would round to 0 in fp32, which keeps no token at all;
    - top_p 1.0 is off; top_k at or above the vocabulary is off: TOP_K_OFF and above are stored
      as 0 here, and `for_vocab(size)` turns off a top_k >= size once the vocabulary is known
      (a sampler also clips k to the vocabulary, which keeps every token);
    - NaN and infinities are refused, as is a temperature above MAX_TEMPERATURE (2.0, the
      limit of OpenAI's API and of our server).

    Raises:
        ConfigError: a value is out of its range; the message says what is allowed.
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
        if not (math.isfinite(self.temperature) and self.temperature <= MAX_TEMPERATURE):
            raise ConfigError(
                f"temperature must be in [0, {MAX_TEMPERATURE}] (0 = greedy; below "
                f"{GREEDY_BELOW} is greedy too), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if not 0 <= self.seed <= MAX_SEED:  # what a JAX key takes (the server asks for less)
            raise ConfigError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.top_k >= TOP_K_OFF:
            object.__setattr__(self, "top_k", 0)
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_p < GREEDY_BELOW:
            object.__setattr__(self, "top_p", GREEDY_BELOW)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def mode(self) -> SampleMode:
        """Which sampling code paths a compiled sampler needs (static for jit)."""
        return SampleMode(self.greedy, self.top_k > 0, self.top_p < 1)

    def for_vocab(self, vocab_size: int) -> SampleParams:
        """These settings for a model of `vocab_size` tokens: a top_k that keeps them all is
        off (the same tokens, without the top-k code path)."""
        if self.top_k >= vocab_size:
            return dataclasses.replace(self, top_k=0)
        return self


class SampleMode(NamedTuple):
    """The static part of the sampling settings: which code paths are compiled in."""

    greedy: bool
    top_k: bool
    top_p: bool
