"""The CodeGen-1 network in Flax, exactly as the published checkpoints were trained.

Read top to bottom: rotary embeddings, attention, MLP, block, model. What must be exact:

- The fused `qkv_proj` of the checkpoints is permuted once at load time (checkpoint.py) into a
  `[hidden, 3, heads, head_dim]` kernel holding plain (query, key, value); the hot path never
  sees the mp_num=4 shard layout.
- Rotary embeddings are interleaved (GPT-J style: pairs (0, 1), (2, 3), ...) and touch only
  the first `rotary_dim` dims of each head; angles are computed in fp32.
- Attention scores and softmax are fp32 whatever the compute dtype.
- One LayerNorm per block feeds attention and the MLP in parallel:
  `x + attn(ln(x)) + mlp(ln(x))`.
- The MLP uses `gelu_new` (the tanh approximation); `lm_head` is untied and has a bias.

Without a cache (training, scoring, a cold prefill) the tokens attend to each other through
one fused causal attention (attention.py) and the model returns their keys and values for the
caller to store. With a cache (decoding, a prefill after cached tokens) each layer runs one
attention of the new tokens over the cache's earlier positions and over each other (one
softmax), then writes their keys and values into the cache at their positions, and the model
returns the updated cache: one attention and one write per layer, whatever the number of new
tokens (see sampling.py). Reading before writing lets XLA update the cache in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.model import cpu_attention, cpu_matmul
from codegen_repl.model.attention import causal_attention
from codegen_repl.model.config import CodeGenConfig


class LayerCache(NamedTuple):
    # Heads before positions, so attention reads the cache as it lies (no per-step transpose).
    # Index p along the third axis holds the token at position p.
    keys: jax.Array  # [batch, heads, length, head_dim]
    values: jax.Array  # [batch, heads, length, head_dim]


KVCache = tuple[LayerCache, ...]  # one entry per layer
# How a decode step (one query per row) attends over the cache: "dot" as matmuls, "sum" as
# products and sums that XLA fuses with the mask and softmax (fewer kernels on a GPU; slower
# on XLA's CPU backend, measured 1.5x per 350M step), "auto" = "sum" on GPUs, "dot" elsewhere.
DecodeAttention = Literal["auto", "dot", "sum"]


def init_cache(config: CodeGenConfig, batch: int, length: int, dtype: jnp.dtype) -> KVCache:
    """An empty cache for `batch` sequences of up to `length` tokens."""
    shape = (batch, config.num_heads, length, config.head_dim)
    return tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        for _ in range(config.num_layers)
    )


def cache_length(cache: KVCache) -> int:
    """How many positions the cache holds per row."""
    return cache[0].keys.shape[2]


def write_cache(cache: KVCache, new: KVCache, start: jax.Array | int) -> KVCache:
    """Store keys/values [batch, heads, seq, head_dim] at positions start..start+seq-1 of every
    row (the caller makes them fit: a write past the end would be moved back onto earlier
    positions)."""
    at = (0, 0, start, 0)
    return tuple(
        LayerCache(
            jax.lax.dynamic_update_slice(old.keys, fresh.keys.astype(old.keys.dtype), at),
            jax.lax.dynamic_update_slice(old.values, fresh.values.astype(old.values.dtype), at),
        )
        for old, fresh in zip(cache, new, strict=True)
    )


def store(cache: LayerCache, key: jax.Array, value: jax.Array, starts: jax.Array) -> LayerCache:
    """Write one layer's new keys/values [batch, seq, heads, head_dim] at positions
    starts[b].. of each row b (rows may be at different positions)."""

    def one(old: jax.Array, fresh: jax.Array, start: jax.Array) -> jax.Array:
        fresh = fresh.transpose(1, 0, 2).astype(old.dtype)  # [heads, seq, head_dim]
        return jax.lax.dynamic_update_slice(old, fresh, (0, start, 0))

    write = jax.vmap(one)
    return LayerCache(write(cache.keys, key, starts), write(cache.values, value, starts))


def cached_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: LayerCache,
    positions: jax.Array,
    dtype: jnp.dtype,
    decode: DecodeAttention = "auto",
) -> jax.Array:
    """The new tokens' attention over the cache's earlier positions and over each other: fp32
    scores and one softmax over both, each query seeing the positions up to its own.

    The cache is read as it was before the new tokens' write (its positions from each row's
    first new position on are masked; the new keys/values come from `key`/`value`), so the
    written cache has one user, the caller's carry, and XLA updates it in place: attending
    over the written cache gave the write two users, and XLA's CPU backend copied every
    layer's cache about 4 times a decode step (18% of a 350M step's CPU time, measured with
    perf). The same scores and values as attending over the written cache, summed in another
    order.

    Three ways, one result (up to fp32 rounding):
    - On the CPU, a decode step (up to cpu_attention.MAX_TOKENS new tokens) goes through the
      C++ kernel, which reads only the positions in use: a cache as long as the model's
      context costs what the tokens so far cost.
    - On the CPU, a wider prefill loops over blocks of the positions in use (XLA's matmuls per
      block; `blocked_attention`).
    - Elsewhere (GPU, TPU; the CPU without the extension) one attention over the whole cache.

    Args:
        query, key, value: [batch, seq, heads, head_dim] the new tokens' (query and key
            rotated), at consecutive positions positions[b, 0]..
        cache: keys/values [batch, heads, length, head_dim] of the earlier positions.
        positions: [batch, seq] the queries' positions.
        decode: how a single query attends on the whole-cache path (see DecodeAttention).
    Returns:
        [batch, seq, heads, head_dim] in `dtype`.
    """
    seq = query.shape[1]
    if cpu_attention.applies(seq, query.shape[-1], cache.keys.dtype):
        mixed = cpu_attention.attend(query, key, value, cache.keys, cache.values, positions[:, 0])
        return mixed.astype(dtype)
    if seq > cpu_attention.MAX_TOKENS and jax.default_backend() == "cpu":
        return blocked_attention(query, key, value, cache, positions, dtype)
    return whole_cache_attention(query, key, value, cache, positions, dtype, decode)


def _dot_precision(dtype: jnp.dtype) -> dict[str, Any]:
    """einsum arguments: fp32 means fp32 (no TF32 passes); bf16 products exact, fp32 sums."""
    if dtype == jnp.float32:
        return dict(precision=jax.lax.Precision.HIGHEST)
    return dict(preferred_element_type=jnp.float32)


def whole_cache_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: LayerCache,
    positions: jax.Array,
    dtype: jnp.dtype,
    decode: DecodeAttention = "auto",
) -> jax.Array:
    """cached_attention over every position of the cache (the ones past each row's start
    masked): arguments and result as there."""
    keys, values = cache.keys.astype(query.dtype), cache.values.astype(dtype)
    if decode == "auto":
        decode = "sum" if jax.default_backend() == "gpu" else "dot"
    single = query.shape[1] == 1 and decode == "sum"
    dot = _dot_precision(dtype)
    if single:
        # One query (a decode step): products and sums over the cache, which XLA fuses with
        # the mask and softmax around them. fp32 products of bf16 values are exact: the same
        # scores as the upcast matmul.
        scores = jnp.sum(
            query[:, 0, :, None, :].astype(jnp.float32) * keys.astype(jnp.float32), axis=-1
        )[:, :, None, :]  # [batch, heads, 1, length]
    else:
        # [batch, heads, length, seq], then swapped: XLA's CPU backend then reads the cache as
        # it lies (asked for [.., seq, length], it transposed every layer's keys each step)
        scores = jnp.einsum("bhkd,bqhd->bhkq", keys, query, **dot).astype(jnp.float32)
        scores = scores.swapaxes(2, 3)  # [batch, heads, seq, length]
    # [batch, heads, seq, seq]: the new tokens among themselves
    own = jnp.einsum("bkhd,bqhd->bhqk", key.astype(query.dtype), query, **dot)
    own = own.astype(jnp.float32)
    scale = np.sqrt(query.shape[-1]).astype(np.float32)
    low = jnp.finfo(jnp.float32).min
    seen = jnp.arange(keys.shape[2], dtype=jnp.int32)
    earlier = seen[None, None, None, :] < positions[:, None, :1, None]  # [batch, 1, 1, length]
    steps = jnp.arange(query.shape[1], dtype=jnp.int32)
    causal = steps[None, :] <= steps[:, None]  # [seq, seq]
    both = jnp.concatenate(
        [
            jnp.where(earlier, scores / scale, low),
            jnp.where(causal[None, None], own / scale, low),
        ],
        axis=-1,
    )
    weights = jax.nn.softmax(both, axis=-1)  # [batch, heads, seq, length + seq]
    old_weights, own_weights = weights[..., : keys.shape[2]], weights[..., keys.shape[2] :]
    if single:
        mixed = jnp.sum(old_weights[:, :, 0, :, None] * values.astype(jnp.float32), axis=2)
        mixed = mixed + jnp.sum(
            own_weights[:, :, 0, :, None] * value.transpose(0, 2, 1, 3).astype(jnp.float32),
            axis=2,
        )
        return mixed[:, None].astype(dtype)  # [batch, 1, heads, head_dim]
    # the two parts summed in fp32, rounded to `dtype` once
    mixed = jnp.einsum("bhqk,bhkd->bqhd", old_weights.astype(dtype), values, **dot)
    own_mixed = jnp.einsum("bhqk,bkhd->bqhd", own_weights.astype(dtype), value.astype(dtype), **dot)
    return (mixed.astype(jnp.float32) + own_mixed.astype(jnp.float32)).astype(dtype)


ATTENTION_BLOCK = 256  # cache positions per step of blocked_attention's loop


def blocked_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache: LayerCache,
    positions: jax.Array,
    dtype: jnp.dtype,
) -> jax.Array:
    """cached_attention reading only the cache positions in use: a loop over blocks of
    ATTENTION_BLOCK positions, as many as the furthest row needs (a count known only at run
    time, so one program serves every length), with an online softmax (running maximum and
    sum, rescaled per block; Milakov and Gimelshein 2018, "Online normalizer calculation for
    softmax"). XLA copies each block it reads out of the cache, which a wide prefill's matmuls
    pay for many times over; for a decode step they would dominate (see cpu_attention.py).
    Products and sums are fp32 whatever `dtype` (XLA's CPU runtime has no bf16 x bf16 -> fp32
    matmul inside a loop; fp32 products of bf16 values are exact). Arguments and result as
    cached_attention's."""
    seq, head_dim = query.shape[1], query.shape[-1]
    length = cache.keys.shape[2]
    block = min(ATTENTION_BLOCK, length)
    dot = _dot_precision(jnp.float32)
    query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
    scale = np.sqrt(head_dim).astype(np.float32)
    low = jnp.finfo(jnp.float32).min
    starts = positions[:, 0]  # [batch] each row's cached positions
    steps = jnp.arange(seq, dtype=jnp.int32)
    causal = steps[None, :] <= steps[:, None]  # [seq, seq]
    # The new tokens among themselves first: every query sees itself, so the running maximum
    # is finite from the start and masked scores (`low`) weigh exactly 0.
    own = jnp.einsum("bkhd,bqhd->bhqk", key, query, **dot)
    own = jnp.where(causal[None, None], own / scale, low)
    top = jnp.max(own, axis=-1, keepdims=True)  # [batch, heads, seq, 1]
    weights = jnp.exp(own - top)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    mixed = jnp.einsum("bhqk,bkhd->bhqd", weights, value, **dot)

    def add_block(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        top, total, mixed = carry
        start = jnp.minimum(i * block, length - block)  # the last block may overlap the one before
        keys = jax.lax.dynamic_slice_in_dim(cache.keys, start, block, axis=2)
        values = jax.lax.dynamic_slice_in_dim(cache.values, start, block, axis=2)
        # [batch, heads, block, seq], then swapped (read as the cache lies; see whole_cache_)
        scores = jnp.einsum("bhkd,bqhd->bhkq", keys.astype(jnp.float32), query, **dot)
        scores = scores.swapaxes(2, 3)  # [batch, heads, seq, block]
        seen = start + jnp.arange(block, dtype=jnp.int32)
        use = (seen[None, :] >= i * block) & (seen[None, :] < starts[:, None])  # [batch, block]
        scores = jnp.where(use[:, None, None, :], scores / scale, low)
        new_top = jnp.maximum(top, jnp.max(scores, axis=-1, keepdims=True))
        keep = jnp.exp(top - new_top)
        weights = jnp.exp(scores - new_top)
        total = total * keep + jnp.sum(weights, axis=-1, keepdims=True)
        part = jnp.einsum("bhqk,bhkd->bhqd", weights, values.astype(jnp.float32), **dot)
        return new_top, total, mixed * keep + part

    blocks = (jnp.max(starts) + block - 1) // block
    top, total, mixed = jax.lax.fori_loop(0, blocks, add_block, (top, total, mixed))
    return (mixed / total).transpose(0, 2, 1, 3).astype(dtype)  # [batch, seq, heads, head_dim]


def rotary_angles(positions: jax.Array, rotary_dim: int) -> tuple[jax.Array, jax.Array]:
    """sin and cos of the rotary angles, fp32.

    Args:
        positions: [batch, seq] absolute token positions.
    Returns:
        (sin, cos), each [batch, seq, rotary_dim // 2].
    """
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(angles), jnp.cos(angles)


class Rotary(NamedTuple):
    """The tokens' positions and rotary angles, computed once for all layers."""

    positions: jax.Array  # [batch, seq] int32
    sin: jax.Array  # [batch, seq, rotary_dim // 2] fp32
    cos: jax.Array


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate the interleaved pairs of the first `rotary_dim` dims, in fp32.

    Args:
        x: [batch, seq, ..., head_dim] (e.g. [batch, seq, heads, head_dim]).
        sin, cos: [batch, seq, rotary_dim // 2].
    """
    rotary_dim = 2 * sin.shape[-1]
    x_rot = x[..., :rotary_dim].astype(jnp.float32)
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]  # [batch, seq, ..., rotary_dim // 2]
    middle = (1,) * (x.ndim - 3)
    sin = sin.reshape(*sin.shape[:2], *middle, sin.shape[-1])
    cos = cos.reshape(*cos.shape[:2], *middle, cos.shape[-1])
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    rotated = rotated.reshape(x_rot.shape).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)


def precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """fp32 means fp32: without HIGHEST, GPUs and TPUs run fp32 matmuls in TF32 or bf16."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


class Embed(nn.Embed):
    """nn.Embed (the same param, `embedding` [vocab, hidden]) whose lookup widens only the rows
    it reads to `dtype`: tokens [batch, seq] -> [batch, seq, hidden]. nn.Embed widens the
    whole table first, and XLA's CPU backend has no bf16 gather, so it widens a bf16 table
    whole for any lookup (hoisted out of the decode loop: 200 MB of fp32 written per decode
    chunk for 350M with bf16 weights, even looked up as uint16 bits, whose bitcast it copies).
    On the CPU a bf16 table with fp32 compute is read by cpu_matmul.take_rows instead."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        table, dtype = self.embedding, jnp.dtype(self.dtype or self.embedding.dtype)
        if table.dtype == jnp.bfloat16 and dtype == jnp.float32 and cpu_matmul.takes(table.dtype):
            return cpu_matmul.take_rows(table, inputs)
        return jnp.take(table, inputs, axis=0).astype(dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias), contracting the last `in_axes` axes of x.

    The kernel is [*in_shape, *out_shape]. With `int8`, the params hold an int8 `kernel` and a
    per-output-channel fp32 `scale` (see `quantize_int8`); the kernel is widened to the compute
    dtype inside the matmul, so where XLA fuses the conversion only int8 weights are read.
    On the CPU, int8 and bf16 kernels over up to `cpu_matmul.MAX_ROWS` rows (decode steps) go
    through the C++ kernel of cpu_matmul.py instead (fp32 activations and sums): XLA's CPU
    backend widens them in memory first, slower than fp32.
    """

    features: tuple[int, ...]
    in_axes: int = 1
    use_bias: bool = True
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[x.ndim - self.in_axes :], *self.features)
        if self.int8:
            kernel = self.param("kernel", nn.initializers.zeros, shape, jnp.int8)
            scale = self.param("scale", nn.initializers.ones, self.features, jnp.float32)
        else:
            in_axis = tuple(range(self.in_axes))
            out_axis = tuple(range(self.in_axes, len(shape)))
            init = nn.initializers.lecun_normal(in_axis=in_axis, out_axis=out_axis)
            kernel = self.param("kernel", init, shape, self.param_dtype)
        rows = int(np.prod(x.shape[: x.ndim - self.in_axes]))
        if cpu_matmul.applies(kernel.dtype, rows):
            scales = scale if self.int8 else None
            y = cpu_matmul.linear(x, kernel, scales, self.in_axes).astype(self.dtype)
        else:
            contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
            y = jax.lax.dot_general(
                x.astype(self.dtype),
                kernel.astype(self.dtype),
                (contract, ((), ())),
                precision=precision(self.dtype),
            )
            if self.int8:
                y = (y * scale).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


@functools.partial(jax.jit, static_argnums=1)  # one program per shape: not 5 eager ops
def quantize_kernel(weight: jax.Array, in_axes: int) -> tuple[jax.Array, jax.Array]:
    """A Linear kernel [*in (in_axes axes), *out] as int8 of the same shape and one fp32 scale
    per output channel [*out]: scale = max |w| / 127 over the inputs (1 where all are 0), and
    the kernel round(w / scale), so |w - scale * int8| <= scale / 2."""
    weight = weight.astype(jnp.float32)
    scale = jnp.max(jnp.abs(weight), axis=tuple(range(in_axes))) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.round(weight / scale).astype(jnp.int8), scale


def kernel_in_axes(path: tuple[str, ...]) -> int:
    """The input axes of the Linear kernel at params `path`: 2 for attention's `out`
    ([heads, head_dim, hidden]), else 1."""
    return 2 if len(path) >= 2 and path[-2] == "out" else 1


def quantize_leaf(path: tuple[str, ...], value: jax.Array) -> dict[str, jax.Array]:
    """The int8 params for one loaded tensor (checkpoint.load_params' `transform`): a Linear
    kernel becomes {"kernel": int8, "scale": fp32}; anything else stays as it is."""
    if path[-1] != "kernel":
        return {path[-1]: value}
    kernel, scale = quantize_kernel(value, kernel_in_axes(path))
    return {"kernel": kernel, "scale": scale}


def quantize_int8(params: dict) -> dict:
    """Weight-only int8, one fp32 scale per output channel, for every Linear kernel
    (`quantize_kernel`); kernels already int8 (quantized at load, `quantize_leaf`) stay.

    Returns the params of `CodeGen(..., int8=True)`; embeddings and norms stay as they are.
    """

    def visit(tree: dict, path: tuple[str, ...]) -> dict:
        out: dict[str, Any] = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = visit(value, (*path, name))
            elif name == "kernel" and value.dtype != jnp.int8:
                out.update(quantize_leaf((*path, name), value))
            else:
                out[name] = value
        return out

    return visit(params, ())


class Layer(nn.Module):
    """The fields every layer of the network shares (and passes on to its parts)."""

    config: CodeGenConfig
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    decode_attention: DecodeAttention = "auto"


def linear(
    layer: Layer, features: tuple[int, ...], name: str, in_axes: int = 1, use_bias: bool = True
) -> Linear:
    """A Linear part of `layer` (call inside its compact method)."""
    return Linear(
        features, in_axes=in_axes, use_bias=use_bias, int8=layer.int8, dtype=layer.dtype,
        param_dtype=layer.param_dtype, name=name,
    )  # fmt: skip


def layer_norm(layer: Layer, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch does, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=layer.config.layer_norm_epsilon, use_fast_variance=False, dtype=layer.dtype,
        param_dtype=layer.param_dtype, name=name,
    )  # fmt: skip


class Attention(Layer):
    """Causal self-attention: over the new tokens alone, or over a KV cache holding them."""

    @nn.compact
    def __call__(
        self, x: jax.Array, rotary: Rotary, cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache]:
        """x: [batch, seq, hidden]. Returns [batch, seq, hidden], and the new tokens' keys and
        values ([batch, heads, seq, head_dim]) without a cache, else the updated cache."""
        cfg = self.config
        qkv = linear(self, (3, cfg.num_heads, cfg.head_dim), "qkv", use_bias=False)(
            x
        )  # [batch, seq, 3, heads, head_dim]
        rotated = apply_rotary(qkv[:, :, :2], rotary.sin, rotary.cos)  # query and key at once
        query, key, value = rotated[:, :, 0], rotated[:, :, 1], qkv[:, :, 2]
        if cache is None:  # training/scoring, tokens in position order: one fused attention
            mixed = causal_attention(query, key, value)  # [batch, seq, heads, head_dim]
            cache = LayerCache(key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3))
        else:
            mixed = cached_attention(
                query, key, value, cache, rotary.positions, self.dtype, self.decode_attention
            )
            # Write after every read of the old cache, and say so in the data: XLA orders the
            # write after the reads only if it depends on them (it has no other ordering to
            # go by, and an optimization_barrier does not survive its CPU pipeline), else it
            # copies the cache to keep the reads safe. `0 * mixed` adds zero (mixed is a
            # weighted mean of finite values); XLA does not fold a float times zero.
            after = 0 * mixed.astype(key.dtype)
            cache = store(cache, key + after, value + after, rotary.positions[:, 0])
        out = linear(self, (cfg.hidden_size,), "out", in_axes=2, use_bias=False)(mixed)
        return out, cache


class MLP(Layer):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = linear(self, (self.config.intermediate_size,), "fc_in")(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new
        return linear(self, (self.config.hidden_size,), "fc_out")(h)


class Block(Layer):
    @nn.compact
    def __call__(
        self, x: jax.Array, rotary: Rotary, cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache]:
        parts = dict(
            config=self.config, int8=self.int8, dtype=self.dtype,
            decode_attention=self.decode_attention,
        )  # fmt: skip
        h = layer_norm(self, "ln")(x)
        attn_out, cache = Attention(**parts, param_dtype=self.param_dtype, name="attn")(
            h, rotary, cache
        )
        mlp_out = MLP(**parts, param_dtype=self.param_dtype, name="mlp")(h)
        return x + attn_out + mlp_out, cache


class CodeGen(Layer):
    """CodeGenForCausalLM: fp32 logits, and the keys/values for a cache.

    `remat=True` recomputes each block's activations in the backward pass instead of keeping
    them (training long sequences in less memory); the forward result is the same.
    """

    remat: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Args:
        tokens: [batch, seq] int32 token ids.
        positions: [batch, seq] absolute positions; default 0..seq-1. With a cache, each
            row's positions are consecutive (the new tokens go to cache positions
            positions[b, 0]..) and the cache holds that row's earlier positions.
        cache: earlier tokens' keys/values, or None (the tokens attend to each other only).
        logits_at: [batch] the one token per row whose logits are wanted (a prefill needs
            only its last real token's); default all.
        Returns:
            logits [batch, seq or 1, vocab] fp32, and per layer the keys/values of `tokens`
            ([batch, heads, seq, head_dim] each) without a cache, else the updated cache.
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            name="wte",
        )(tokens)  # fmt: skip
        rotary = Rotary(positions, *rotary_angles(positions, cfg.rotary_dim))  # once, not per layer
        kv = []
        # Decoding inside a traced program (a cache; not init, not training): every block goes
        # through one jitted function of its params, so a program traces one block, not
        # num_layers (the 350M decode chunk: 0.82 -> 0.24 s of tracing on the 2-core CPU); XLA
        # inlines the calls, so the compiled program is the same. Not with concrete positions
        # (an eager call, a gradient through the cached path): a jit would make them abstract,
        # and blocked_attention's loop bounds with them (no reverse-mode derivative).
        shared = (
            cache is not None
            and isinstance(positions, jax.core.Tracer)
            and not self.remat
            and not self.is_initializing()
        )
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache[i]
            if shared:
                block_fn = _block_fn(
                    Block(cfg, self.int8, self.dtype, self.param_dtype, self.decode_attention,
                          parent=None)
                )  # fmt: skip
                params = self.variables["params"][f"block_{i}"]
                x, layer_kv = block_fn(params, x, rotary, layer_cache)
            else:
                block_class = nn.remat(Block) if self.remat else Block
                block = block_class(
                    cfg, self.int8, self.dtype, self.param_dtype, self.decode_attention,
                    name=f"block_{i}",
                )  # fmt: skip
                x, layer_kv = block(x, rotary, layer_cache)
            kv.append(layer_kv)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [batch, 1, hidden]
        x = layer_norm(self, "ln_f")(x)
        logits = linear(self, (cfg.vocab_size,), "lm_head")(x)
        return logits.astype(jnp.float32), tuple(kv)


@functools.cache
def _block_fn(block: Block) -> Callable[..., tuple[jax.Array, LayerCache]]:
    """`block` applied to one layer's params, jitted: (params, x, rotary, cache) -> (x, cache).
    One per block configuration (an unbound Block is hashable by its fields), so every layer
    of a program, and every program of a model, reuses its trace."""

    def apply(
        params: Any, x: jax.Array, rotary: Rotary, cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache]:
        return cast(tuple[jax.Array, LayerCache], block.apply({"params": params}, x, rotary, cache))

    return jax.jit(apply)
