"""LocalDecoder on tiny random checkpoints: cache exactness, reuse, int8, stops, compilations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from codegen_repl.errors import ConfigError
from codegen_repl.model import cpu_matmul
from codegen_repl.model.modeling import CodeGen, init_cache, write_cache
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import decode_chunk, model_logits_fn, prefill_rows
from tests.conftest import decoded_ids, local_decoder

CACHE_TOLERANCE = 1e-5  # fp32, relative to the logit scale; never loosened
PROMPT = np.random.default_rng(11).integers(0, 600, 23).tolist()


@pytest.fixture(scope="module")
def decoder(tiny_checkpoint, tokenizer_files):
    return local_decoder(tiny_checkpoint, tokenizer_files)


@pytest.mark.parametrize("attention", ["dot", "sum"])
def test_cached_decode_logits_equal_the_full_forward(decoder, attention: str) -> None:
    """10 tokens without a cache, then one token at a time written into the cache and attended
    over it (positions past the current one hold stale keys: they must stay unseen), with the
    decode attention as matmuls and as fused sums."""
    logits_fn = model_logits_fn(CodeGen(decoder.config, decode_attention=attention))
    ids = np.random.default_rng(0).integers(0, 1003, 40)
    full, _ = decoder.model.apply({"params": decoder.params}, jnp.asarray(ids[None], jnp.int32))
    cache = init_cache(decoder.config, 1, 64, jnp.float32)
    cache = jax.tree.map(lambda x: x + 3.0, cache)  # stale values everywhere
    first, new = logits_fn(decoder.params, jnp.asarray(ids[None, :10]), None, None, None)
    cache = write_cache(cache, new, 0)
    steps = [np.asarray(first[0, 9])]
    for position in range(10, 39):
        token, at = jnp.asarray([[ids[position]]], jnp.int32), jnp.asarray([[position]])
        logits, cache = logits_fn(decoder.params, token, at, cache, None)
        steps.append(np.asarray(logits[0, 0]))
    reference = np.asarray(full[0, 9:39])
    error = np.abs(np.stack(steps) - reference).max() / np.abs(reference).max()
    assert error < CACHE_TOLERANCE


def test_a_prefill_after_cached_tokens_equals_the_full_forward(decoder) -> None:
    """A warm prefill (7 tokens, padded to 8, after 16 cached ones) writes its keys into the
    cache and attends over it; its last real token's logits are the full forward's."""
    ids = np.random.default_rng(5).integers(0, 1003, 23)
    full, _ = decoder.model.apply({"params": decoder.params}, jnp.asarray(ids[None], jnp.int32))
    _, new = decoder.logits_fn(decoder.params, jnp.asarray(ids[None, :16]), None, None, None)
    cache = write_cache(init_cache(decoder.config, 1, 64, jnp.float32), new, 0)
    padded = jnp.asarray([[*ids[16:], 0]], jnp.int32)
    positions = 16 + jnp.arange(8, dtype=jnp.int32)[None]
    logits, _ = decoder.logits_fn(decoder.params, padded, positions, cache, jnp.asarray([6]))
    reference = np.asarray(full[0, 22])
    assert np.abs(np.asarray(logits[0, 0]) - reference).max() / np.abs(reference).max() < (
        CACHE_TOLERANCE
    )


@pytest.mark.parametrize(("chunk_size", "attention"), [(1, "auto"), (3, "sum"), (16, "dot")])
def test_greedy_is_the_same_for_every_chunk_size_and_row(
    tiny_checkpoint, tokenizer_files, tiny_hf, chunk_size: int, attention: str
) -> None:
    with torch.no_grad():
        prompt = torch.tensor([PROMPT])
        expected = tiny_hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )[0, len(PROMPT) :].tolist()  # fmt: skip
    decoder = local_decoder(
        tiny_checkpoint, tokenizer_files, chunk_size=chunk_size, decode_attention=attention
    )
    rows = decoded_ids(decoder, PROMPT, SampleParams(20, n=3))
    assert rows == [expected] * 3


def test_sampling_is_seeded_and_independent_of_chunk_size(tiny_checkpoint, tokenizer_files):
    sample = SampleParams(24, temperature=0.9, top_p=0.95, top_k=50, n=4, seed=3)
    by_chunk = [
        decoded_ids(
            local_decoder(tiny_checkpoint, tokenizer_files, chunk_size=size), PROMPT, sample
        )
        for size in (1, 5)
    ]
    assert by_chunk[0] == by_chunk[1]
    assert len({tuple(row) for row in by_chunk[0]}) > 1  # the n rows are different samples


def test_int8_greedy_agrees_with_fp32(tiny_checkpoint, tokenizer_files, decoder) -> None:
    """Teacher-forced: on fp32's own greedy continuation, int8 picks the same argmax."""
    quantized = local_decoder(tiny_checkpoint, tokenizer_files, int8=True)
    assert quantized.params["block_0"]["mlp"]["fc_in"]["kernel"].dtype == jnp.int8
    continuation = decoded_ids(decoder, PROMPT, SampleParams(64))[0]
    ids = jnp.asarray([PROMPT + continuation], jnp.int32)
    fp32, _ = decoder.model.apply({"params": decoder.params}, ids)
    int8, _ = quantized.model.apply({"params": quantized.params}, ids)
    agree = np.mean(
        np.argmax(fp32[0, len(PROMPT) - 1 : -1], -1) == np.argmax(int8[0, len(PROMPT) - 1 : -1], -1)
    )
    print(f"int8 vs fp32 greedy agreement: {agree:.3f}")
    assert agree >= 0.95


