"""Sampling over a params pytree: pure, jitted prefill and chunked decode with a KV cache.

- `prefill` runs a prompt suffix (right-padded to a shape bucket, so prompt lengths inside a
  bucket share one compilation) into the cache at `start`, and returns the logits of its last
  real token. Slots past the real tokens receive padding keys, but every decode step writes its
  own slot before any query can see it (slot i holds position i; queries see slots <= their
  position), so padding never leaks into a result.
- `decode_chunk` runs `num_steps` sampling steps on the device (one `lax.scan`) and returns the
  tokens; the host streams them and decides whether to run another chunk.

Both take a `logits_fn(params, tokens, cache, cache_index) -> (logits, cache)`, so tests can
drive them with a fake model. Keys are explicit: step `t` of a request uses
`fold_in(key, t)`, so results do not depend on the chunk size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from codegen_repl.errors import ConfigError
from codegen_repl.model.modeling import CodeGen, KVCache

Params = Any  # a params pytree (see checkpoint.Params); a fake model may use anything
LogitsFn = Callable[[Params, jax.Array, KVCache, jax.Array], tuple[jax.Array, KVCache]]
MIN_BUCKET = 64


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
        codegen_rules: apply CodeGen's truncation rules (see codegen_repl.truncation).
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
        return SampleMode(self.temperature == 0, self.top_k > 0, self.top_p < 1)

    def knobs(self) -> Knobs:
        return Knobs(
            jnp.float32(self.temperature or 1.0), jnp.float32(self.top_p), jnp.int32(self.top_k)
        )


class SampleMode(NamedTuple):
    """The static part of the sampling settings: which code paths are compiled in."""

    greedy: bool
    top_k: bool
    top_p: bool


class Knobs(NamedTuple):
    """The traced part: changing these does not recompile."""

    temperature: jax.Array  # scalar f32
    top_p: jax.Array  # scalar f32
    top_k: jax.Array  # scalar i32


class DecodeState(NamedTuple):
    cache: KVCache
    logits: jax.Array  # [batch, vocab] fp32: the distribution of the next token
    index: jax.Array  # scalar i32: the cache slot (= position) of the next token
    step: jax.Array  # scalar i32: tokens sampled so far in this request


def bucket(length: int) -> int:
    """The smallest power of two >= length, at least MIN_BUCKET."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return size


def choose_tokens(logits: jax.Array, key: jax.Array, knobs: Knobs, mode: SampleMode) -> jax.Array:
    """One token per row. logits: [batch, vocab] fp32 -> [batch] int32."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / knobs.temperature
    if mode.top_k or mode.top_p:
        descending = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
        threshold = jnp.full((logits.shape[0], 1), -jnp.inf)
        if mode.top_k:
            k = jnp.clip(knobs.top_k, 1, logits.shape[-1])
            threshold = jax.lax.dynamic_slice_in_dim(descending, k - 1, 1, axis=-1)
            # as transformers does: top-p is taken over the top-k renormalised
            descending = jnp.where(descending < threshold, -jnp.inf, descending)
        if mode.top_p:
            probs = jax.nn.softmax(descending, axis=-1)
            # keep a token while the mass before it is below top_p: the top token always stays
            before = jnp.cumsum(probs, axis=-1) - probs
            kept = jnp.where(before < knobs.top_p, descending, jnp.inf)
            threshold = jnp.maximum(threshold, jnp.min(kept, axis=-1, keepdims=True))
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("logits_fn",), donate_argnames=("cache",))
def prefill(
    logits_fn: LogitsFn,
    params: Params,
    tokens: jax.Array,
    length: jax.Array,
    cache: KVCache,
    start: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Run tokens [batch, bucket] (the first `length` real) into the cache at slot `start`.

    Returns the logits [batch, vocab] of token `length - 1` and the cache.
    """
    logits, cache = logits_fn(params, tokens, cache, start)
    return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False), cache


@functools.partial(
    jax.jit, static_argnames=("logits_fn", "num_steps", "mode"), donate_argnames=("state",)
)
def decode_chunk(
    logits_fn: LogitsFn,
    params: Params,
    state: DecodeState,
    key: jax.Array,
    knobs: Knobs,
    num_steps: int,
    mode: SampleMode,
) -> tuple[DecodeState, jax.Array]:
    """Sample `num_steps` tokens per row on the device. Returns the state and [batch, steps]."""

    def step(state: DecodeState, _: None) -> tuple[DecodeState, jax.Array]:
        token = choose_tokens(state.logits, jax.random.fold_in(key, state.step), knobs, mode)
        logits, cache = logits_fn(params, token[:, None], state.cache, state.index)
        return DecodeState(cache, logits[:, 0], state.index + 1, state.step + 1), token

    state, tokens = jax.lax.scan(step, state, None, length=num_steps)
    return state, tokens.T


@functools.cache
def model_logits_fn(model: CodeGen) -> LogitsFn:
    """The logits_fn of a Flax CodeGen module (one object per module, so jit caches hit)."""

    def logits_fn(
        params: Params, tokens: jax.Array, cache: KVCache, cache_index: jax.Array
    ) -> tuple[jax.Array, KVCache]:
        logits, new_cache = model.apply(
            {"params": params}, tokens, cache=cache, cache_index=cache_index
        )
        assert new_cache is not None
        return logits, new_cache

    return logits_fn
