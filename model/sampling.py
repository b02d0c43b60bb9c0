"""Token sampling over a params pytree: pure, jitted prefill and decode with a KV cache.

`prefill` runs the prompt (right-padded to a shape bucket, so prompt lengths inside one bucket
share one compilation) and fills the cache; `decode` runs one token per call. Slots past the
real prompt hold padding keys, but each decode step overwrites its own slot before any query can
attend to it (slot i holds position i and queries see slots <= their position), so padding never
leaks into the result.

The token choice (`choose_tokens`) is a pure function of logits and an explicit key, so it can
be tested with fake logits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.errors import ConfigError
from codegen_repl.model.checkpoint import Params
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, KVCache, init_cache

MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """How to choose tokens. `temperature == 0` is greedy; top_k 0 and top_p 1 are off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


def bucket(length: int, limit: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET), capped at `limit`."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, limit)


def choose_tokens(logits: jax.Array, key: jax.Array, sample: SampleParams) -> jax.Array:
    """Pick one token per row.

    Args:
        logits: [batch, vocab] fp32.
    Returns:
        [batch] int32 token ids.
    """
    if sample.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sample.temperature
    if sample.top_k:
        kth = jax.lax.top_k(logits, min(sample.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sample.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it
        # is still below top_p (so the most likely token always stays).
        keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < sample.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def prefill(
    model: CodeGen, params: Params, tokens: jax.Array, length: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Run a right-padded prompt. tokens: [batch, bucket]; returns logits [batch, vocab] of the
    last real token (index length - 1) and the filled cache."""
    logits, cache = model.apply({"params": params}, tokens, cache=cache, cache_index=jnp.int32(0))
    return jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False), cache


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode(
    model: CodeGen, params: Params, tokens: jax.Array, index: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """One step. tokens: [batch] at position `index`; returns logits [batch, vocab]."""
    logits, cache = model.apply({"params": params}, tokens[:, None], cache=cache, cache_index=index)
    return logits[:, 0], cache


def generate_tokens(
    config: CodeGenConfig,
    params: Params,
    prompt: list[int],
    sample: SampleParams,
    stop_ids: tuple[int, ...] = (),
) -> Iterator[int]:
    """Yield new tokens one at a time; stops after a token in `stop_ids` (not yielded)."""
    if not prompt:
        raise ConfigError("the prompt is empty; give at least one token")
    total = len(prompt) + sample.max_new_tokens
    if total > config.max_positions:
        raise ConfigError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({sample.max_new_tokens}) exceeds "
            f"the model's context of {config.max_positions} tokens; shorten one of them"
        )
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    model = CodeGen(config, dtype=dtype, param_dtype=dtype)
    cache_len = bucket(total, config.max_positions)
    padded = np.zeros((1, bucket(len(prompt), cache_len)), np.int32)
    padded[0, : len(prompt)] = prompt
    cache = init_cache(config, 1, cache_len, dtype)
    logits, cache = prefill(model, params, jnp.asarray(padded), jnp.int32(len(prompt)), cache)
    key = jax.random.key(sample.seed)
    for step in range(sample.max_new_tokens):
        key, sub = jax.random.split(key)
        token = choose_tokens(logits, sub, sample)
        token_id = int(token[0])
        if token_id in stop_ids:
            return
        yield token_id
        if step + 1 < sample.max_new_tokens:
            logits, cache = decode(model, params, token, jnp.int32(len(prompt) + step), cache)
