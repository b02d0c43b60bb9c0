"""The C++ int8/bf16 CPU matmul (model/cpu_matmul.py, csrc/): exactness within fp32 rounding,
every instruction set this CPU has, the model's greedy tokens, and the XLA fallback.

Error bounds (never loosened; see cpu_matmul.max_error_bound):
- against the exact product of the stored weights (float64 of x @ dequantized w): the fp32
  summation bound gamma(K + 2) * sum_k |x_k w_kn| per output;
- against the unquantized fp32 weights: that plus the quantization's own error, at most
  scale_n / 2 per int8 weight (round to nearest) and 2^-8 |w| per bf16 weight (8
  significant bits, round to nearest);
- on AMX tiles (more than MAX_ROWS rows of int8/bf16 weights, where the CPU has AMX-BF16):
  the bound of an fp32 sum of 3K exact products (max_error_bound(..., parts=AMX_PARTS)).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from codegen_repl.model import cpu_matmul
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import quantize_int8
from codegen_repl.model.sample_params import SampleParams
from tests.conftest import decoded_ids, local_decoder

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="a CPU kernel: the tests run on the CPU backend"
)
needs_kernel = pytest.mark.skipif(
    not cpu_matmul.available(), reason="the C++ extension is not built (no compiler at install)"
)
needs_amx = pytest.mark.skipif(
    not cpu_matmul.amx(),
    reason="no AMX-BF16 here (Intel Sapphire Rapids or later, granted by Linux), or the "
    "extension is not built: prefills take XLA's path",
)


def instruction_sets() -> list[str]:
    if not cpu_matmul.available():
        return []
    found = []
    for name in ("amx", "avx512", "avx2", "generic"):
        with contextlib.suppress(ValueError):  # this CPU lacks it
            found.append(cpu_matmul.set_isa(name))
    cpu_matmul.set_isa("best")
    return found


@pytest.fixture(params=instruction_sets() or ["none"])
def isa(request):
    if request.param == "none":
        pytest.skip("the C++ extension is not built (no compiler at install)")
    yield cpu_matmul.set_isa(request.param)
    cpu_matmul.set_isa("best")


def random_weights(k: int, n: int, kind: str, seed: int = 0):
    """(fp32 weights, stored weights, scale or None) as quantize_int8 / a bf16 load makes them."""
    w32 = np.random.default_rng(seed).standard_normal((k, n), np.float32) * 0.05
    if kind == "f32":
        return w32, w32, None
    if kind == "bf16":
        return w32, w32.astype(ml_dtypes.bfloat16), None
    q = quantize_int8({"kernel": jnp.asarray(w32)})
    return w32, np.asarray(q["kernel"]), np.asarray(q["scale"])


def exact(x: np.ndarray, w: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    y = x.astype(np.float64) @ w.astype(np.float64)
    return y if scale is None else y * scale.astype(np.float64)


def parts(rows: int, w: np.ndarray) -> int:
    """The bf16 parts per activation of the path a product of `rows` rows takes (for the bound)."""
    narrow = w.dtype in (np.int8, ml_dtypes.bfloat16)
    return cpu_matmul.AMX_PARTS if narrow and cpu_matmul.takes_amx(rows) else 1


def check(
    x: np.ndarray, w32: np.ndarray, w: np.ndarray, scale: np.ndarray | None, y, amx: bool = False
) -> None:
    """`amx`: the product ran on AMX tiles whatever its rows (set_amx_rows)."""
    y = np.asarray(y, np.float64)
    used = cpu_matmul.AMX_PARTS if amx else parts(x.shape[0], w)
    bound = cpu_matmul.max_error_bound(x, w, scale, used)
    assert np.all(np.abs(y - exact(x, w, scale)) <= bound)
    if w.dtype == np.float32:  # not quantized: the bound above is all
        return
    if scale is None:  # bf16: round to nearest, 8 significant bits: unit roundoff 2^-8
        quantization = 2.0**-8 * (np.abs(x.astype(np.float64)) @ np.abs(w32.astype(np.float64)))
    else:
        quantization = np.abs(x.astype(np.float64)).sum(1, keepdims=True) * scale / 2
    fp32_rounding = cpu_matmul.max_error_bound(x, w32)
    assert np.all(np.abs(y - exact(x, w32, None)) <= bound + quantization + fp32_rounding)


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "bf16", "f32"])
@pytest.mark.parametrize("k, n", [(1, 1), (5, 17), (37, 53), (64, 1003), (130, 16), (259, 2049)])
def test_odd_shapes_every_row_count(isa: str, kind: str, k: int, n: int) -> None:
    w32, w, scale = random_weights(k, n, kind)
    call = jax.jit(cpu_matmul.matmul)
    for rows in range(1, 17):
        x = np.random.default_rng(rows).standard_normal((rows, k), np.float32)
        y = call(jnp.asarray(x), jnp.asarray(w), None if scale is None else jnp.asarray(scale))
        check(x, w32, w, scale, y)


@pytest.fixture
def planned_threads():
    """Set how many workers the kernel cuts products for; back to the count before after."""
    before = cpu_matmul.set_threads(0) if cpu_matmul.available() else 0
    yield cpu_matmul.set_threads
    if cpu_matmul.available():
        cpu_matmul.set_threads(before)


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "bf16", "f32"])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_every_cut_into_row_slices_and_column_ranges(
    isa: str, planned_threads, kind: str, threads: int
) -> None:
    """Row slices whose partial sums are added up (K = 1031: up to 16 slices, the last one
    shorter and not a multiple of 4), column ranges at 4 to 16 rows (N = 2051: ranges of 512 to
    2048 columns and a narrow last one), and the same bits on every run (the partial sums are
    added in slice order, whichever thread finishes first)."""
    planned_threads(threads)
    w32, w, scale = random_weights(1031, 2051, kind, seed=threads)
    call = jax.jit(cpu_matmul.matmul)
    args = (jnp.asarray(w), None if scale is None else jnp.asarray(scale))
    for rows in (1, 2, 4, 5, 16):
        x = np.random.default_rng(rows).standard_normal((rows, 1031), np.float32)
        y = call(jnp.asarray(x), *args)
        check(x, w32, w, scale, y)
        np.testing.assert_array_equal(np.asarray(call(jnp.asarray(x), *args)), np.asarray(y))


def test_threads_must_not_be_negative(planned_threads) -> None:
    if not cpu_matmul.available():
        with pytest.raises(RuntimeError, match=r"pip install|CODEGEN_CPU_MATMUL=0"):
            planned_threads(2)
        return
    with pytest.raises(ValueError, match=r"0 \(the pool's size\) or more"):
        planned_threads(-1)
    before = planned_threads(2)
    assert planned_threads(before) == 2


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "bf16", "f32"])
def test_agrees_with_the_xla_path(isa: str, kind: str) -> None:
    """Both sum in fp32: each is within the bound of the exact result, so within twice of the
    other."""
    _, w, scale = random_weights(300, 700, kind)
    x = np.random.default_rng(1).standard_normal((7, 300), np.float32)
    args = (jnp.asarray(x), jnp.asarray(w), None if scale is None else jnp.asarray(scale))
    ours, xla = jax.jit(cpu_matmul.matmul)(*args), jax.jit(cpu_matmul.reference)(*args)
    gap = np.abs(np.asarray(ours, np.float64) - np.asarray(xla, np.float64))
    assert np.all(gap <= 2 * cpu_matmul.max_error_bound(x, w, scale))


SIZES = {  # hidden size of every CodeGen-1 size: qkv, fc_in and fc_out shapes
    size: CodeGenConfig.preset(size).hidden_size for size in ("350M", "2B", "6B", "16B")
}


@needs_kernel
@pytest.mark.parametrize("size", list(SIZES))
def test_shapes_of_every_codegen_size(size: str) -> None:
    """Full qkv, fc_in and fc_out shapes (1, 16 and 128 rows: a prefill, on AMX tiles where
    the CPU has them); the float64 reference is computed for 160 of the output columns, the
    last 32 among them (the column tail and last chunk)."""
    hidden = SIZES[size]
    rng = np.random.default_rng(6)
    for k, n in ((hidden, 3 * hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
        stored = {"int8": rng.integers(-127, 128, (k, n), dtype=np.int8)}
        if hidden <= 2560:  # bf16 16B fc_in is 300 MB: int8 only there
            stored["bf16"] = rng.standard_normal((k, n), np.float32).astype(ml_dtypes.bfloat16)
        cols = np.concatenate([rng.choice(n - 32, 128, replace=False), np.arange(n - 32, n)])
        for kind, w in stored.items():
            scale = rng.uniform(1e-3, 1e-2, n).astype(np.float32) if kind == "int8" else None
            for rows in (1, 16, 128):
                x = rng.standard_normal((rows, k), np.float32)
                y = jax.jit(cpu_matmul.matmul)(
                    jnp.asarray(x), jnp.asarray(w), None if scale is None else jnp.asarray(scale)
                )
                picked = None if scale is None else scale[cols]
                error = np.abs(np.asarray(y)[:, cols] - exact(x, w[:, cols], picked))
                bound = cpu_matmul.max_error_bound(x, w[:, cols], picked, parts(rows, w))
                assert np.all(error <= bound)


@pytest.fixture
def amx_from_rows():
    """Set from how many rows products take AMX tiles (1: every product); back after."""
    before = cpu_matmul.extension()[0].set_amx_rows(cpu_matmul.MAX_ROWS + 1)
    yield cpu_matmul.extension()[0].set_amx_rows
    cpu_matmul.extension()[0].set_amx_rows(before)


@needs_amx
@pytest.mark.parametrize("kind", ["int8", "bf16"])
@pytest.mark.parametrize("k, n", [(1, 1), (5, 17), (37, 53), (64, 1003), (130, 16), (259, 2049)])
def test_amx_odd_shapes_and_row_counts(amx_from_rows, kind: str, k: int, n: int) -> None:
    """Every row count from 1 on AMX tiles (forced down to 1 row), past the 32-row blocks and
    the 32/128-column panels, K not a multiple of the tiles' 32: padding must add nothing."""
    amx_from_rows(1)
    w32, w, scale = random_weights(k, n, kind)
    call = jax.jit(cpu_matmul.matmul)
    for rows in (*range(1, 18), 31, 32, 33, 64, 100):
        x = np.random.default_rng(rows).standard_normal((rows, k), np.float32)
        y = call(jnp.asarray(x), jnp.asarray(w), None if scale is None else jnp.asarray(scale))
        check(x, w32, w, scale, y, amx=True)


