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
