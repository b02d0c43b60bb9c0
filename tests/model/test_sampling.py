"""The sampler on a fake model: masks, temperature, seeds, and compilation counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codegen_repl.errors import ConfigError
from codegen_repl.model.modeling import LayerCache
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import (
    DecodeState,
    Knobs,
    bucket,
    choose_token,
    choose_tokens,
    common_prefix,
    decode_chunk,
    decode_steps,
    knobs,
    padded_suffix,
    request_knobs,
    sample_key,
    union_mode,
)

VOCAB = 8
# A fixed next-token distribution, whatever the input: probabilities 0.4, 0.25, 0.15, ...
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))


def fake_logits_fn(params, tokens, positions, cache, logits_at):
    """Ignores its input: every position gets LOGITS (a model with no memory)."""
    batch, seq = tokens.shape
    new = jnp.zeros((batch, 1, seq, 1))
    seq = 1 if logits_at is not None else seq
    logits = jnp.broadcast_to(LOGITS, (batch, seq, VOCAB))
    return logits, (LayerCache(new, new),) if cache is None else cache


def fake_cache(rows: int) -> tuple[LayerCache, ...]:
    return (LayerCache(jnp.zeros((rows, 1, 16, 1)), jnp.zeros((rows, 1, 16, 1))),)


def fake_state(rows: int) -> DecodeState:
    logits = jnp.broadcast_to(LOGITS, (rows, VOCAB))
    zeros = np.zeros(rows, np.int32)
    return DecodeState(fake_cache(rows), logits, jnp.asarray(zeros), jnp.asarray(zeros))


def row_knobs(sample: SampleParams, rows: int) -> Knobs:
    """`rows` rows of one sample's settings, row r with the key of sample r."""
    return knobs([(sample, sample_key(sample, r)) for r in range(rows)])


def sample_many(sample: SampleParams, rows: int = 4000, steps: int = 4) -> np.ndarray:
    traced = row_knobs(sample, rows)
    _, tokens = decode_chunk(fake_logits_fn, {}, fake_state(rows), traced, steps, sample.mode)
    return np.asarray(tokens)


def frequencies(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens.ravel(), minlength=VOCAB) / tokens.size


def test_greedy_takes_the_argmax() -> None:
    assert set(sample_many(SampleParams(temperature=0), rows=3).ravel()) == {0}


def test_temperature_one_follows_the_distribution() -> None:
    seen = frequencies(sample_many(SampleParams(temperature=1.0)))
    # 16,000 draws: 4 standard errors of the largest probability is about 0.016
    np.testing.assert_allclose(seen, PROBS, atol=0.016)


def test_temperature_sharpens_and_flattens() -> None:
    for temperature in (0.5, 2.0):
        expected = PROBS ** (1 / temperature) / np.sum(PROBS ** (1 / temperature))
        seen = frequencies(sample_many(SampleParams(temperature=temperature)))
        np.testing.assert_allclose(seen, expected, atol=0.016)


def test_top_k_keeps_the_k_likeliest_renormalised() -> None:
    seen = frequencies(sample_many(SampleParams(temperature=1.0, top_k=3)))
    assert seen[3:].sum() == 0
    np.testing.assert_allclose(seen[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.016)


def test_top_p_keeps_the_nucleus() -> None:
    # mass before token i: 0, .4, .65, .8, .9 -> top_p 0.75 keeps tokens 0..2
    seen = frequencies(sample_many(SampleParams(temperature=1.0, top_p=0.75)))
    assert seen[3:].sum() == 0
    np.testing.assert_allclose(seen[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.016)


def test_top_p_tiny_keeps_only_the_top_token() -> None:
    assert set(sample_many(SampleParams(temperature=1.0, top_p=0.01), rows=50).ravel()) == {0}


def test_top_k_then_top_p_as_transformers_does() -> None:
    # top_k 4 renormalises to .4/.9, .25/.9, .15/.9, .1/.9; mass before token 2 is .72 < .75,
    # before token 3 is .89 -> tokens 0..2 stay
    seen = frequencies(sample_many(SampleParams(temperature=1.0, top_k=4, top_p=0.75)))
    assert seen[3:].sum() == 0 and seen[2] > 0


def test_seeds_reproduce_and_differ() -> None:
    first = sample_many(SampleParams(temperature=1.0, seed=1), rows=64)
    np.testing.assert_array_equal(first, sample_many(SampleParams(temperature=1.0, seed=1), 64))
    assert not np.array_equal(first, sample_many(SampleParams(temperature=1.0, seed=2), rows=64))


def test_steps_use_their_own_keys_whatever_the_chunking() -> None:
    sample = SampleParams(temperature=1.0, seed=5)
    one_chunk = sample_many(sample, rows=16, steps=6)
    state, traced = fake_state(16), row_knobs(sample, 16)
    pieces = []
    for steps in (2, 4):
        state, tokens = decode_chunk(fake_logits_fn, {}, state, traced, steps, sample.mode)
        pieces.append(np.asarray(tokens))
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), one_chunk)