@needs_amx
@pytest.mark.parametrize("kind", ["int8", "bf16"])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_amx_every_cut_into_panels(planned_threads, kind: str, threads: int) -> None:
    """The column panels split over 1, 3 or 8 workers: within the bound, the same bits on every
    run and for every worker count (each output is summed by one task, in one order)."""
    planned_threads(threads)
    w32, w, scale = random_weights(1031, 2051, kind, seed=3)
    x = np.random.default_rng(9).standard_normal((70, 1031), np.float32)
    args = (jnp.asarray(x), jnp.asarray(w), None if scale is None else jnp.asarray(scale))
    y = jax.jit(cpu_matmul.matmul)(*args)
    check(x, w32, w, scale, y)
    assert parts(70, w) == cpu_matmul.AMX_PARTS
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_matmul.matmul)(*args)), np.asarray(y))
    planned_threads(1)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_matmul.matmul)(*args)), np.asarray(y))


@needs_amx
def test_amx_activations_of_every_magnitude() -> None:
    """Activations from 2^-100 to 2^100 and exact zeros: the three bf16 parts still sum to each
    one (a part's rounding never overflows), and AMX's flush of denormals stays in the bound."""
    w32, w, scale = random_weights(96, 80, "int8", seed=4)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((40, 96)) * 2.0 ** rng.integers(-100, 100, (40, 96))).astype(
        np.float32
    )
    x[:, ::7] = 0
    y = jax.jit(cpu_matmul.matmul)(jnp.asarray(x), jnp.asarray(w), jnp.asarray(scale))
    assert np.all(np.isfinite(np.asarray(y)))
    check(x, w32, w, scale, y)


