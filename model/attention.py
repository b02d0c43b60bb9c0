"""Full-sequence causal self-attention for training and scoring: one fused call.

`causal_attention` attends every token to itself and the tokens before it (token order is
position order: no KV cache, no padding before real tokens). It goes through
`jax.nn.dot_product_attention`:

- "cudnn": cuDNN flash attention on NVIDIA GPUs in bf16/fp16. The [batch, heads, seq, seq]
  scores are never written to memory; the softmax runs in fp32 inside the kernel, and the
  backward pass recomputes the scores from the saved log-sum-exp.
- "xla": plain XLA ops with fp32 scores and softmax (any backend, any dtype). In fp32 every
  matmul runs at HIGHEST precision, as the rest of the fp32 model does (GPUs and TPUs would
  otherwise use TF32/bf16 passes), so fp32 logits keep parity with transformers.

`None` picks "cudnn" where it applies and "xla" elsewhere (see `pick_implementation`).
"""

from __future__ import annotations

import warnings
from typing import Literal

import jax
import jax.extend
import jax.numpy as jnp

AttentionImplementation = Literal["xla", "cudnn"]
IMPLEMENTATIONS: tuple[AttentionImplementation, ...] = ("xla", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # 256 on Hopper with recent cuDNN; 128 holds everywhere


def pick_implementation(dtype: jnp.dtype, head_dim: int) -> AttentionImplementation:
    """'cudnn' on a CUDA GPU for bf16/fp16 and head dims cuDNN's flash kernel takes (a multiple
    of 8, at most 128); 'xla' otherwise (CPU, TPU, fp32, odd head dims)."""
    on_cuda = jax.default_backend() == "gpu" and "cuda" in _platform_version()
    supported = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0
    return "cudnn" if on_cuda and supported and head_dim <= CUDNN_MAX_HEAD_DIM else "xla"


def _platform_version() -> str:
    """e.g. 'cuda 12080' on an NVIDIA GPU (ROCm GPUs are 'gpu' too, without cuDNN)."""
    try:
        return str(jax.extend.backend.get_backend().platform_version).lower()
    except (AttributeError, RuntimeError):  # an older or newer JAX: assume a GPU is CUDA
        return "cuda"


def causal_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    implementation: AttentionImplementation | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim), causal) v over one whole sequence.

    Args:
        query, key, value: [batch, seq, heads, head_dim], one dtype (the compute dtype).
        implementation: "cudnn", "xla", or None to pick by backend, dtype and head dim (and
            to fall back to "xla" where this JAX/cuDNN turns the pick down).
    Returns:
        [batch, seq, heads, head_dim] in the inputs' dtype.
    Raises:
        ValueError: an unknown implementation, or inputs of different shapes or dtypes.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {', '.join(IMPLEMENTATIONS)} or None, "
            f"got {implementation!r}"
        )
    if not query.shape == key.shape == value.shape or not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            "query, key and value must share one [batch, seq, heads, head_dim] shape and dtype; "
            f"got {query.shape} {query.dtype}, {key.shape} {key.dtype}, {value.shape} {value.dtype}"
        )
    with jax.named_scope("causal_attention"):
        if implementation is not None:
            return _attend(query, key, value, implementation)
        picked = pick_implementation(query.dtype, query.shape[-1])
        try:
            return _attend(query, key, value, picked)
        except (NotImplementedError, RuntimeError) as refused:  # cuDNN's checks, at trace time
            if picked == "xla":
                raise
            warnings.warn(f"cuDNN attention unavailable ({refused}); using XLA", stacklevel=2)
            return _attend(query, key, value, "xla")


def _attend(
    query: jax.Array, key: jax.Array, value: jax.Array, implementation: AttentionImplementation
) -> jax.Array:
    if query.dtype == jnp.float32:
        # fp32 means fp32: the dots inside run at HIGHEST precision (no TF32 passes).
        with jax.default_matmul_precision("highest"):
            return jax.nn.dot_product_attention(
                query, key, value, is_causal=True, implementation=implementation
            )
    return jax.nn.dot_product_attention(
        query, key, value, is_causal=True, implementation=implementation
    )
