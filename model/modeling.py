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

The model never writes a cache: it attends to read-only `Segment`s of earlier tokens' keys
and values (none for training; a KV cache, and the current decode chunk, for sampling) and
returns the new tokens' keys and values for the caller to store (see sampling.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.model.config import CodeGenConfig


class LayerCache(NamedTuple):
    # Heads before slots, so attention reads the cache as it lies (no per-step transpose).
    keys: jax.Array  # [batch, heads, slots, head_dim]
    values: jax.Array  # [batch, heads, slots, head_dim]


KVCache = tuple[LayerCache, ...]  # one entry per layer
NO_POSITION = 2**30  # the position of an empty slot: later than any query, so never attended


class Segment(NamedTuple):
    """Keys/values of earlier tokens that the new tokens attend to (read-only in the model).

    Slot s holds the token at `positions[:, s]`; empty slots hold NO_POSITION.
    """

    cache: KVCache
    positions: jax.Array  # [batch, slots] int32


def init_cache(config: CodeGenConfig, batch: int, slots: int, dtype: jnp.dtype) -> KVCache:
    """An empty cache for `batch` sequences of up to `slots` tokens."""
    shape = (batch, config.num_heads, slots, config.head_dim)
    return tuple(
        LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
        for _ in range(config.num_layers)
    )


def write_cache(cache: KVCache, new: KVCache, start: jax.Array) -> KVCache:
    """Store keys/values [batch, heads, seq, head_dim] at slots start..start+seq-1."""
    at = (0, 0, start, 0)
    return tuple(
        LayerCache(
            jax.lax.dynamic_update_slice(old.keys, fresh.keys.astype(old.keys.dtype), at),
            jax.lax.dynamic_update_slice(old.values, fresh.values.astype(old.values.dtype), at),
        )
        for old, fresh in zip(cache, new, strict=True)
    )


def slot_positions(
    batch: int, slots: int, filled: jax.Array | int, start: jax.Array | int = 0
) -> jax.Array:
    """[batch, slots] positions of a segment whose slot i holds position start + i, for the
    first `filled` slots; the rest are empty."""
    index = jnp.arange(slots, dtype=jnp.int32)
    positions = jnp.where(index < filled, start + index, NO_POSITION)
    return jnp.broadcast_to(positions, (batch, slots))


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


def precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """fp32 means fp32: without HIGHEST, GPUs and TPUs run fp32 matmuls in TF32 or bf16."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


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


def quantize_int8(params: dict) -> dict:
    """Weight-only int8, one fp32 scale per output channel, for every Linear kernel.

    Returns the params of `CodeGen(..., int8=True)`; embeddings and norms stay as they are.
    """

    def visit(tree: dict, in_axes: int) -> dict:
        out: dict[str, Any] = {}
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


class Layer(nn.Module):
    """The fields every layer of the network shares (and passes on to its parts)."""

    config: CodeGenConfig
    int8: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


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
    """Causal self-attention of the new tokens, plus attention to earlier tokens' segments.

    Earlier tokens are never written here: the layer returns the new tokens' keys and values
    and the caller stores them. (Reading a buffer and updating it in place in one XLA program
    costs a copy of the whole buffer on CPU; keeping reads and writes apart avoids it.)
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, memory: tuple[tuple[LayerCache, jax.Array], ...]
    ) -> tuple[jax.Array, LayerCache]:
        """x: [batch, seq, hidden]; positions: [batch, seq]; memory: (cache, slot positions)
        pairs of this layer. Returns [batch, seq, hidden] and the new keys/values."""
        cfg = self.config
        qkv = linear(self, (3, cfg.num_heads, cfg.head_dim), "qkv", use_bias=False)(
            x
        )  # [batch, seq, 3, heads, head_dim]
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        sin, cos = rotary_angles(positions, cfg.rotary_dim)
        query, key = apply_rotary(query, sin, cos), apply_rotary(key, sin, cos)
        # [batch, heads, seq, head_dim] from here on
        query, key, value = (t.transpose(0, 2, 1, 3) for t in (query, key, value))

        parts = [*memory, (LayerCache(key, value), positions)]
        scores = jnp.concatenate(
            [self._scores(query, positions, cache.keys, keys_at) for cache, keys_at in parts],
            axis=-1,
        )  # [batch, heads, seq, all slots], fp32
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        bounds = np.cumsum([cache.values.shape[2] for cache, _ in parts])[:-1]
        pieces = [
            jnp.einsum(
                "bhqk,bhkd->bqhd", part, cache.values.astype(self.dtype),
                precision=precision(self.dtype),
            )
            for part, (cache, _) in zip(jnp.split(weights, bounds, axis=-1), parts, strict=True)
        ]  # fmt: skip
        mixed = sum(pieces[1:], start=pieces[0])  # [batch, seq, heads, head_dim]
        out = linear(self, (cfg.hidden_size,), "out", in_axes=2, use_bias=False)(mixed)
        return out, LayerCache(key, value)

    def _scores(
        self, query: jax.Array, positions: jax.Array, keys: jax.Array, keys_at: jax.Array
    ) -> jax.Array:
        """Masked, scaled fp32 scores [batch, heads, seq, slots]."""
        scores = jnp.einsum(
            "bhqd,bhkd->bhqk",
            query.astype(jnp.float32),
            keys.astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        ) / jnp.sqrt(jnp.float32(self.config.head_dim))
        mask = attention_mask(positions, keys_at)
        return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


class MLP(Layer):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = linear(self, (self.config.intermediate_size,), "fc_in")(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new
        return linear(self, (self.config.hidden_size,), "fc_out")(h)


class Block(Layer):
    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, memory: tuple[tuple[LayerCache, jax.Array], ...]
    ) -> tuple[jax.Array, LayerCache]:
        parts = dict(config=self.config, int8=self.int8, dtype=self.dtype)
        h = layer_norm(self, "ln")(x)
        attn_out, new_kv = Attention(**parts, param_dtype=self.param_dtype, name="attn")(
            h, positions, memory
        )
        mlp_out = MLP(**parts, param_dtype=self.param_dtype, name="mlp")(h)
        return x + attn_out + mlp_out, new_kv


class CodeGen(Layer):
    """CodeGenForCausalLM: fp32 logits, and the new tokens' keys/values for a cache.

    `remat=True` recomputes each block's activations in the backward pass instead of keeping
    them (training long sequences in less memory); the forward result is the same.
    """

    remat: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        memory: tuple[Segment, ...] = (),
    ) -> tuple[jax.Array, KVCache]:
        """Args:
        tokens: [batch, seq] int32 token ids.
        positions: [batch, seq] absolute positions; default 0..seq-1.
        memory: segments of earlier tokens' keys/values to attend to (e.g. a KV cache).
        Returns:
            logits [batch, seq, vocab] fp32, and per layer the keys/values of `tokens`
            ([batch, heads, seq, head_dim] each).
        """
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            name="wte",
        )(tokens)  # fmt: skip
        new_kv = []
        for i in range(cfg.num_layers):
            layer_memory = tuple((segment.cache[i], segment.positions) for segment in memory)
            block_class = nn.remat(Block) if self.remat else Block
            block = block_class(cfg, self.int8, self.dtype, self.param_dtype, name=f"block_{i}")
            x, layer_kv = block(x, positions, layer_memory)
            new_kv.append(layer_kv)
        x = layer_norm(self, "ln_f")(x)
        logits = linear(self, (cfg.vocab_size,), "lm_head")(x)
        return logits.astype(jnp.float32), tuple(new_kv)