@needs_amx
def test_amx_infinities_huge_and_tiny_activations() -> None:
    """The breaker's inputs: an infinite activation gave NaN on AMX (x - bf16(x) = inf - inf),
    3.4e38 too (rounded to bf16 it overflowed); both must match XLA's path. Activations near
    2^-120 times weights near 2^100 (parts below 2^-126, flushed by AMX) stay in the bound."""
    rows = 20
    x = np.ones((rows, 3), np.float32)
    x[0, 0], x[1, 1], x[2, 2] = np.inf, -np.inf, np.nan
    x[3, 0], x[4, 1] = np.float32(3.4e38), np.float32(-3.39e38)
    w = np.asarray([[1, 0.5, -2], [0.25, 1, 1], [1, 1, 0.125]], np.float32)
    for stored in (w.astype(ml_dtypes.bfloat16), (w * 8).astype(np.int8)):
        scale = None if stored.dtype != np.int8 else jnp.full(3, 0.125, jnp.float32)
        args = (jnp.asarray(x), jnp.asarray(stored), scale)
        ours = np.asarray(jax.jit(cpu_matmul.matmul)(*args))
        xla = np.asarray(jax.jit(cpu_matmul.reference)(*args))
        np.testing.assert_array_equal(ours, xla)  # every value here is exact: the same bits
    rng = np.random.default_rng(8)
    tiny = (rng.uniform(1, 2, (rows, 64)) * 2.0**-120).astype(np.float32)
    big = (rng.uniform(1, 2, (64, 16)) * 2.0**100).astype(ml_dtypes.bfloat16)
    y = jax.jit(cpu_matmul.matmul)(jnp.asarray(tiny), jnp.asarray(big))
    check(tiny, big.astype(np.float32), big, None, y)