def test_prefix_reuse_gives_the_tokens_of_cold_runs(tiny_checkpoint, tokenizer_files) -> None:
    warm = local_decoder(tiny_checkpoint, tokenizer_files)
    rng = np.random.default_rng(4)
    context = PROMPT[:5]
    for turn in range(5):
        context = context + rng.integers(0, 600, 7).tolist()  # the next natural-language step
        sample = SampleParams(12, temperature=0.7, seed=turn)
        reused = warm.reused_tokens(context)
        assert reused == (0 if turn == 0 else len(context) - 7)
        got = decoded_ids(warm, context, sample)
        cold = decoded_ids(local_decoder(tiny_checkpoint, tokenizer_files), context, sample)
        assert got == cold
        context = context + got[0][:9]  # the code kept from this turn


def test_undo_and_edit_fall_back_to_the_common_prefix(tiny_checkpoint, tokenizer_files) -> None:
    warm = local_decoder(tiny_checkpoint, tokenizer_files)
    decoded_ids(warm, [*PROMPT, 5, 6, 7, 8], SampleParams(8))
    edited = [*PROMPT[:-3], 9, 9, 9]  # diverges 3 tokens before the end of the prompt
    assert warm.reused_tokens(edited) == len(PROMPT) - 3
    cold = local_decoder(tiny_checkpoint, tokenizer_files)
    assert decoded_ids(warm, edited, SampleParams(8)) == decoded_ids(cold, edited, SampleParams(8))
    shorter = PROMPT[:10]  # undo: the new context is a prefix of the cached one
    assert warm.reused_tokens(shorter) == 9
    assert decoded_ids(warm, shorter, SampleParams(8)) == decoded_ids(
        cold, shorter, SampleParams(8)
    )


@pytest.mark.parametrize("whole_context", [False, True])
def test_no_recompilation_inside_a_bucket(tiny_checkpoint, tokenizer_files, whole_context) -> None:
    fresh = local_decoder(tiny_checkpoint, tokenizer_files)
    if whole_context and not fresh.whole_context_cache:
        pytest.skip(f"the CPU attention kernel does not apply here: {cpu_matmul.status()}")
    fresh.whole_context_cache = whole_context
    prefill_rows.clear_cache()
    decode_chunk.clear_cache()
    decoded_ids(fresh, PROMPT[:13], SampleParams(8))
    assert (prefill_rows._cache_size(), decode_chunk._cache_size()) == (1, 1)
    for length in (14, 15, 16):
        fresh.forget()  # cold prefills of new lengths in the same (16) bucket
        decoded_ids(fresh, PROMPT[:length], SampleParams(8))
    assert (prefill_rows._cache_size(), decode_chunk._cache_size()) == (1, 1)
    fresh.forget()
    decoded_ids(fresh, PROMPT, SampleParams(8))  # 23 tokens: the 24 bucket compiles, or
    # over the whole-context cache nothing: three pieces of the 8-wide program
    assert (prefill_rows._cache_size(), decode_chunk._cache_size()) == (
        (1 if whole_context else 2),
        1,
    )


