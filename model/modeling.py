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

A KV cache is optional: `None` runs plain causal attention over the given tokens (training,
parity tests); a `KVCache` writes the new keys/values at `cache_index` and attends over every
cached slot whose position is <= the query's position.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.model.config import CodeGenConfig


class LayerCache(NamedTuple):
    keys: jax.Array  # [batch, max_len, heads, head_dim]
    values: jax.Array  # [batch, max_len, heads, head_dim]


KVCache = tuple[LayerCache, ...]  # one entry per layer


def init_cache(config: CodeGenConfig, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens."""
    shape = (batch, max_len, config.num_heads, config.head_dim)
    return tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        for _ in range(config.num_layers)
    )


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


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate the interleaved pairs of the first `rotary_dim` dims, in fp32.

    Args:
        x: [batch, seq, heads, head_dim].
        sin, cos: [batch, seq, rotary_dim // 2].
    """
    rotary_dim = 2 * sin.shape[-1]
    x_rot = x[..., :rotary_dim].astype(jnp.float32)
    even, odd = x_rot[..., 0::2], x_rot[..., 1::2]  # [batch, seq, heads, rotary_dim // 2]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    rotated = rotated.reshape(x_rot.shape).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)


def attention_mask(query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[batch, 1, q, k] True where a query may attend to a key (causal on absolute positions)."""
    return key_positions[:, None, None, :] <= query_positions[:, None, :, None]


class Linear(nn.Module):
    """y = x @ kernel (+ bias), contracting the last `in_axes` axes of x.

    The kernel is [*in_shape, *out_shape]. With `int8`, the params hold an int8 `kernel` and a
    per-output-channel fp32 `scale` (see `quantize_int8`); the kernel is widened to the compute
    dtype inside the matmul, so where XLA fuses the conversion only int8 weights are read.
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
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ()))
        )
        if self.int8:
            y = (y * scale).astype(self.dtype)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def quantize_int8(params: dict) -> dict:
    """Weight-only int8, one fp32 scale per output channel, for every Linear kernel.

    Returns the params of `CodeGen(..., int8=True)`; embeddings and norms stay as they are.
    """

    def visit(tree: dict, in_axes: int) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = visit(value, 2 if name == "out" else 1)  # out: [heads, hd, d]
            elif name == "kernel":
                weight = value.astype(jnp.float32)
                scale = jnp.max(jnp.abs(weight), axis=tuple(range(in_axes))) / 127.0
                scale = jnp.where(scale == 0, 1.0, scale)
                out["kernel"] = jnp.round(weight / scale).astype(jnp.int8)
                out["scale"] = scale
            else:
                out[name] = value
        return out

    return visit(params, 1)


class Attention(nn.Module):
    config: CodeGenConfig
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x: [batch, seq, hidden]; positions: [batch, seq]; cache_index: scalar int32."""
        cfg = self.config
        kinds = dict(int8=self.int8, dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Linear((3, cfg.num_heads, cfg.head_dim), use_bias=False, name="qkv", **kinds)(
            x
        )  # [batch, seq, 3, heads, head_dim]
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        sin, cos = rotary_angles(positions, cfg.rotary_dim)
        query, key = apply_rotary(query, sin, cos), apply_rotary(key, sin, cos)

        key_positions = positions
        if cache is not None:
            assert cache_index is not None
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(cache.keys, key.astype(cache.keys.dtype), start)
            values = jax.lax.dynamic_update_slice(
                cache.values, value.astype(cache.values.dtype), start
            )
            cache = LayerCache(keys, values)
            key, value = keys.astype(self.dtype), values.astype(self.dtype)
            # Slot i of the cache holds position i; slots past the query are masked out.
            slots = jnp.arange(keys.shape[1], dtype=positions.dtype)
            key_positions = jnp.broadcast_to(slots, (x.shape[0], keys.shape[1]))

        scores = jnp.einsum(
            "bqhd,bkhd->bhqk", query.astype(jnp.float32), key.astype(jnp.float32)
        ) / jnp.sqrt(jnp.float32(cfg.head_dim))  # [batch, heads, q, k], fp32
        mask = attention_mask(positions, key_positions)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [batch, seq, heads, head_dim]
        out = Linear((cfg.hidden_size,), in_axes=2, use_bias=False, name="out", **kinds)(out)
        return out, cache


class MLP(nn.Module):
    config: CodeGenConfig
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kinds = dict(int8=self.int8, dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear((self.config.intermediate_size,), name="fc_in", **kinds)(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new
        return Linear((self.config.hidden_size,), name="fc_out", **kinds)(h)


class Block(nn.Module):
    config: CodeGenConfig
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, LayerCache | None]:
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(self.config, "ln", **kinds)(x)
        attn_out, cache = Attention(self.config, self.int8, name="attn", **kinds)(
            h, positions, cache, cache_index
        )
        mlp_out = MLP(self.config, self.int8, name="mlp", **kinds)(h)
        return x + attn_out + mlp_out, cache


def layer_norm(config: CodeGenConfig, name: str, **kinds: jnp.dtype) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch does, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, use_fast_variance=False, name=name, **kinds
    )


class CodeGen(nn.Module):
    """CodeGenForCausalLM. Returns fp32 logits and the updated cache (None without one)."""

    config: CodeGenConfig
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Args:
        tokens: [batch, seq] int32 token ids.
        positions: [batch, seq] absolute positions; default 0..seq-1 (or from cache_index).
        cache: per-layer keys/values, [batch, max_len, heads, head_dim] each, or None.
        cache_index: scalar int32, the cache slot of tokens[:, 0]; required with a cache.
        Returns:
            logits [batch, seq, vocab] fp32, and the new cache.
        """
        cfg = self.config
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if positions is None:
            start = 0 if cache_index is None else cache_index
            positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, tokens.shape)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="wte", **kinds)(tokens)
        new_cache = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = Block(cfg, self.int8, name=f"block_{i}", **kinds)(
                x, positions, layer_cache, cache_index
            )
            new_cache.append(layer_cache)
        x = layer_norm(cfg, "ln_f", **kinds)(x)
        logits = Linear((cfg.vocab_size,), int8=self.int8, name="lm_head", **kinds)(x)
        return logits.astype(jnp.float32), None if cache is None else tuple(new_cache)
