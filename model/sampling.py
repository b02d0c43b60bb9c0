"""Sampling over a params pytree: pure, jitted prefill and chunked decode with a KV cache.

The one decode path of the local decoder and of the server's engine. Both keep a `DecodeState`
of `rows` sequences (a request's n samples; the server's slots), each row with its own
position, step count, random key and sampling knobs, so the server's requests can join and
leave between chunks and a local request is simply the rows of one request.

- `prefill_rows` runs a prompt suffix (right-padded to a shape bucket, so prompt lengths inside
  a bucket share one compilation) after the `start` tokens one row's cache already holds
  (prefix reuse), writes its keys/values at positions start.., and copies that row's cache and
  next-token logits into every row of the request. A cache position counts only up to a row's
  current position, and each decode step writes its position before any query can see it, so
  the padding never leaks. A prefill with nothing cached (`start == 0`) runs the model without a
  cache: one fused causal attention over the new tokens, then one write into the cache.
- `decode_chunk` runs `num_steps` sampling steps on the device (one `lax.scan`: each step
  attends over the cache and the new token, then writes the token's keys/values into the
  cache, in place) and returns the tokens; the host streams them and decides whether to run
  another chunk.

Both take a `logits_fn(params, tokens, positions, cache, logits_at) -> (logits, kv)`, so tests
can drive them with a fake model. Keys are explicit: step `t` of a row uses
`fold_in(key, t)`, so results do not depend on the chunk size or on the other rows.

The host-side helpers (prefix reuse, chunk rounding, the padded prefill, the chunk size) are
here too, so the local decoder and the engine cannot drift apart.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, KVCache, cache_length, init_cache, write_cache
from codegen_repl.model.sample_params import SampleMode, SampleParams

Params = Any  # a params pytree (see checkpoint.Params); a fake model may use anything
# (params, tokens [batch, seq], positions [batch, seq], cache or None, logits_at [batch] or None)
#   -> (logits [batch, seq or 1, vocab], the tokens' keys/values or the updated cache)
LogitsFn = Callable[
    [Params, jax.Array, jax.Array, KVCache | None, jax.Array | None], tuple[jax.Array, KVCache]
]
MIN_CACHE = 64  # the smallest cache; prefill widths go down to 1 (a new turn is often short)


def default_chunk_size() -> int:
    """Tokens per decode chunk: small on CPU (a chunk is slow there, and streams should flow),
    larger on accelerators (each chunk costs one return to the host)."""
    return 4 if jax.default_backend() == "cpu" else 16


# ----------------------------------------------------------------------------- host helpers


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


def cache_bucket(length: int, limit: int) -> int:
    """A cache length (positions) for `length` tokens: `bucket()`'s sizes (64, 96, 128, 192,
    256, 384, ...), at most max(length, limit) (`limit`: the model's context). Not coarser:
    each decode step touches every cache position, and on the CPU a 256-position cache made
    the 350M shape's steps 15% slower than a 192-position one at bench/decode.py's 192 tokens
    (measured); a session growing to 1,500 tokens meets 6 lengths, each compiled ahead of
    time (see the local decoder's `prepare`)."""
    return min(bucket(length), max(length, limit))


def prefill_width(length: int, room: int) -> int:
    """The padded width (tokens) of a prefill of `length` tokens with `room` positions left
    in the cache: 16, 32 or 64 up to 64 tokens (a turn's new text is short: three programs
    cover it), then bucket() widths (1.5x steps, at most a third wasted on a long prompt)."""
    width = bucket(length, smallest=16)
    return min(width * 4 // 3 if width in (24, 48) else width, room)


def common_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many leading tokens of `prompt` a cache holding `cached` can reuse: the common
    prefix, leaving at least one token to prefill (the prefill gives the next logits)."""
    same, limit = 0, min(len(cached), len(prompt) - 1)
    while same < limit and cached[same] == prompt[same]:
        same += 1
    return same


def decode_steps(max_new_tokens: int, chunk_size: int) -> int:
    """Decode steps a request runs: whole chunks (the tokens past max_new_tokens are dropped)."""
    return -(-max_new_tokens // chunk_size) * chunk_size


def padded_suffix(
    prompt_ids: Sequence[int], reuse: int, cache_len: int, smallest: int | None
) -> np.ndarray:
    """The tokens to prefill after `reuse` cached ones, right-padded to a bucket width (at
    least `smallest`; None: `prefill_width`'s coarse widths) that still fits in the cache:
    [1, width] int32."""
    suffix = prompt_ids[reuse:]
    room = cache_len - reuse
    if smallest is None:
        width = prefill_width(len(suffix), room)
    else:
        width = min(bucket(len(suffix), smallest=smallest), room)
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(suffix)] = suffix
    return padded


# ----------------------------------------------------------------------------- the state


class Knobs(NamedTuple):
    """Per-row sampling settings (traced: a new mix of requests does not recompile)."""

    temperature: jax.Array  # [rows] f32; 0 = greedy
    top_p: jax.Array  # [rows] f32; 1 = off
    top_k: jax.Array  # [rows] i32; 0 = off
    keys: jax.Array  # [rows] typed PRNG keys; step t of a row uses fold_in(key, t)


class DecodeState(NamedTuple):
    cache: KVCache  # [rows, heads, length, head_dim] per layer
    logits: jax.Array  # [rows, vocab] fp32: each row's next-token distribution
    position: jax.Array  # [rows] i32: the position (= cache index) of each row's next token
    step: jax.Array  # [rows] i32: tokens sampled so far in each row's request


def empty_state(cache: KVCache, vocab_size: int) -> DecodeState:
    """A state over `cache` whose rows hold nothing yet."""
    rows = cache[0].keys.shape[0]
    logits = jnp.zeros((rows, vocab_size), jnp.float32)
    # two arrays, not one twice: the state is donated, and a buffer is donated only once
    return DecodeState(cache, logits, jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "rows", "length", "dtype"))
def fresh_state(config: CodeGenConfig, rows: int, length: int, dtype: jnp.dtype) -> DecodeState:
    """An empty state of `rows` rows over a cache of `length` positions, as one program (so
    it can be compiled ahead, like the others)."""
    return empty_state(init_cache(config, rows, length, dtype), config.vocab_size)


@functools.partial(jax.jit, static_argnames=("rows", "length"))
def resize_state(state: DecodeState, rows: int, length: int) -> DecodeState:
    """The state with `rows` rows and a cache of `length` positions (padded with zeros or cut:
    a cut row or position is forgotten). One program per pair of shapes (compiled ahead by
    the local decoder's `prepare`)."""

    def fit(x: jax.Array, axis: int, size: int) -> jax.Array:
        if x.shape[axis] >= size:
            return jax.lax.slice_in_dim(x, 0, size, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, size - x.shape[axis])
        return jnp.pad(x, pad)

    cache: KVCache = jax.tree.map(lambda x: fit(fit(x, 0, rows), 2, length), state.cache)
    return DecodeState(
        cache, fit(state.logits, 0, rows), fit(state.position, 0, rows), fit(state.step, 0, rows)
    )


def sample_key(sample: SampleParams, index: int) -> jax.Array:
    """The key of sample `index` of a request: sample 0 uses key(seed), sample j > 0 folds j
    in, so each sample has its own stream (the same locally and on the server)."""
    key = jax.random.key(sample.seed)
    return key if index == 0 else jax.random.fold_in(key, index)


def knobs(samples: Sequence[tuple[SampleParams, jax.Array]]) -> Knobs:
    """Knobs for (sample, key) pairs, one per row."""
    return Knobs(
        jnp.asarray([s.temperature for s, _ in samples], jnp.float32),
        jnp.asarray([s.top_p for s, _ in samples], jnp.float32),
        jnp.asarray([s.top_k for s, _ in samples], jnp.int32),
        jnp.stack([key for _, key in samples]),
    )


def request_knobs(sample: SampleParams) -> Knobs:
    """The knobs of the n rows of one request."""
    return knobs([(sample, sample_key(sample, index)) for index in range(sample.n)])


def union_mode(samples: Sequence[SampleParams]) -> SampleMode:
    """The code paths a batch of rows needs: each row still gets exactly its own settings."""
    return SampleMode(
        all(s.temperature == 0 for s in samples),
        any(s.top_k > 0 for s in samples),
        any(s.top_p < 1 for s in samples),
    )


# ----------------------------------------------------------------------------- the sampler


def choose_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
    top_k: jax.Array, mode: SampleMode,
) -> jax.Array:  # fmt: skip
    """One row's token. logits: [vocab] fp32 -> scalar int32.

    Temperature 0 is greedy; top-k then top-p (over the top-k renormalised, as transformers
    does); `mode` leaves out the code paths no row needs."""
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
            # keep a token while the mass before it is below top_p: the top token always stays
            before = jnp.cumsum(probs) - probs
            kept = jnp.where(before < top_p, descending, jnp.inf)
            threshold = jnp.where(top_p < 1, jnp.maximum(threshold, jnp.min(kept)), threshold)
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled[None], axis=-1)[0].astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)


def choose_tokens(logits: jax.Array, knobs: Knobs, steps: jax.Array, mode: SampleMode) -> jax.Array:
    """One token per row, row r with its own knobs and key fold_in(keys[r], steps[r]).
    logits: [rows, vocab] fp32; steps: [rows] -> [rows] int32."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    keys = jax.vmap(jax.random.fold_in)(knobs.keys, steps)
    choose = jax.vmap(choose_token, in_axes=(0, 0, 0, 0, 0, None))
    return choose(logits, keys, knobs.temperature, knobs.top_p, knobs.top_k, mode)


# ----------------------------------------------------------------------------- device programs


@functools.partial(jax.jit, static_argnames=("logits_fn", "cold"), donate_argnames=("state",))
def prefill_rows(
    logits_fn: LogitsFn,
    params: Params,
    state: DecodeState,
    tokens: jax.Array,
    length: jax.Array,
    start: jax.Array,
    rows: jax.Array,
    cold: bool,
) -> DecodeState:
    """Prefill one prompt suffix (tokens [1, width], `length` real) after the `start` tokens
    that row rows[0] holds, and copy the result into every row of `rows` ([n] i32, the n
    samples of one request), which then stand at position start + length, step 0.
    `cold` (start == 0): no cache to read, the model attends over the new tokens only."""
    source = rows[0]
    cache = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, source, 0), state.cache)
    width = tokens.shape[1]
    positions = start + jnp.arange(width, dtype=jnp.int32)[None, :]
    last = jnp.reshape(length - 1, (1,))
    if cold:
        logits, new = logits_fn(params, tokens, positions, None, last)
        cache = write_cache(cache, new, 0)
    else:
        logits, cache = logits_fn(params, tokens, positions, cache, last)
    n = rows.shape[0]

    def spread(x: jax.Array, row: jax.Array) -> jax.Array:
        return x.at[rows].set(jnp.broadcast_to(row, (n, *row.shape[1:])))

    return DecodeState(
        jax.tree.map(spread, state.cache, cache),
        spread(state.logits, logits[:, 0]),
        state.position.at[rows].set(start + length),
        state.step.at[rows].set(0),
    )


def prefill_prompt(
    logits_fn: LogitsFn,
    params: Params,
    state: DecodeState,
    prompt_ids: Sequence[int],
    reuse: int,
    rows: Sequence[int],
    smallest: int | None = 1,
    cold: bool | None = None,
) -> DecodeState:
    """Prefill what row rows[0] lacks of `prompt_ids` (it holds the first `reuse` tokens) and
    start every row of `rows` on the prompt (see prefill_rows; `smallest` is the narrowest
    prefill width, a bucket; None: `prefill_width`'s coarse widths). `cold`: prefill_rows'
    program without a cache to read; None: when reuse == 0 (False there runs the cached
    program from position 0, which costs nothing more where attention reads only the
    positions in use)."""
    padded = padded_suffix(prompt_ids, reuse, cache_length(state.cache), smallest)
    # numpy in, not jnp.asarray: that runs (and first compiles) a small program per shape
    return prefill_rows(
        logits_fn, params, state, padded, np.int32(len(prompt_ids) - reuse), np.int32(reuse),
        np.asarray(rows, np.int32), cold=reuse == 0 if cold is None else cold,
    )  # fmt: skip


@functools.partial(
    jax.jit, static_argnames=("logits_fn", "num_steps", "mode"), donate_argnames=("state",)
)
def decode_chunk(
    logits_fn: LogitsFn,
    params: Params,
    state: DecodeState,
    knobs: Knobs,
    num_steps: int,
    mode: SampleMode,
) -> tuple[DecodeState, jax.Array]:
    """Sample `num_steps` tokens per row on the device. Returns the state and the tokens
    [rows, num_steps]. A row's tokens do not depend on the other rows."""

    def step(carry: tuple[KVCache, jax.Array], j: jax.Array) -> tuple[tuple, jax.Array]:
        cache, logits = carry
        token = choose_tokens(logits, knobs, state.step + j, mode)
        positions = (state.position + j)[:, None]
        logits, cache = logits_fn(params, token[:, None], positions, cache, None)
        return (cache, logits[:, 0]), token

    steps = jnp.arange(num_steps, dtype=jnp.int32)
    (cache, logits), tokens = jax.lax.scan(step, (state.cache, state.logits), steps)
    after = DecodeState(cache, logits, state.position + num_steps, state.step + num_steps)
    return after, tokens.T


@functools.cache
def model_logits_fn(model: CodeGen) -> LogitsFn:
    """The logits_fn of a Flax CodeGen module (one object per module, so jit caches hit)."""

    def logits_fn(
        params: Params,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None,
        logits_at: jax.Array | None,
    ) -> tuple[jax.Array, KVCache]:
        return model.apply({"params": params}, tokens, positions, cache, logits_at)

    return logits_fn


# ----------------------------------------------------------------------------- ahead of time


def lower_prefill(
    logits_fn: LogitsFn, params: Params, state: Any, width: int, rows: int, cold: bool
) -> Any:
    """prefill_rows lowered for a state shaped like `state` (a DecodeState of arrays or of
    jax.ShapeDtypeStruct), a [1, width] suffix and `rows` rows: `.compile()` it (in any
    thread) and the jitted call with those shapes finds it compiled."""
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    return prefill_rows.lower(
        logits_fn, params, state, jax.ShapeDtypeStruct((1, width), jnp.int32), scalar, scalar,
        jax.ShapeDtypeStruct((rows,), jnp.int32), cold=cold,
    )  # fmt: skip


def lower_decode(
    logits_fn: LogitsFn, params: Params, state: Any, knobs: Any, num_steps: int, mode: SampleMode
) -> Any:
    """decode_chunk lowered for a state and knobs shaped like these (see lower_prefill)."""
    return decode_chunk.lower(logits_fn, params, state, knobs, num_steps, mode)