def test_stop_string_ends_decoding_early(chat_checkpoint, tokenizer_files) -> None:
    decoder = local_decoder(chat_checkpoint, tokenizer_files, chunk_size=2)
    prompt = "def fibonacci(n):\n    "
    whole = decoder.complete(prompt, SampleParams(40))[0]
    stop = whole[len(whole) // 3 : len(whole) // 3 + 2]
    assert stop and whole.find(stop) < len(whole) - 2
    ids = decoder.tokenizer.encode(prompt)
    early = decoder.complete(prompt, SampleParams(40, stop=(stop,)))[0]
    assert early == whole[: whole.find(stop)]
    assert len(decoder._tokens) < len(ids) + 40  # it stopped before max_new_tokens
    streamed = "".join(decoder.generate(prompt, SampleParams(40, stop=(stop,))))
    assert streamed == early


def test_streamed_text_equals_the_completion(chat_checkpoint, tokenizer_files) -> None:
    decoder = local_decoder(chat_checkpoint, tokenizer_files)
    sample = SampleParams(30, temperature=0.8, seed=1, codegen_rules=True)
    pieces = list(decoder.generate("import os\n", sample))
    assert "".join(pieces) == decoder.complete("import os\n", sample)[0]


def test_an_abandoned_stream_leaves_the_decoder_usable(chat_checkpoint, tokenizer_files) -> None:
    decoder = local_decoder(chat_checkpoint, tokenizer_files, chunk_size=2)
    stream = decoder.stream_tokens(PROMPT, SampleParams(40))
    next(stream)
    stream.close()  # what Ctrl-C in a front end does to the generator
    cold = local_decoder(chat_checkpoint, tokenizer_files)
    assert decoded_ids(decoder, PROMPT, SampleParams(10)) == decoded_ids(
        cold, PROMPT, SampleParams(10)
    )


def test_context_overflow_is_a_clear_error(decoder) -> None:
    with pytest.raises(ConfigError, match=r"exceeds the model's context of 128 tokens"):
        decoded_ids(decoder, PROMPT * 5, SampleParams(32))
    with pytest.raises(ConfigError, match=r"the prompt is empty"):
        decoded_ids(decoder, [], SampleParams(4))


def test_model_logits_fn_is_shared_per_model(decoder) -> None:
    again = CodeGen(decoder.config, dtype=decoder.dtype, param_dtype=decoder.dtype)
    assert model_logits_fn(again) is decoder.logits_fn


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rule is about the CPU backend")
def test_float16_on_the_cpu_is_refused_at_load(tiny_checkpoint) -> None:
    from codegen_repl.decoders.local import load_for_decoding

    with pytest.raises(ConfigError, match=r"float16 cannot run on the CPU.*bfloat16"):
        load_for_decoding(tiny_checkpoint, dtype="float16")


def test_a_forgotten_cache_is_written_over_not_allocated_again(
    tiny_checkpoint, tokenizer_files
) -> None:
    """After forget() the next cold request reuses the forgotten state's memory (its cache is
    donated to the prefill) where the cache spans the whole context: the same tokens as a
    fresh decoder's, though the old cache holds stale keys/values past the new prompt."""
    reused = local_decoder(tiny_checkpoint, tokenizer_files)
    if not reused.whole_context_cache:
        pytest.skip(f"the CPU attention kernel does not apply here: {cpu_matmul.status()}")
    fresh = local_decoder(tiny_checkpoint, tokenizer_files)
    long_one = PROMPT + PROMPT[::-1]
    decoded_ids(reused, long_one, SampleParams(8))  # 46 tokens + 8 of keys/values
    old = reused._kept
    reused.forget()
    assert reused.reused_tokens(PROMPT[:9]) == 0
    ids = decoded_ids(reused, PROMPT[:9], SampleParams(8, n=1))
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(old.cache))
    assert ids == decoded_ids(fresh, PROMPT[:9], SampleParams(8))
    reused.forget()  # n=3: another shape, a fresh state, and the spare let go first
    kept = reused._kept
    many = decoded_ids(reused, PROMPT[:9], SampleParams(8, n=3, temperature=0.8, seed=1))
    assert many == decoded_ids(fresh, PROMPT[:9], SampleParams(8, n=3, temperature=0.8, seed=1))
    assert reused._spare is None and kept is None
    reused.whole_context_cache = False  # where a spare never fits, forget() keeps none
    reused.forget()
    assert reused._spare is None and reused._kept is None
