"""Weight-only int8 and bf16 (and fp32) matmuls on the CPU: a C++ kernel called through `jax.ffi`.

XLA's CPU backend has no fast matrix-vector product for int8 or bf16 weights (it widens them
to fp32 in memory first, which makes `--int8` decode slower than fp32). The extension
`codegen_repl.model._cpu_matmul` (csrc/cpu_matmul.cc, built by `pip install` when a C++
compiler is there) streams the narrow weights and widens them in registers, on XLA's own
intra-op thread pool. Without the extension everything runs on the XLA path, and `status()`
says so. fp32 weights take the kernel too (see WEIGHT_DTYPES): not faster, but quicker to compile.

The op: y [rows, N] fp32 = x [rows, K] fp32 @ w [K, N] (int8, bf16 or fp32), times one fp32 scale
per output channel for int8 (`quantize_int8`). Activations and sums stay fp32, so the kernel
and the XLA path differ only by fp32 rounding: |y - exact| <= gamma(K + 2) * sum_k |x_k w_kn|
(gamma(n) = n u / (1 - n u), u = 2^-24; Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., section 3.1).

Products of more than MAX_ROWS rows (a prefill) of int8/bf16 weights take AMX tiles where the
CPU has them (Intel Sapphire Rapids and later; `amx`): each fp32 activation is cut into three
bf16 parts that sum to it exactly, so the products stay exact and only the summation differs
(`max_error_bound(..., parts=AMX_PARTS)`); elsewhere a prefill takes XLA's matmul of the
widened weights.
"""

from __future__ import annotations

import functools
import math
import os
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.errors import ConfigError

# Above this many rows (a prefill) XLA's blocked fp32 matmul of the widened weights beats the
# vector kernel, which keeps no more than 4 rows in registers (bench/decode.py `kernels`); on a
# CPU with AMX, int8/bf16 products of more rows take the kernel's AMX tiles instead (`amx`).
MAX_ROWS = int(os.environ.get("CODEGEN_CPU_MATMUL_MAX_ROWS", "16"))
TARGETS = {
    "int8": "codegen_matmul_int8",
    "bf16": "codegen_matmul_bf16",
    "f32": "codegen_matmul_f32",
    "attention": "codegen_cache_attention",  # cpu_attention.py
    "take_rows": "codegen_take_rows_bf16",  # `take_rows`
}
INSTALL_HINT = (
    "reinstall with a C++ compiler (e.g. `apt install g++` or Xcode's command line tools), "
    "then `pip install -e .`"
)


@functools.cache
def extension() -> tuple[ModuleType | None, str]:
    """The loaded extension with its FFI targets (matmuls and cpu_attention.py's) registered,
    or None and why not. CODEGEN_CPU_MATMUL_ISA names the instruction set to use (see
    `set_isa`; default 'best'). Raises ConfigError (a ValueError) when the CPU lacks the one
    it names."""
    switch = os.environ.get("CODEGEN_CPU_MATMUL", "1")
    if switch.strip().lower() in ("0", "off", "false", "no"):
        return None, f"turned off by CODEGEN_CPU_MATMUL={switch}"
    try:
        from codegen_repl.model import _cpu_matmul  # type: ignore[attr-defined]
    except ImportError as missing:
        return None, f"the C++ extension is not built ({missing}); {INSTALL_HINT}"
    wanted = os.environ.get("CODEGEN_CPU_MATMUL_ISA", "best")
    if wanted.strip().lower() not in ISA_NAMES:
        raise ConfigError(
            f"CODEGEN_CPU_MATMUL_ISA={wanted}: not an instruction set; use one of "
            f"{', '.join(ISA_NAMES)} (or leave it unset: the best this CPU has)"
        )
    try:
        _cpu_matmul.set_isa(wanted.strip().lower())
    except ValueError as error:
        raise ConfigError(f"CODEGEN_CPU_MATMUL_ISA={wanted}: {error}") from None
    _cpu_matmul.set_amx_rows(max(1, MAX_ROWS + 1))  # the C++ side picks AMX by rows likewise
    if not _registered:  # once per process, even if the cache above is cleared
        for kind, capsule in _cpu_matmul.handlers().items():
            jax.ffi.register_ffi_target(TARGETS[kind], capsule, platform="cpu")
        _registered.append(True)
    return _cpu_matmul, ""


_registered: list[bool] = []
ISA_NAMES = ("best", "amx", "avx512", "avx2", "generic")  # what set_isa takes


def available() -> bool:
    """Whether the C++ kernel is loaded (whatever the backend)."""
    return extension()[0] is not None