@needs_kernel
def test_a_product_with_no_inner_dimension_is_zeros(amx_from_rows) -> None:
    """x [rows, 0] @ w [0, N]: zeros (on AMX a division by the empty rows' size killed the
    process, SIGFPE)."""
    amx_from_rows(1)
    for rows in (5, 20):
        y = jax.jit(cpu_matmul.matmul)(
            jnp.zeros((rows, 0), jnp.float32), jnp.zeros((0, 5), jnp.int8), jnp.ones(5)
        )
        np.testing.assert_array_equal(np.asarray(y), np.zeros((rows, 5), np.float32))


@needs_amx
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_amx_parts_sum_to_the_activation_exactly(kind: str) -> None:
    """One weight of 1, -1, 2 or 64 per output (a power of two: x w is exact in fp32): the sum
    of the three parts' products must give every bit of x w (two parts would lose the last 8
    of fp32's 24 significant bits)."""
    x = np.random.default_rng(6).uniform(-3, 3, (40, 1)).astype(np.float32)
    x[:, 0] += np.float32(2.0**-20)  # make sure the low bits are set
    weights = np.array([[1, -1, 2, 64]], np.float32)
    w = weights.astype(np.int8) if kind == "int8" else weights.astype(ml_dtypes.bfloat16)
    scale = jnp.ones(4, jnp.float32) if kind == "int8" else None
    y = np.asarray(jax.jit(cpu_matmul.matmul)(jnp.asarray(x), jnp.asarray(w), scale))
    np.testing.assert_array_equal(y, x * weights)


@needs_kernel
def test_non_contiguous_inputs() -> None:
    """Transposed and strided operands: XLA hands the kernel row-major copies."""
    w32, w, scale = random_weights(96, 80, "int8")
    big = np.random.default_rng(2).standard_normal((3, 2 * 96), np.float32)

    @jax.jit
    def strided(big, w_transposed, scale):
        return cpu_matmul.matmul(big[:, 1::2], w_transposed.T, scale)

    y = strided(jnp.asarray(big), jnp.asarray(np.ascontiguousarray(w.T)), jnp.asarray(scale))
    check(np.ascontiguousarray(big[:, 1::2]), w32, w, scale, y)


