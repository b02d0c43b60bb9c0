"""The CPU decode attention kernel (model/cpu_attention.py, csrc/cpu_attention.cc) and the
blocked prefill attention (modeling.blocked_attention): both read only the cache positions in
use and must give whole_cache_attention's result up to fp32 rounding, for any mix of rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codegen_repl.model import cpu_attention, cpu_matmul, modeling
from codegen_repl.model.modeling import LayerCache, blocked_attention, whole_cache_attention

needs_kernel = pytest.mark.skipif(
    not cpu_attention.applies(1, 16, jnp.float32), reason=cpu_matmul.status()
)
# fp32 sums of up to ~100 terms of size ~1, in another order: a few units in the 6th digit
TOLERANCE = dict(rtol=2e-5, atol=2e-5)


def inputs(
    seq: int, starts: list[int], length: int, cache_dtype: jnp.dtype, seed: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array, LayerCache, jax.Array]:
    """query/key/value [rows, seq, 4, 16], a cache [rows, 4, length, 16] of random values
    everywhere (the positions from each start on must not count), positions [rows, seq]."""
    rng = np.random.default_rng(seed)
    rows, heads, head_dim = len(starts), 4, 16

    def normal(*shape: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    query, key, value = (normal(rows, seq, heads, head_dim) for _ in range(3))
    cache = LayerCache(
        normal(rows, heads, length, head_dim, dtype=cache_dtype),
        normal(rows, heads, length, head_dim, dtype=cache_dtype),
    )
    positions = jnp.asarray([[start + t for t in range(seq)] for start in starts], jnp.int32)
    return query, key, value, cache, positions


@needs_kernel
@pytest.mark.parametrize("seq", [1, 3, 16])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_the_kernel_gives_the_whole_cache_result(seq: int, cache_dtype: jnp.dtype) -> None:
    # rows at the cache's start, in its middle, and with every position cached
    query, key, value, cache, positions = inputs(seq, [0, 37, 100], 100, cache_dtype)
    got = cpu_attention.attend(query, key, value, cache.keys, cache.values, positions[:, 0])
    want = whole_cache_attention(query, key, value, cache, positions, jnp.float32, "dot")
    assert got.dtype == jnp.float32 and got.shape == query.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOLERANCE)


@needs_kernel
def test_the_kernel_reads_no_position_from_the_start_on() -> None:
    query, key, value, cache, positions = inputs(2, [5], 64, jnp.float32)
    spoiled = LayerCache(cache.keys.at[:, :, 5:].set(1e30), cache.values.at[:, :, 5:].set(jnp.nan))
    before = cpu_attention.attend(query, key, value, cache.keys, cache.values, positions[:, 0])
    after = cpu_attention.attend(query, key, value, spoiled.keys, spoiled.values, positions[:, 0])
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


@needs_kernel
def test_the_kernel_refuses_a_start_outside_the_cache() -> None:
    query, key, value, cache, _ = inputs(1, [0], 32, jnp.float32)
    with pytest.raises(Exception, match="outside the cache"):
        cpu_attention.attend(query, key, value, cache.keys, cache.values, jnp.asarray([33]))
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        cpu_attention.attend(query[..., :8], key, value, cache.keys, cache.values, jnp.zeros(1))


@pytest.mark.parametrize("seq", [17, 64])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_gives_the_whole_cache_result(
    seq: int, cache_dtype: jnp.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 positions in blocks of 32: the last block overlaps the one before it
    monkeypatch.setattr(modeling, "ATTENTION_BLOCK", 32)
    query, key, value, cache, positions = inputs(seq, [0, 33, 100 - seq], 100, cache_dtype)
    dtype = jnp.float32 if cache_dtype == jnp.float32 else jnp.bfloat16
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    got = blocked_attention(query, key, value, cache, positions, dtype)
    want = whole_cache_attention(query, key, value, cache, positions, dtype, "dot")
    tolerance = TOLERANCE if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16 weights
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), **tolerance
    )
