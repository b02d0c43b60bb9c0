"""causal_attention against a plain einsum reference: values, causality, gradients, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from codegen_repl.model import attention
from codegen_repl.model.attention import causal_attention, pick_implementation

# fp32 on a CPU: the fused call and the reference add in different orders; never loosened.
VALUE_TOLERANCE = 1e-5  # max |difference| / max |reference|; measured at most 1.5e-7
GRADIENT_TOLERANCE = 1e-5  # the same, per gradient; measured about 5e-7
BFLOAT16_TOLERANCE = 2e-2  # bf16 inputs and mixing (8-bit mantissa) against fp32 throughout

SHAPES = {
    "b2_s37_h4_d16": (2, 37, 4, 16),  # odd sequence length
    "b1_s64_h16_d4": (1, 64, 16, 4),  # 350M's head count, tiny heads
    "b3_s9_h3_d12": (3, 9, 3, 12),  # head dim not a multiple of 8
}

on_cuda = jax.default_backend() == "gpu"


def reference_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """The textbook formula in fp32 at HIGHEST precision; [batch, seq, heads, head_dim]."""
    query, key, value = (t.astype(jnp.float32) for t in (query, key, value))
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=highest)
    scores = scores / jnp.sqrt(jnp.float32(query.shape[-1]))
    seq = query.shape[1]
    causal = jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None]  # [q, k]
    weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value, precision=highest)


def inputs(shape: tuple[int, ...], seed: int = 0, dtype=jnp.float32) -> list[jax.Array]:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    # Scale 2: scores spread over several units, so the softmax is far from uniform.
    return [(2.0 * jax.random.normal(k, shape, jnp.float32)).astype(dtype) for k in keys]


def relative_error(ours: jax.Array, reference: jax.Array) -> float:
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", list(SHAPES))
def test_fp32_matches_the_einsum_reference(name: str) -> None:
    query, key, value = inputs(SHAPES[name])
    out = jax.jit(causal_attention)(query, key, value)
    assert out.shape == query.shape and out.dtype == jnp.float32
    error = relative_error(out, reference_attention(query, key, value))
    print(f"{name}: max relative difference {error:.2e}")
    assert error < VALUE_TOLERANCE


def test_later_tokens_do_not_change_earlier_outputs() -> None:
    query, key, value = inputs((2, 24, 4, 8))
    out = causal_attention(query, key, value)
    changed = [t.at[:, 10:].set(t[:, 10:] * -3.0 + 1.0) for t in (query, key, value)]
    again = causal_attention(*changed)
    np.testing.assert_array_equal(np.asarray(out[:, :10]), np.asarray(again[:, :10]))
    assert not np.allclose(np.asarray(out[:, 10:]), np.asarray(again[:, 10:]))
    # The first token sees only itself: its output is its own value.
    np.testing.assert_allclose(np.asarray(out[:, 0]), np.asarray(value[:, 0]), rtol=1e-6)


@pytest.mark.parametrize("name", list(SHAPES))
def test_gradients_match_the_reference(name: str) -> None:
    """The backward pass training uses: d(sum(out * cotangent)) / d(query, key, value)."""
    query, key, value = inputs(SHAPES[name], seed=1)
    cotangent = inputs(SHAPES[name], seed=2)[0]

    def loss(attend, q, k, v):
        return jnp.sum(attend(q, k, v) * cotangent)

    ours = jax.jit(jax.grad(lambda *t: loss(causal_attention, *t), argnums=(0, 1, 2)))(
        query, key, value
    )
    expected = jax.grad(lambda *t: loss(reference_attention, *t), argnums=(0, 1, 2))(
        query, key, value
    )
    for part, mine, theirs in zip("qkv", ours, expected, strict=True):
        error = relative_error(mine, theirs)
        print(f"{name} d{part}: max relative difference {error:.2e}")
        assert error < GRADIENT_TOLERANCE


def test_gradients_match_finite_differences() -> None:
    query, key, value = inputs((1, 6, 2, 4), seed=3)
    check_grads(causal_attention, (query, key, value), order=1, modes=("rev",), eps=1e-3)


def test_fp32_dots_run_at_highest_precision() -> None:
    """Forward and backward: no TF32/bf16 passes on GPUs and TPUs, in this JAX version too."""
    query = jnp.ones((1, 8, 2, 16))
    grads = jax.grad(lambda *t: jnp.sum(causal_attention(*t)), argnums=(0, 1, 2))
    text = str(jax.make_jaxpr(grads)(query, query, query))
    assert text.count("dot_general") == 6  # q k^T and weights x v, and 2 + 2 transposes
    assert text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)") == 6


def test_bfloat16_stays_close_to_fp32() -> None:
    query, key, value = inputs((2, 33, 4, 16), seed=4, dtype=jnp.bfloat16)
    out = jax.jit(causal_attention)(query, key, value)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference_attention(query, key, value)) < BFLOAT16_TOLERANCE


def test_implementation_is_checked_and_picked() -> None:
    query = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="xla, cudnn"):
        causal_attention(query, query, query, implementation="flash")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"one \[batch, seq, heads, head_dim\] shape"):
        causal_attention(query, query[:, :3], query[:, :3])
    assert pick_implementation(jnp.float32, 64) == "xla"  # fp32: never cuDNN
    assert pick_implementation(jnp.bfloat16, 12) == "xla"  # not a multiple of 8
    assert pick_implementation(jnp.bfloat16, 64) == ("cudnn" if on_cuda else "xla")


@pytest.mark.skipif(on_cuda, reason="needs a machine without cuDNN")
def test_a_refused_cudnn_pick_falls_back_to_xla(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where cuDNN turns the automatic pick down at trace time, XLA runs it, with a warning."""
    query, key, value = inputs((1, 16, 2, 8), seed=7, dtype=jnp.bfloat16)
    monkeypatch.setattr(attention, "pick_implementation", lambda *_: "cudnn")
    with pytest.warns(UserWarning, match="cuDNN attention unavailable"):
        out = causal_attention(query, key, value)
    expected = causal_attention(query, key, value, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    with pytest.raises(RuntimeError):  # an explicit choice is never replaced
        causal_attention(query, key, value, implementation="cudnn")


@pytest.mark.gpu
@pytest.mark.skipif(not on_cuda, reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("shape", [(2, 256, 4, 64), (1, 128, 2, 80)])
def test_cudnn_flash_attention_matches_the_reference(shape: tuple[int, ...]) -> None:
    """On the GPU: cuDNN's values and gradients against fp32 XLA, at the bf16 tolerance."""
    query, key, value = inputs(shape, seed=5, dtype=jnp.bfloat16)
    cotangent = inputs(shape, seed=6)[0]

    def loss(q, k, v, implementation):
        out = causal_attention(q, k, v, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    flash, flash_out = grad(query, key, value, "cudnn")
    assert "cudnn" in jax.jit(loss, static_argnums=3).lower(query, key, value, "cudnn").as_text()
    reference = jax.jit(reference_attention)(query, key, value)
    assert relative_error(flash_out, reference) < BFLOAT16_TOLERANCE
    widened = [t.astype(jnp.float32) for t in (query, key, value)]
    expected, _ = grad(*widened, "xla")
    for mine, theirs in zip(flash, expected, strict=True):
        assert relative_error(mine, theirs) < BFLOAT16_TOLERANCE
