"""The same checks on an accelerator (GPU/TPU), where matmul precision and kernels differ."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codegen_repl.model.sample_params import SampleParams
from tests.conftest import decoded_ids, local_decoder, torch_logits
from tests.model.test_modeling import LOGIT_TOLERANCE, jax_logits, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() == "cpu", reason="needs a GPU or TPU"),
]
PROMPT = list(range(3, 40))


def test_fp32_logits_match_transformers_on_the_accelerator(tiny_checkpoint, tiny_hf) -> None:
    ids = np.random.default_rng(1).integers(0, 1003, (2, 48))
    assert relative_error(jax_logits(tiny_checkpoint, ids), torch_logits(tiny_hf, ids)) < (
        LOGIT_TOLERANCE
    )


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"int8": True}])
def test_reduced_precision_greedy_agrees_with_fp32(tiny_checkpoint, tokenizer_files, options):
    fp32 = local_decoder(tiny_checkpoint, tokenizer_files)
    other = local_decoder(tiny_checkpoint, tokenizer_files, **options)
    continuation = decoded_ids(fp32, PROMPT, SampleParams(64))[0]
    ids = jnp.asarray([PROMPT + continuation], jnp.int32)
    reference, _ = fp32.model.apply({"params": fp32.params}, ids)
    logits, _ = other.model.apply({"params": other.params}, ids)
    window = slice(len(PROMPT) - 1, -1)
    agree = np.mean(np.argmax(reference[0, window], -1) == np.argmax(logits[0, window], -1))
    print(f"{options}: greedy agreement with fp32 {agree:.3f}")
    assert agree >= 0.95


def prefill_then_decode(decoder, prompt: list[int], cold: int, steps: int) -> np.ndarray:
    """Next-token logits [steps + 1, vocab]: `cold` prompt tokens prefilled without a cache (the
    fused causal attention: cuDNN in bf16 on NVIDIA GPUs), the rest of the prompt as a warm
    prefill over the cache, then `steps` greedy decode steps (decode_chunk), all on the device."""
    from codegen_repl.model.modeling import init_cache
    from codegen_repl.model.sampling import decode_chunk, empty_state, prefill_prompt, request_knobs

    sample = SampleParams(steps)
    cache = init_cache(decoder.config, 1, 128, decoder.dtype)
    state = empty_state(cache, decoder.config.vocab_size)
    state = prefill_prompt(decoder.logits_fn, decoder.params, state, prompt[:cold], 0, [0])
    if cold < len(prompt):
        state = prefill_prompt(decoder.logits_fn, decoder.params, state, prompt, cold, [0])
    rows = [np.asarray(state.logits[0])]
    for _ in range(steps):
        state, _ = decode_chunk(
            decoder.logits_fn, decoder.params, state, request_knobs(sample), 1, sample.mode
        )
        rows.append(np.asarray(state.logits[0]))
    return np.stack(rows)


def test_bf16_fused_prefill_and_both_decode_attentions_agree(tiny_checkpoint, tokenizer_files):
    """bf16 on the device: a cold prefill through the fused attention, a warm prefill and decode
    steps through the cache (as fused sums and as matmuls) give the same logits as each other
    within bf16's noise (the bound of test_bfloat16_is_close_to_float32)."""
    runs = {
        (attention, cold): prefill_then_decode(
            local_decoder(tiny_checkpoint, tokenizer_files, dtype="bfloat16",
                          decode_attention=attention),
            PROMPT, cold, steps=8,
        )
        for attention in ("sum", "dot")
        for cold in (len(PROMPT), 20)
    }  # fmt: skip
    reference = runs[("dot", len(PROMPT))]
    for key, logits in runs.items():
        error = relative_error(logits, reference)
        print(f"bf16 {key}: max relative logit difference {error:.2e}")
        assert error < 0.05