def test_bad_operands_say_what_is_taken() -> None:
    x = jnp.ones((2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"x \[rows, K\] and w \[K, N\]"):
        cpu_matmul.matmul(x, jnp.ones((9, 4), jnp.int8), jnp.ones(4))
    with pytest.raises(ValueError, match="int8 weights with a scale, or bf16 or fp32 without"):
        cpu_matmul.matmul(x, jnp.ones((8, 4), jnp.int8), None)


@needs_kernel
def test_gradients_flow_through_the_xla_path() -> None:
    w = jnp.asarray(np.random.default_rng(3).standard_normal((8, 5)), jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8)), jnp.float32)
    ours = jax.grad(lambda x, w: cpu_matmul.matmul(x, w).sum(), argnums=(0, 1))(x, w)
    xla = jax.grad(lambda x, w: cpu_matmul.reference(x, w, None).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, xla, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ the model


def greedy(
    checkpoint, tokenizer_files, prompt_length: int = 11, tokens: int = 1, **options
) -> tuple[list[list[int]], str]:
    """Greedy tokens of a fresh decoder after a prompt, and the HLO of its model over `tokens`
    tokens (1: a decode step; more: a prefill), to see which path ran."""
    jax.clear_caches()  # a compiled step of the other path must not be reused
    decoder = local_decoder(checkpoint, tokenizer_files, **options)
    prompt = np.random.default_rng(5).integers(0, 1000, prompt_length).tolist()
    ids = decoded_ids(decoder, prompt, SampleParams(16))
    step = jax.jit(decoder.model.apply).lower(
        {"params": decoder.params}, jnp.zeros((1, tokens), jnp.int32)
    )
    return ids, step.as_text()


@needs_kernel
@pytest.mark.parametrize("options", [{"int8": True}, {"dtype": "bfloat16"}])
def test_greedy_tokens_equal_on_both_paths(
    tiny_checkpoint, tokenizer_files, monkeypatch, options
) -> None:
    target = cpu_matmul.TARGETS["int8" if options.get("int8") else "bf16"]
    kernel_ids, kernel_hlo = greedy(tiny_checkpoint, tokenizer_files, **options)
    assert target in kernel_hlo
    monkeypatch.setattr(cpu_matmul, "MAX_ROWS", 0)  # every Linear on the XLA path
    monkeypatch.setattr(cpu_matmul, "amx", lambda: False)
    xla_ids, xla_hlo = greedy(tiny_checkpoint, tokenizer_files, **options)
    assert target not in xla_hlo
    assert kernel_ids == xla_ids


@needs_amx
@pytest.mark.parametrize("options", [{"int8": True}, {"dtype": "bfloat16"}])
def test_greedy_tokens_equal_after_a_prefill_on_amx(
    tiny_checkpoint, tokenizer_files, monkeypatch, options
) -> None:
    """A 60-token prompt's prefill on AMX tiles, then decode steps on the vector kernel: the
    same greedy tokens as with the prefill on XLA's path."""
    target = cpu_matmul.TARGETS["int8" if options.get("int8") else "bf16"]
    amx_ids, prefill_hlo = greedy(tiny_checkpoint, tokenizer_files, 60, 60, **options)
    assert target in prefill_hlo
    monkeypatch.setattr(cpu_matmul, "amx", lambda: False)  # the prefill on XLA's matmul
    xla_ids, xla_prefill_hlo = greedy(tiny_checkpoint, tokenizer_files, 60, 60, **options)
    assert target not in xla_prefill_hlo
    assert amx_ids == xla_ids  # (the decode steps on both paths: the test above)


def test_without_the_extension_everything_runs_on_xla(
    tiny_checkpoint, tokenizer_files, monkeypatch
) -> None:
    import codegen_repl.model as model_package

    monkeypatch.setitem(sys.modules, "codegen_repl.model._cpu_matmul", None)  # unimportable
    monkeypatch.delattr(model_package, "_cpu_matmul", raising=False)
    cpu_matmul.extension.cache_clear()
    try:
        assert not cpu_matmul.available()
        assert cpu_matmul.status().startswith("int8/bf16 CPU matmul: XLA (the C++ extension")
        assert "pip install" in cpu_matmul.status()
        ids, hlo = greedy(tiny_checkpoint, tokenizer_files, int8=True)
        assert cpu_matmul.TARGETS["int8"] not in hlo
        assert len(ids[0]) == 16
    finally:
        monkeypatch.undo()
        cpu_matmul.extension.cache_clear()
        jax.clear_caches()


def generate_int8_verbose(checkpoint: Path, **env: str) -> subprocess.CompletedProcess:
    """`codegen-repl generate --int8 --verbose` (3 tokens) with these environment variables."""
    script = Path(sys.executable).with_name("codegen-repl")
    options = ["--model", str(checkpoint), "--int8", "--verbose", "--max-new-tokens", "3"]
    return subprocess.run(
        [str(script), "generate", *options, "def f():"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
    )


@pytest.mark.parametrize("switch", ["1", "0", "off"])
def test_generate_verbose_says_which_matmul_runs(chat_checkpoint, switch: str) -> None:
    """`generate --int8 --verbose` names the path; on the XLA path a note says it is slower."""
    result = generate_int8_verbose(chat_checkpoint, CODEGEN_CPU_MATMUL=switch)
    assert result.returncode == 0, result.stderr
    if switch != "1" or not cpu_matmul.available():
        assert "note: int8/bf16 weights on CPU save memory but decode slower" in result.stderr
        assert "· CPU matmul (int8 weights): XLA (" in result.stderr
    else:
        assert "note:" not in result.stderr
        assert "· CPU matmul (int8 weights): C++ kernel (" in result.stderr


@needs_kernel
def test_take_rows_follows_jnp_take() -> None:
    """Rows of a bf16 table widened to fp32, by jnp.take's rules: ids of any shape, an id in
    [-V, 0) counts from the end, one outside [-V, V) gives NaNs."""
    table = jnp.asarray(
        np.random.default_rng(7).standard_normal((37, 19)), jnp.bfloat16
    )  # odd sizes
    ids = jnp.asarray([[0, 36, -1], [-37, 5, 5]], jnp.int32)
    rows = jax.jit(cpu_matmul.take_rows)(table, ids)
    assert rows.shape == (2, 3, 19) and rows.dtype == jnp.float32
    np.testing.assert_array_equal(rows, jnp.take(table, ids, axis=0).astype(jnp.float32))
    outside = jax.jit(cpu_matmul.take_rows)(table, jnp.asarray([37, -38, 2], jnp.int32))
    assert np.all(np.isnan(outside[:2])) and not np.any(np.isnan(outside[2]))
    np.testing.assert_array_equal(outside[2], table[2].astype(jnp.float32))
    # unsigned ids past int32's range must stay out of range, not wrap onto a row
    wide = jax.jit(cpu_matmul.take_rows)(table, jnp.asarray([2**31 + 2, 3], jnp.uint32))
    assert np.all(np.isnan(wide[0])) and not np.any(np.isnan(wide[1]))
    with pytest.raises(TypeError, match="integer ids"):
        cpu_matmul.take_rows(table, jnp.asarray([1.0, 2.0]))


@needs_kernel
@pytest.mark.parametrize("isa", ["AVX512", "bogus", "default"])
def test_the_instruction_set_is_picked_by_the_environment(chat_checkpoint, isa: str) -> None:
    """CODEGEN_CPU_MATMUL_ISA: a lower set turns AMX off (the verbose line names the set in
    use, in any case); an unknown name, or one the CPU lacks, is a one-line error listing the
    choices, not a traceback. By default int8 prefills take AMX where the CPU has it."""
    if isa.lower() == "avx512" and "avx512" not in instruction_sets():
        pytest.skip("this CPU has no AVX-512")
    has_amx = "amx" in instruction_sets()
    chosen = {} if isa == "default" else {"CODEGEN_CPU_MATMUL_ISA": isa}
    result = generate_int8_verbose(chat_checkpoint, **chosen)
    line = "· CPU matmul (int8 weights): C++ kernel ("
    if isa == "bogus":
        assert result.returncode != 0
        assert "CODEGEN_CPU_MATMUL_ISA=bogus: not an instruction set; use one of best, amx" in (
            result.stderr
        )
        assert "Traceback" not in result.stderr
    elif isa == "amx" and not has_amx:
        assert result.returncode != 0
        assert "instruction set 'amx' is not available on this CPU" in result.stderr
        assert "Traceback" not in result.stderr
    elif isa in ("amx", "default") and has_amx:
        assert result.returncode == 0, result.stderr
        assert f"{line}avx512, prefills on AMX tiles, XLA's thread pool)" in result.stderr
    elif isa == "default":  # the best set this CPU has
        assert result.returncode == 0, result.stderr
        assert f"{line}{instruction_sets()[0]}, XLA's thread pool)" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f"{line}avx512, XLA's thread pool)" in result.stderr
