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


class Attention(nn.Module):
    config: CodeGenConfig
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
        qkv = nn.DenseGeneral(
            (3, cfg.num_heads, cfg.head_dim),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)  # [batch, seq, 3, heads, head_dim]
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
        out = nn.DenseGeneral(
            cfg.hidden_size,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)
        return out, cache


class MLP(nn.Module):
    config: CodeGenConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(self.config.intermediate_size, name="fc_in", **dense)(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new
        return nn.Dense(self.config.hidden_size, name="fc_out", **dense)(h)


class Block(nn.Module):
    config: CodeGenConfig
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
        attn_out, cache = Attention(self.config, name="attn", **kinds)(
            h, positions, cache, cache_index
        )
        mlp_out = MLP(self.config, name="mlp", **kinds)(h)
        return x + attn_out + mlp_out, cache


def layer_norm(config: CodeGenConfig, name: str, **kinds: jnp.dtype) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2] as torch does, not E[x^2] - mean^2.
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, use_fast_variance=False, name=name, **kinds
    )


class CodeGen(nn.Module):
    """CodeGenForCausalLM. Returns fp32 logits and the updated cache (None without one)."""

    config: CodeGenConfig
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
            x, layer_cache = Block(cfg, name=f"block_{i}", **kinds)(
                x, positions, layer_cache, cache_index
            )
            new_cache.append(layer_cache)
        x = layer_norm(cfg, "ln_f", **kinds)(x)
        logits = nn.Dense(cfg.vocab_size, name="lm_head", **kinds)(x)
        return logits.astype(jnp.float32), None if cache is None else tuple(new_cache)
