"""A decode step's attention over the KV cache on the CPU: a C++ kernel called through `jax.ffi`.

XLA reads a cache's every position in a decode step, or, asked to read only the positions in
use (a loop over blocks of a dynamic count), copies each block it reads: on the 2-core CPU a
350M step over 1,500 cached tokens cost 10-25% more CPU than over a cache cut to the tokens'
length (measured). The kernel (csrc/cpu_attention.cc, in the optional extension
`codegen_repl.model._cpu_matmul`, see cpu_matmul.py) reads only the positions in use, where
they lie. So the cache can be as long as the model's context from the first token on: one
program for every length, nothing to compile as a session grows (see the local decoder's
`cache_length`), at the cost of the positions in use only.

The op is modeling.cached_attention's for a few new tokens: fp32 scores, one softmax over the
cache's earlier positions and the new tokens up to each one, fp32 sums (the cache fp32 or
bf16). It sums in another order than XLA does, so results differ by fp32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from codegen_repl.model import cpu_matmul

# Up to this many new tokens per row (decode steps, short prefills) take the kernel. Its
# scores are dot products of one query at a time, not a blocked matmul, so a wide prefill is
# faster through XLA's matmuls (modeling.blocked_attention).
MAX_TOKENS = 16
CACHE_DTYPES = (jnp.float32, jnp.bfloat16)


def applies(tokens: int, head_dim: int, cache_dtype: jnp.dtype) -> bool:
    """Whether `tokens` new tokens per row attend through the kernel (on this backend)."""
    return (
        tokens <= MAX_TOKENS
        and head_dim % 16 == 0
        and jnp.dtype(cache_dtype) in CACHE_DTYPES
        and jax.default_backend() == "cpu"
        and cpu_matmul.available()
    )


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    cache_keys: jax.Array,
    cache_values: jax.Array,
    starts: jax.Array,
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v of each new token over the cache's positions before
    its row's start and the new tokens up to itself.

    Args:
        query, key, value: [batch, seq, heads, head_dim], the new tokens' (query and key
            rotated), at positions starts[b] .. starts[b] + seq - 1 of row b; taken in any
            float dtype, computed in fp32.
        cache_keys, cache_values: [batch, heads, length, head_dim], fp32 or bf16; positions
            from starts[b] on are not read.
        starts: [batch] int32, each row's first new position (0 .. length).
    Returns:
        [batch, seq, heads, head_dim] fp32.
    Raises:
        RuntimeError (saying how to build it) without the extension; ValueError for shapes or
        dtypes the kernel does not take. A start outside 0..length fails the call.
    """
    module, why_not = cpu_matmul.extension()  # registers the FFI targets before the first call
    if module is None:
        raise RuntimeError(why_not)
    if query.ndim != 4 or cache_keys.ndim != 4 or query.shape[-1] % 16:
        raise ValueError(
            "attend takes query [batch, seq, heads, head_dim] (head_dim a multiple of 16) and a "
            f"cache [batch, heads, length, head_dim], got {query.shape} and {cache_keys.shape}"
        )
    if cache_keys.dtype not in CACHE_DTYPES or cache_values.dtype != cache_keys.dtype:
        raise ValueError(f"attend takes an fp32 or bf16 cache, got {cache_keys.dtype}")
    out = jax.ShapeDtypeStruct(query.shape, jnp.float32)
    call = jax.ffi.ffi_call(cpu_matmul.TARGETS["attention"], out, vmap_method="sequential")
    wide = [x.astype(jnp.float32) for x in (query, key, value)]
    return call(*wide, cache_keys, cache_values, starts.astype(jnp.int32))
