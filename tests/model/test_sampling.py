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
    bucket,
    choose_tokens,
    decode_chunk,
    knobs,
)

VOCAB = 8
# A fixed next-token distribution, whatever the input: probabilities 0.4, 0.25, 0.15, ...
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))


def fake_logits_fn(params, tokens, positions, memory):
    """Ignores its input: every position gets LOGITS (a model with no memory)."""
    batch, seq = tokens.shape
    new = jnp.zeros((batch, 1, seq, 1))
    return jnp.broadcast_to(LOGITS, (batch, seq, VOCAB)), (LayerCache(new, new),)


def fake_cache(rows: int) -> tuple[LayerCache, ...]:
    return (LayerCache(jnp.zeros((rows, 1, 16, 1)), jnp.zeros((rows, 1, 16, 1))),)


def sample_many(sample: SampleParams, rows: int = 4000, steps: int = 4) -> np.ndarray:
    cache = fake_cache(rows)
    logits = jnp.broadcast_to(LOGITS, (rows, VOCAB))
    state = DecodeState(cache, logits, jnp.int32(0), jnp.int32(0))
    _, tokens = decode_chunk(
        fake_logits_fn, {}, state, jax.random.key(sample.seed), knobs(sample), steps, sample.mode
    )
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
    cache = fake_cache(16)
    state = DecodeState(cache, jnp.broadcast_to(LOGITS, (16, VOCAB)), jnp.int32(0), jnp.int32(0))
    pieces = []
    for steps in (2, 4):
        state, tokens = decode_chunk(
            fake_logits_fn, {}, state, jax.random.key(5), knobs(sample), steps, sample.mode
        )
        pieces.append(np.asarray(tokens))
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), one_chunk)


def test_changing_knob_values_does_not_recompile() -> None:
    sample_many(SampleParams(temperature=0.7, top_p=0.9, top_k=5), rows=8)
    before = decode_chunk._cache_size()
    sample_many(SampleParams(temperature=1.3, top_p=0.5, top_k=2, seed=9), rows=8)
    assert decode_chunk._cache_size() == before


def test_choose_tokens_greedy_per_row() -> None:
    logits = jnp.asarray([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    mode = SampleParams().mode
    assert choose_tokens(logits, jax.random.key(0), knobs(SampleParams()), mode).tolist() == [
        1,
        0,
    ]


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
