"""Sampling over a params pytree: pure, jitted prefill and chunked decode with a KV cache.

- `prefill` runs a prompt suffix (right-padded to a shape bucket, so prompt lengths inside a
  bucket share one compilation) after `start` cached tokens, stores its keys/values at slots
  start.., and returns the logits of its last real token. Slots past the real tokens receive
  padding, but a slot counts as filled only up to the current position, and each decode chunk
  overwrites its slots before any later query can see them, so padding never leaks.
- `decode_chunk` runs `num_steps` sampling steps on the device (one `lax.scan`) and returns the
  tokens; the host streams them and decides whether to run another chunk.

Both take a `logits_fn(params, tokens, positions, memory) -> (logits, new_kv)`, so tests can
drive them with a fake model. Keys are explicit: step `t` of a request uses
`fold_in(key, t)`, so results do not depend on the chunk size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from codegen_repl.model.modeling import (
    NO_POSITION,
    CodeGen,
    KVCache,
    LayerCache,
    Segment,
    slot_positions,
    write_cache,
)
from codegen_repl.model.sample_params import SampleMode, SampleParams

Params = Any  # a params pytree (see checkpoint.Params); a fake model may use anything
# (params, tokens [batch, seq], positions [batch, seq], memory) -> (logits, new keys/values)
LogitsFn = Callable[[Params, jax.Array, jax.Array, tuple[Segment, ...]], tuple[jax.Array, KVCache]]
MIN_CACHE = 64  # the smallest cache; prefill widths go down to 1 (a new turn is often short)


class Knobs(NamedTuple):
    """The traced part: changing these does not recompile."""

    temperature: jax.Array  # scalar f32
    top_p: jax.Array  # scalar f32
    top_k: jax.Array  # scalar i32


def knobs(sample: SampleParams) -> Knobs:
    """The traced sampling settings of `sample` (changing them does not recompile)."""
    return Knobs(
        jnp.float32(sample.temperature or 1.0), jnp.float32(sample.top_p), jnp.int32(sample.top_k)
    )


class DecodeState(NamedTuple):
    cache: KVCache
    logits: jax.Array  # [batch, vocab] fp32: the distribution of the next token
    position: jax.Array  # scalar i32: the position (= cache slot) of the next token
    step: jax.Array  # scalar i32: tokens sampled so far in this request


def bucket(length: int, smallest: int = MIN_CACHE) -> int:
    """The smallest size >= length among powers of two and 1.5 times powers of two (1, 2, 3,
    4, 6, 8, 12, 16, 24, ...), at least `smallest`: few shapes to compile, at most a third of
    a prefill wasted on padding."""
    target = max(length, smallest)
    power = 1
    while power * 2 < target:
        power *= 2
    for size in (power, power * 3 // 2, power * 2):
        if size >= target:
            return size
    raise AssertionError("unreachable")


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
    """Run tokens [batch, width] (the first `length` real) after the `start` cached tokens,
    store them at slots start.., and return the logits [batch, vocab] of token `length - 1`."""
    batch, width = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(width, dtype=jnp.int32), tokens.shape)
    cached = Segment(cache, slot_positions(batch, _slots(cache), filled=start))
    logits, new = logits_fn(params, tokens, positions, (cached,))
    cache = write_cache(cache, new, start)
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
    """Sample `num_steps` tokens per row on the device. Returns the state and [batch, steps].

    The big cache is only read during the chunk; the chunk's own keys/values go to a small
    buffer that is written into the cache once at the end (see modeling.Attention).
    """
    batch, start = state.logits.shape[0], state.position
    cached = Segment(state.cache, slot_positions(batch, _slots(state.cache), filled=start))
    recent = tuple(
        LayerCache(*(jnp.zeros((*x.shape[:2], num_steps, x.shape[3]), x.dtype) for x in layer))
        for layer in state.cache
    )

    def step(carry: tuple[KVCache, jax.Array], j: jax.Array) -> tuple[tuple, jax.Array]:
        recent, logits = carry
        token = choose_tokens(logits, jax.random.fold_in(key, state.step + j), knobs, mode)
        chunk = Segment(recent, slot_positions(batch, num_steps, filled=j, start=start))
        positions = jnp.full((batch, 1), start + j, jnp.int32)
        logits, new = logits_fn(params, token[:, None], positions, (cached, chunk))
        return (write_cache(recent, new, j), logits[:, 0]), token

    steps = jnp.arange(num_steps, dtype=jnp.int32)
    (recent, logits), tokens = jax.lax.scan(step, (recent, state.logits), steps)
    cache = write_cache(state.cache, recent, start)
    return DecodeState(cache, logits, start + num_steps, state.step + num_steps), tokens.T


def _slots(cache: KVCache) -> int:
    return cache[0].keys.shape[2]


@functools.cache
def model_logits_fn(model: CodeGen) -> LogitsFn:
    """The logits_fn of a Flax CodeGen module (one object per module, so jit caches hit)."""

    def logits_fn(
        params: Params, tokens: jax.Array, positions: jax.Array, memory: tuple[Segment, ...]
    ) -> tuple[jax.Array, KVCache]:
        return model.apply({"params": params}, tokens, positions, memory)

    return logits_fn


# ----------------------------------------------------------------------------- slots (server)
# The decoder server decodes many requests as one batch of "slots": every row has its own
# position, step count, key and sampling knobs, so requests can join and leave between chunks.


class RowKnobs(NamedTuple):
    """Per-row sampling settings (traced: a new mix of requests does not recompile)."""

    temperature: jax.Array  # [rows] f32; 0 = greedy
    top_p: jax.Array  # [rows] f32; 1 = off
    top_k: jax.Array  # [rows] i32; 0 = off
    keys: jax.Array  # [rows] typed PRNG keys; step t of a row uses fold_in(key, t)


class SlotState(NamedTuple):
    cache: KVCache  # [rows, heads, slots, head_dim] per layer
    logits: jax.Array  # [rows, vocab] fp32: each row's next-token distribution
    position: jax.Array  # [rows] i32: the position (= cache slot) of each row's next token
    step: jax.Array  # [rows] i32: tokens sampled so far in each row's request


def row_knobs(samples: list[tuple[SampleParams, jax.Array]]) -> RowKnobs:
    """RowKnobs for (sample, key) pairs, one per row."""
    return RowKnobs(
        jnp.asarray([s.temperature for s, _ in samples], jnp.float32),
        jnp.asarray([s.top_p for s, _ in samples], jnp.float32),
        jnp.asarray([s.top_k for s, _ in samples], jnp.int32),
        jnp.stack([key for _, key in samples]),
    )


def union_mode(samples: list[SampleParams]) -> SampleMode:
    """The code paths a batch of rows needs: each row still gets exactly its own settings."""
    return SampleMode(
        all(s.temperature == 0 for s in samples),
        any(s.top_k > 0 for s in samples),
        any(s.top_p < 1 for s in samples),
    )


def choose_row(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
    top_k: jax.Array, mode: SampleMode,
) -> jax.Array:  # fmt: skip
    """One row's token, exactly as `choose_tokens` picks it for a batch of one with that row's
    settings (same masks, same random numbers). logits: [vocab] fp32 -> scalar int32."""
    greedy = jnp.argmax(logits).astype(jnp.int32)
    if mode.greedy:
        return greedy
    scaled = logits / jnp.where(temperature == 0, 1.0, temperature)
    if mode.top_k or mode.top_p:
        descending = -jnp.sort(-scaled)  # [vocab]
        threshold = jnp.float32(-jnp.inf)
        if mode.top_k:
            # top_k = 0 keeps every token (the threshold is the smallest logit)
            k = jnp.where(top_k > 0, jnp.clip(top_k, 1, scaled.shape[-1]), scaled.shape[-1])
            threshold = descending[k - 1]
            descending = jnp.where(descending < threshold, -jnp.inf, descending)
        if mode.top_p:
            probs = jax.nn.softmax(descending)
            before = jnp.cumsum(probs) - probs
            kept = jnp.where(before < top_p, descending, jnp.inf)
            threshold = jnp.where(top_p < 1, jnp.maximum(threshold, jnp.min(kept)), threshold)
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled[None], axis=-1)[0].astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)


def _row_positions(start: jax.Array, slots: int, filled: jax.Array) -> jax.Array:
    """[rows, slots]: slot i of row r holds position start[r] + i for i < filled[r]."""
    index = jnp.arange(slots, dtype=jnp.int32)[None, :]
    return jnp.where(index < filled[:, None], start[:, None] + index, NO_POSITION)


def write_rows(cache: KVCache, new: KVCache, starts: jax.Array) -> KVCache:
    """Store new [rows, heads, seq, head_dim] at slots starts[r].. of each row r."""

    def one(old: jax.Array, fresh: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice(old, fresh.astype(old.dtype), (0, start, 0))

    write = jax.vmap(one)
    return tuple(
        LayerCache(write(old.keys, fresh.keys, starts), write(old.values, fresh.values, starts))
        for old, fresh in zip(cache, new, strict=True)
    )


@functools.partial(
    jax.jit, static_argnames=("logits_fn", "num_steps", "mode"), donate_argnames=("state",)
)
def decode_slots(
    logits_fn: LogitsFn,
    params: Params,
    state: SlotState,
    knobs: RowKnobs,
    num_steps: int,
    mode: SampleMode,
) -> tuple[SlotState, jax.Array]:
    """`decode_chunk` with a position, step, key and knobs per row. Returns the state and the
    tokens [rows, steps]. A row's tokens equal those `decode_chunk` gives it alone."""
    rows, slots = state.logits.shape[0], _slots(state.cache)
    start = state.position
    cached = Segment(state.cache, _row_positions(jnp.zeros_like(start), slots, start))
    recent = tuple(
        LayerCache(*(jnp.zeros((*x.shape[:2], num_steps, x.shape[3]), x.dtype) for x in layer))
        for layer in state.cache
    )
    choose = jax.vmap(choose_row, in_axes=(0, 0, 0, 0, 0, None))

    def step(carry: tuple[KVCache, jax.Array], j: jax.Array) -> tuple[tuple, jax.Array]:
        recent, logits = carry
        keys = jax.vmap(jax.random.fold_in)(knobs.keys, state.step + j)
        token = choose(logits, keys, knobs.temperature, knobs.top_p, knobs.top_k, mode)
        filled = jnp.full((rows,), j, jnp.int32)
        chunk = Segment(recent, _row_positions(start, num_steps, filled))
        logits, new = logits_fn(params, token[:, None], (start + j)[:, None], (cached, chunk))
        return (write_cache(recent, new, j), logits[:, 0]), token

    steps = jnp.arange(num_steps, dtype=jnp.int32)
    (recent, logits), tokens = jax.lax.scan(step, (recent, state.logits), steps)
    cache = write_rows(state.cache, recent, start)
    return SlotState(cache, logits, start + num_steps, state.step + num_steps), tokens.T


@functools.partial(jax.jit, static_argnames=("logits_fn",), donate_argnames=("cache", "logits"))
def prefill_rows(
    logits_fn: LogitsFn,
    params: Params,
    tokens: jax.Array,
    length: jax.Array,
    cache: KVCache,
    logits: jax.Array,
    start: jax.Array,
    rows: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """Prefill one prompt suffix (tokens [1, width], `length` real) after the `start` tokens
    that row rows[0] of the slot cache holds, and copy the result into every row of `rows`
    ([n] i32, n samples of one request). Returns the slot logits [all rows, vocab] and cache."""
    source = rows[0]
    row_cache = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, source, 0), cache)
    row_logits, row_cache = prefill(logits_fn, params, tokens, length, row_cache, start)
    n = rows.shape[0]
    cache = jax.tree.map(
        lambda x, row: x.at[rows].set(jnp.broadcast_to(row, (n, *row.shape[1:]))),
        cache,
        row_cache,
    )
    return logits.at[rows].set(jnp.broadcast_to(row_logits, (n, row_logits.shape[-1]))), cache
