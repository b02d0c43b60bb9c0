"""The JAX network against transformers' CodeGenForCausalLM on the same checkpoint files."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from codegen_repl.model import cpu_attention, cpu_matmul
from codegen_repl.model.checkpoint import load_model
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, apply_rotary, init_cache, rotary_angles
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import empty_state, lower_decode, model_logits_fn, request_knobs
from tests.conftest import decoded_ids, hf_codegen, local_decoder, save_bin, torch_logits

# fp32, relative to the logit scale (max |logit| of the reference); never loosened.
LOGIT_TOLERANCE = 1e-4

SHAPES = {
    # rotary_dim < head_dim (16), odd layer count, vocab not a multiple of 64
    "h4_rot8_l3": dict(n_embd=64, n_head=4, rotary_dim=8, n_layer=3, vocab_size=1003),
    # 8 heads of 12 dims, rotary 6, one layer
    "h8_rot6_l1": dict(n_embd=96, n_head=8, rotary_dim=6, n_layer=1, vocab_size=517),
    # 12 heads, rotary on the whole head, 5 layers, custom MLP width
    "h12_rot8_l5": dict(n_embd=96, n_head=12, rotary_dim=8, n_layer=5, vocab_size=771, n_inner=200),
    # 16 heads of 4 dims (350M's head count), rotary 2
    "h16_rot2_l2": dict(n_embd=64, n_head=16, rotary_dim=2, n_layer=2, vocab_size=320),
}


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def jax_logits(folder, ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
    loaded = load_model(folder, dtype=dtype)
    model = CodeGen(loaded.config, dtype=loaded.params["wte"]["embedding"].dtype)
    logits, _ = model.apply({"params": loaded.params}, jnp.asarray(ids, jnp.int32))
    return np.asarray(logits)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_logits_match_transformers(tmp_path, name: str, layout: str) -> None:
    reference = hf_codegen(seed=len(name), **SHAPES[name])
    if layout == "safetensors":
        reference.save_pretrained(tmp_path)
    else:  # the published checkpoints are fp16 .bin: compare with the fp16-rounded weights
        save_bin(reference, tmp_path)
        with torch.no_grad():  # round the parameters only (not the rotary sin/cos buffer)
            for param in reference.parameters():
                param.copy_(param.half().float())
    ids = np.random.default_rng(1).integers(0, reference.config.vocab_size, (2, 48))
    error = relative_error(jax_logits(tmp_path, ids), torch_logits(reference, ids))
    print(f"{name}/{layout}: max relative logit difference {error:.2e}")
    assert error < LOGIT_TOLERANCE


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_tokens_match_transformers_generate(tmp_path, tokenizer_files, name: str) -> None:
    reference = hf_codegen(seed=len(name), **SHAPES[name])
    reference.save_pretrained(tmp_path)
    prompt = np.random.default_rng(2).integers(0, reference.config.vocab_size, (1, 11))
    with torch.no_grad():
        expected = reference.generate(
            torch.as_tensor(prompt),
            attention_mask=torch.ones_like(torch.as_tensor(prompt)),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, prompt.shape[1] :].tolist()
    decoder = local_decoder(tmp_path, tokenizer_files)
    ours = decoded_ids(decoder, prompt[0].tolist(), SampleParams(32))[0]
    assert ours == expected


def test_bfloat16_is_close_to_float32(tiny_checkpoint) -> None:
    ids = np.random.default_rng(3).integers(0, 1003, (1, 32))
    loaded = load_model(tiny_checkpoint, dtype="bfloat16")
    assert loaded.params["block_0"]["attn"]["qkv"]["kernel"].dtype == jnp.bfloat16
    error = relative_error(
        jax_logits(tiny_checkpoint, ids, "bfloat16"), jax_logits(tiny_checkpoint, ids)
    )
    assert error < 0.05  # bf16 has 8 mantissa bits; 3 layers keep the drift to a few percent


def test_rotary_is_interleaved_on_leading_dims_only() -> None:
    x = jnp.arange(2 * 3 * 1 * 8, dtype=jnp.float32).reshape(2, 3, 1, 8)
    positions = jnp.broadcast_to(jnp.arange(3), (2, 3))
    sin, cos = rotary_angles(positions, rotary_dim=4)
    out = np.asarray(apply_rotary(x, sin, cos))
    np.testing.assert_array_equal(out[..., 4:], np.asarray(x)[..., 4:])
    np.testing.assert_array_equal(out[:, 0], np.asarray(x)[:, 0])  # position 0: no rotation
    # pair (0, 1) at position 1 rotates by angle 1 (inv_freq[0] == 1)
    x0, x1 = np.asarray(x)[0, 1, 0, :2]
    np.testing.assert_allclose(
        out[0, 1, 0, :2],
        [x0 * np.cos(1) - x1 * np.sin(1), x1 * np.cos(1) + x0 * np.sin(1)],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    ("attention", "rows", "head_dim"),
    [("dot", 1, 8), ("dot", 3, 8), ("sum", 1, 8), ("auto", 1, 16), ("auto", 3, 16)],
)
def test_decode_step_updates_the_cache_in_place(attention: str, rows: int, head_dim: int) -> None:
    # A decode step reads every layer's cache and writes one position of it. XLA's CPU
    # backend copied the whole cache (and transposed the keys) each step when the write had
    # two users; the compiled chunk must hold no cache-sized copy or transpose at all. A head
    # dim of 16 takes the CPU attention kernel where it is built (a custom call reads the cache).
    config = CodeGenConfig(
        vocab_size=64, max_positions=64, hidden_size=4 * head_dim, num_layers=2, num_heads=4,
        rotary_dim=4, intermediate_size=64,
    )  # fmt: skip
    model = CodeGen(config, decode_attention=attention)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    state = empty_state(init_cache(config, rows, 64, jnp.float32), config.vocab_size)
    sample = SampleParams(8, temperature=0.7, n=rows)
    compiled = lower_decode(
        model_logits_fn(model), params, state, request_knobs(sample), 4, sample.mode
    ).compile()
    text = compiled.as_text()
    assert "while" in text  # the decode loop is there, and the shapes below are the cache's
    assert f"f32[{rows},4,64,{head_dim}]" in text
    if cpu_attention.applies(1, head_dim, jnp.float32):
        assert cpu_matmul.TARGETS["attention"] in text
    shape = f"(64,{head_dim}|{head_dim},64)"
    cache_sized = re.compile(rf"= f32\[{rows},4,{shape}\]\S* (copy|transpose)\(")
    assert not [line.strip()[:160] for line in text.splitlines() if cache_sized.search(line)]


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16])
def test_a_decode_step_reads_only_the_embedding_rows_it_needs(param_dtype) -> None:
    # With bf16 weights and fp32 compute (the CPU with the C++ kernel), XLA's CPU backend
    # widened the whole embedding table (no bf16 gather) and hoisted that out of the decode
    # loop: 200 MB of fp32 written per decode chunk for 350M. No buffer of the table's shape
    # may appear in the compiled chunk but the param itself; the lookup is cpu_matmul.take_rows
    # where the kernel takes bf16 weights.
    config = CodeGenConfig(
        vocab_size=520, max_positions=64, hidden_size=48, num_layers=2, num_heads=4,
        rotary_dim=4, intermediate_size=64,
    )  # fmt: skip
    if param_dtype == jnp.bfloat16 and not cpu_matmul.takes(jnp.bfloat16):
        pytest.skip("without the C++ kernel XLA widens a bf16 table for its gather")
    model = CodeGen(config, False, jnp.float32, param_dtype)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    state = empty_state(init_cache(config, 1, 64, jnp.float32), config.vocab_size)
    sample = SampleParams(8)
    compiled = lower_decode(
        model_logits_fn(model), params, state, request_knobs(sample), 4, sample.mode
    ).compile()
    text = compiled.as_text()
    if param_dtype == jnp.bfloat16 and cpu_matmul.takes(jnp.bfloat16):
        assert cpu_matmul.TARGETS["take_rows"] in text
    table = re.compile(r"= \w+\[520,48\]\S* (fusion|convert|copy|bitcast-convert)\(")
    assert not [line.strip()[:160] for line in text.splitlines() if table.search(line)]


def test_the_embedding_lookup_gives_the_table_rows() -> None:
    """Embed's lookup (the C++ take_rows for a bf16 table on the CPU) against jnp.take: the same
    fp32 values for [batch, seq] ids, and the same gradient for the table."""
    from codegen_repl.model.modeling import Embed

    ids = jnp.asarray([[3, 0, 519], [7, 7, 1]], jnp.int32)
    for dtype in (jnp.bfloat16, jnp.float32):
        module = Embed(520, 48, dtype=jnp.float32, param_dtype=dtype)
        variables = module.init(jax.random.key(1), ids)
        table = variables["params"]["embedding"]
        rows = module.apply(variables, ids)
        assert rows.dtype == jnp.float32 and rows.shape == (2, 3, 48)
        np.testing.assert_array_equal(rows, jnp.take(table, ids, axis=0).astype(jnp.float32))

        def loss(params, module=module):
            return (module.apply({"params": params}, ids) ** 2).sum()

        grad = jax.grad(loss)(variables["params"])["embedding"]
        reference = jax.grad(lambda t: (jnp.take(t, ids, axis=0).astype(jnp.float32) ** 2).sum())
        np.testing.assert_array_equal(grad, reference(table))