def status(weights: str = "") -> str:
    """One line for the banner and `generate --verbose`: which path int8/bf16 weights take
    (`weights`: which path weights of that dtype take, e.g. "float32", named in the line)."""
    what = f"CPU matmul ({jnp.dtype(weights).name} weights)" if weights else "int8/bf16 CPU matmul"
    module, why_not = extension()
    if weights and jnp.dtype(weights) not in WEIGHT_DTYPES:
        return f"{what}: XLA (the C++ kernel takes int8, bfloat16 or float32 weights)"
    if module is None:
        return f"{what}: XLA ({why_not})"
    isa = module.isa()
    if isa == "amx":  # AVX-512 decode steps; AMX only for int8/bf16 prefills
        narrow = not weights or jnp.dtype(weights) in (jnp.int8, jnp.bfloat16)
        isa = "avx512, prefills on AMX tiles" if narrow else "avx512"
    return f"{what}: C++ kernel ({isa}, XLA's thread pool)"


def set_isa(name: str) -> str:
    """Use 'best' or a named instruction set ('amx': avx512 with AMX tiles for products of more
    than MAX_ROWS rows; 'avx512', 'avx2', 'generic') from now on; returns the one in use.
    Programs traced before keep the path they took (jax.clear_caches() to trace again).
    Raises RuntimeError without the extension, ValueError if the CPU lacks it."""
    module, why_not = extension()
    if module is None:
        raise RuntimeError(why_not)
    return module.set_isa(name)


def set_threads(count: int) -> int:
    """Cut products into blocks for `count` workers from now on (0: the size of XLA's thread
    pool, the default; CODEGEN_CPU_MATMUL_THREADS sets it at start). More than the pool has
    only cuts finer (tests run every split on any machine). Returns the previous count.
    Raises RuntimeError without the extension, ValueError for a negative count."""
    module, why_not = extension()
    if module is None:
        raise RuntimeError(why_not)
    return module.set_threads(count)


# fp32 weights take it too: the same speed as XLA's one-row products (both stream the weights
# at the memory's rate), but one custom call per product compiles in a fraction of the time of
# XLA's fusions for them (the 350M decode chunk: see README, Instant turns).
WEIGHT_DTYPES = (jnp.int8, jnp.bfloat16, jnp.float32)


def takes(weight_dtype: jnp.dtype) -> bool:
    """Whether weights of `weight_dtype` take the kernel in decode steps (on this backend)."""
    return weight_dtype in WEIGHT_DTYPES and jax.default_backend() == "cpu" and available()


def amx() -> bool:
    """Whether int8/bf16 products of more than MAX_ROWS rows (prefills) take the kernel's AMX
    tiles (csrc/matmul_amx.h): the CPU has AMX-BF16, Linux granted it, and the instruction set
    in use is 'amx' (see `set_isa`)."""
    module = extension()[0]
    return module is not None and module.isa() == "amx"


def applies(weight_dtype: jnp.dtype, rows: int) -> bool:
    """Whether a Linear with weights of `weight_dtype` over `rows` rows takes the kernel: decode
    steps (up to MAX_ROWS rows) always; more rows only with int8/bf16 weights on AMX tiles."""
    if not takes(weight_dtype):
        return False
    narrow = jnp.dtype(weight_dtype) in (jnp.int8, jnp.bfloat16)
    return rows <= MAX_ROWS or (narrow and takes_amx(rows))