def test_changing_knob_values_does_not_recompile() -> None:
    sample_many(SampleParams(temperature=0.7, top_p=0.9, top_k=5), rows=8)
    before = decode_chunk._cache_size()
    sample_many(SampleParams(temperature=1.3, top_p=0.5, top_k=2, seed=9), rows=8)
    assert decode_chunk._cache_size() == before


def test_choose_tokens_greedy_per_row() -> None:
    logits = jnp.asarray([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    sample = SampleParams(n=2)
    steps = jnp.zeros(2, jnp.int32)
    assert choose_tokens(logits, request_knobs(sample), steps, sample.mode).tolist() == [1, 0]


def test_each_row_picks_what_it_would_pick_alone() -> None:
    """Rows with different settings in one batch pick exactly what each would pick as the only
    row (same masks, same random numbers), and a greedy row in a sampled batch stays greedy."""
    logits = jax.random.normal(jax.random.key(1), (5, 50)) * 3  # [rows, vocab]
    samples = [
        SampleParams(temperature=0),
        SampleParams(temperature=0.7, seed=1),
        SampleParams(temperature=1.2, top_k=5, seed=2),
        SampleParams(temperature=0.9, top_p=0.8, seed=3),
        SampleParams(temperature=1.0, top_k=10, top_p=0.7, seed=4),
    ]
    traced = knobs([(s, sample_key(s, 0)) for s in samples])
    for step in range(20):
        steps = jnp.full((5,), step, jnp.int32)
        batched = choose_tokens(logits, traced, steps, union_mode(samples)).tolist()
        alone = [
            int(choose_tokens(logits[i : i + 1], request_knobs(s), steps[:1], s.mode)[0])
            for i, s in enumerate(samples)
        ]
        assert batched == alone
        assert batched[0] == int(jnp.argmax(logits[0]))


def test_one_row_sampler_matches_the_categorical_draw() -> None:
    """choose_token at temperature 1 without masks is jax.random.categorical of the row."""
    logits = jax.random.normal(jax.random.key(2), (50,))
    key = jax.random.key(7)
    mode = SampleParams(temperature=1.0).mode
    ours = choose_token(logits, key, jnp.float32(1), jnp.float32(1), jnp.int32(0), mode)
    assert int(ours) == int(jax.random.categorical(key, logits[None], axis=-1)[0])


def test_host_helpers_shared_by_the_decoder_and_the_engine() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 2  # one token is always left to prefill
    assert common_prefix([], [5]) == 0
    assert [decode_steps(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    padded = padded_suffix([7, 8, 9, 10, 11], reuse=2, cache_len=64, smallest=1)
    assert padded.tolist() == [[9, 10, 11]]
    assert padded_suffix([7, 8, 9], 0, cache_len=64, smallest=16).tolist() == [[7, 8, 9] + [0] * 13]
    assert padded_suffix([7] * 5, 0, cache_len=4 + 2, smallest=8).shape == (1, 6)  # fits the cache


def test_buckets() -> None:
    assert [bucket(n) for n in (1, 64, 65, 97, 129, 150, 2000, 2100)] == [
        64, 64, 96, 128, 192, 192, 2048, 3072,
    ]  # fmt: skip
    assert [bucket(n, smallest=1) for n in (1, 2, 3, 5, 7, 9, 13, 17, 25)] == [
        1, 2, 3, 6, 8, 12, 16, 24, 32,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("temperature", -1.0, "temperature must be >= 0 (0 = greedy)"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_k", -2, "top_k must be >= 0 (0 = off)"),
        ("n", 0, "n must be >= 1"),
    ],
)
def test_sample_params_validation(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        SampleParams(**{field: value})
    assert message in str(error.value)