def reference(x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    """The XLA path of the same op: x [rows, K] @ float32(w) [K, N] (* scale [N]), fp32."""
    y = jnp.dot(x, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return y if scale is None else y * scale


def _call(x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    if scale is not None:
        return jax.ffi.ffi_call(TARGETS["int8"], out, vmap_method="sequential")(x, w, scale)
    kind = "f32" if w.dtype == jnp.float32 else "bf16"
    return jax.ffi.ffi_call(TARGETS[kind], out, vmap_method="sequential")(x, w)


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    return _call(x, w, scale)


def _matmul_fwd(x: jax.Array, w: jax.Array, scale: jax.Array | None) -> tuple:
    return _call(x, w, scale), (x, w, scale)


def _matmul_bwd(residuals: tuple, grad: jax.Array) -> tuple:
    # Gradients (rare: fine-tuning bf16 weights on a CPU) through the XLA path's own VJP.
    return jax.vjp(reference, *residuals)[1](grad)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """y [rows, N] fp32 = x [rows, K] @ w [K, N] (int8 with scale [N], or bf16 or fp32 without).

    Runs the C++ kernel; callers check `applies` first (it needs the extension and the CPU
    backend). x is taken in any float dtype and widened to fp32.
    Raises ValueError for shapes or dtypes the kernel does not take, RuntimeError (saying how
    to build it) without the extension.
    """
    module, why_not = extension()  # registers the FFI targets before the first call
    if module is None:
        raise RuntimeError(why_not)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"matmul takes x [rows, K] and w [K, N], got {x.shape} and {w.shape}")
    if (w.dtype == jnp.int8) != (scale is not None) or w.dtype not in WEIGHT_DTYPES:
        raise ValueError(
            f"matmul takes int8 weights with a scale, or bf16 or fp32 without, got {w.dtype}"
        )
    if scale is not None:
        scale = scale.reshape(-1).astype(jnp.float32)
    return _matmul(x.astype(jnp.float32), w, scale)


def linear(x: jax.Array, kernel: jax.Array, scale: jax.Array | None, in_axes: int) -> jax.Array:
    """`Linear`'s contraction through the kernel: x [..., *in] @ kernel [*in, *out] -> [..., *out]
    fp32 (reshapes only: XLA makes them free for row-major arrays)."""
    lead, inner = x.shape[: x.ndim - in_axes], kernel.shape[:in_axes]
    features = kernel.shape[in_axes:]
    rows, k, n = math.prod(lead), math.prod(inner), math.prod(features)
    y = matmul(x.reshape(rows, k), kernel.reshape(k, n), scale)
    return y.reshape(*lead, *features)


# bf16 parts per activation on the AMX path (csrc/matmul_amx.h): their sum is the fp32 value.
AMX_PARTS = 3


def takes_amx(rows: int) -> bool:
    """Whether a product of `rows` rows of int8/bf16 weights runs on AMX tiles (see `amx`)."""
    return rows > MAX_ROWS and amx()


def max_error_bound(
    x: np.ndarray, w: np.ndarray, scale: np.ndarray | None = None, parts: int = 1
) -> np.ndarray:
    """The fp32 rounding bound above, per output [rows, N]: gamma(K + 2) * sum_k |x_k w_kn|
    (* |scale_n|), computed in float64.

    `parts` = AMX_PARTS: the AMX path's bound (int8/bf16 weights, more than MAX_ROWS rows, see
    `takes_amx`). Each activation is cut into 3 bf16 parts (its top 8 significant bits, the next
    8, the last 8) that sum to it exactly, with |hi| + |mid| + |lo| <= (1 + 2^-6) |x|; every
    part times a weight (8 significant bits each) is exact in fp32, so the result is an fp32
    sum of 3K exact products: gamma(3K + 2) (1 + 2^-6) sum_k |x_k w_kn| (* |scale_n|). AMX
    flushes denormals to zero (Intel SDM, TDPBF16PS): a part below 2^-126 counts as zero (the
    parts of an activation below about 2^-110), and so does a product or sum below 2^-126,
    which adds at most 2^-126 * 3 * (sum_k |w_kn| + K)."""
    k = x.shape[1]
    unit = 2.0**-24
    terms = parts * k + 2
    gamma = terms * unit / (1 - terms * unit)
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))
    if parts > 1:
        flushed = 2.0**-126 * parts * (np.abs(w.astype(np.float64)).sum(0) + k)
        bound = bound * (1 + 2.0**-6) * gamma + flushed
    else:
        bound = bound * gamma
    return bound if scale is None else bound * np.abs(scale.astype(np.float64))


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """fp32 rows of a bf16 table: table [V, H] bf16, ids [...] int -> [..., H] fp32, by
    jnp.take's rules (an id in [-V, 0) counts from the end; outside [-V, V): NaNs). XLA's CPU
    backend has no bf16 gather and widens the whole table for one (in a decode loop, once per
    program run: 200 MB written for 350M's embedding); the C++ kernel reads only the rows.
    Callers check `takes(jnp.bfloat16)` first. Raises RuntimeError without the extension,
    TypeError for ids that are not integers (as nn.Embed does)."""
    module, why_not = extension()  # registers the FFI targets before the first call
    if module is None:
        raise RuntimeError(why_not)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"take_rows takes integer ids, got {ids.dtype}")
    if ids.dtype != jnp.int32:  # wider or unsigned: out-of-range ids must stay out of range
        vocab = table.shape[0]
        outside = ids >= vocab
        if jnp.issubdtype(ids.dtype, jnp.signedinteger):
            outside |= ids < -vocab
        ids = jnp.where(outside, vocab, ids).astype(jnp.int32)
    return _take_rows(table, ids)


@jax.custom_vjp
def _take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    out = jax.ShapeDtypeStruct((math.prod(ids.shape), table.shape[1]), jnp.float32)
    flat = ids.reshape(-1).astype(jnp.int32)
    rows = jax.ffi.ffi_call(TARGETS["take_rows"], out, vmap_method="sequential")(table, flat)
    return rows.reshape(*ids.shape, table.shape[1])


def _take_rows_reference(table: jax.Array, ids: jax.Array) -> jax.Array:
    return jnp.take(table, ids, axis=0).astype(jnp.float32)


def _take_rows_fwd(table: jax.Array, ids: jax.Array) -> tuple:
    return _take_rows(table, ids), (table, ids)


def _take_rows_bwd(residuals: tuple, grad: jax.Array) -> tuple:
    table, ids = residuals  # gradients (fine-tuning bf16 weights on a CPU) through XLA's take
    return (*jax.vjp(lambda t: _take_rows_reference(t, ids), table)[1](grad), None)


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)
