"""SampleParams at the numeric edges: the rule (model/sample_params.py) and what it gives,
against greedy and unrestricted sampling, with a tiny checkpoint in fp32, bf16 and fp16, in
this process and through the decoder server."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import jax
import ml_dtypes
import numpy as np
import pytest

from codegen_repl.errors import ConfigError
from codegen_repl.model.sample_params import (
    GREEDY_BELOW,
    MAX_TEMPERATURE,
    TOP_K_OFF,
    SampleParams,
)
from tests.conftest import decoded_ids, local_decoder
from tests.serve import test_app
from tests.serve.test_app import AUTH

# Down to the smallest positive float of each dtype (and Python's), and just under the epsilon.
TINY_TEMPERATURES = [
    5e-324,
    float(np.finfo(np.float32).smallest_subnormal),
    float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal),
    float(np.finfo(np.float16).smallest_subnormal),
    1e-30,
    GREEDY_BELOW * 0.999,
    -0.0,
]
PROMPT = "def fibonacci(n):\n"


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_a_temperature_below_the_epsilon_is_greedy(temperature: float) -> None:
    sample = SampleParams(temperature=temperature, top_p=0.9, top_k=5)
    assert sample.temperature == 0.0 and not math.copysign(1, sample.temperature) < 0
    assert sample.greedy and sample.mode.greedy
    assert (sample.top_p, sample.top_k) == (0.9, 5)  # kept for a later change of temperature


def test_the_epsilon_itself_samples() -> None:
    assert SampleParams(temperature=GREEDY_BELOW).temperature == GREEDY_BELOW
    assert not SampleParams(temperature=GREEDY_BELOW).greedy


@pytest.mark.parametrize(
    ("temperature", "allowed"),
    [(math.nan, r"in \[0, 2.0\] \(0 = greedy"), (math.inf, r"in \[0, 2.0\]"),
     (MAX_TEMPERATURE * (1 + 1e-9), r"in \[0, 2.0\]"), (1e308, r"in \[0, 2.0\]"),
     (-math.inf, r">= 0 \(0 = greedy\)"), (-1e-300, r">= 0 \(0 = greedy\)")],
)  # fmt: skip
def test_temperatures_out_of_range_say_what_is_allowed(temperature: float, allowed: str) -> None:
    with pytest.raises(ConfigError, match=f"temperature must be {allowed}"):
        SampleParams(temperature=temperature)


@pytest.mark.parametrize("top_p", [5e-324, 1e-45, 1e-300, GREEDY_BELOW / 2])
def test_a_tiny_top_p_is_raised_to_the_epsilon(top_p: float) -> None:
    sample = SampleParams(temperature=1.0, top_p=top_p)
    assert sample.top_p == GREEDY_BELOW and np.float32(sample.top_p) > 0
    assert sample.mode.top_p


@pytest.mark.parametrize("top_p", [math.nan, 0.0, -0.0, 1.0000001, math.inf])
def test_top_p_out_of_range(top_p: float) -> None:
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        SampleParams(top_p=top_p)


def test_top_k_above_any_vocabulary_is_off() -> None:
    assert SampleParams(top_k=TOP_K_OFF).top_k == 0
    assert SampleParams(top_k=10**12).top_k == 0  # would not fit an int32 knob
    assert not SampleParams(top_k=10**12).mode.top_k
    assert SampleParams(top_k=600).for_vocab(600).top_k == 0
    assert SampleParams(top_k=599).for_vocab(600).top_k == 599
    assert not SampleParams(top_p=1.0).mode.top_p


# ----------------------------------------------------------------------------- in this process


ON_CPU = jax.default_backend() == "cpu"
FP16 = pytest.param("float16", marks=[pytest.mark.gpu, pytest.mark.skipif(
    ON_CPU, reason="XLA on CPU has no fp16 matmul (dot_general F16_F16_F32)")])  # fmt: skip


@pytest.fixture(scope="module", params=["float32", "bfloat16", FP16])
def decoder(request: pytest.FixtureRequest, chat_checkpoint: Path):
    return local_decoder(chat_checkpoint, chat_checkpoint, dtype=request.param)


def test_tiny_temperatures_and_top_p_decode_as_greedy(decoder) -> None:
    greedy = decoder.complete(PROMPT, SampleParams(12))
    for temperature in [*TINY_TEMPERATURES, GREEDY_BELOW]:
        sample = SampleParams(12, temperature=temperature, seed=3)
        assert decoder.complete(PROMPT, sample) == greedy, temperature
    for top_p in (5e-324, 1e-300, GREEDY_BELOW):
        sample = SampleParams(12, temperature=MAX_TEMPERATURE, top_p=top_p, seed=3, n=2)
        assert decoder.complete(PROMPT, sample) == greedy * 2, top_p


def test_top_k_at_and_above_the_vocabulary_is_unrestricted(decoder) -> None:
    ids = decoder.tokenizer.encode(PROMPT)
    vocab = decoder.config.vocab_size
    plain = SampleParams(12, temperature=1.0, seed=5, n=3)
    unrestricted = decoded_ids(decoder, ids, plain)
    for top_k in (vocab, vocab + 1, 10**6, TOP_K_OFF):
        sample = SampleParams(12, temperature=1.0, top_k=top_k, seed=5, n=3)
        assert decoded_ids(decoder, ids, sample) == unrestricted, top_k
    assert decoded_ids(decoder, ids, SampleParams(12, 1.0, top_p=1.0, seed=5, n=3)) == unrestricted


def test_the_largest_temperature_samples_valid_tokens(decoder) -> None:
    ids = decoder.tokenizer.encode(PROMPT)
    rows = decoded_ids(decoder, ids, SampleParams(24, MAX_TEMPERATURE, seed=1, n=8))
    tokens = np.asarray(rows)
    assert tokens.shape == (8, 24) and tokens.min() >= 0
    assert tokens.max() < decoder.config.vocab_size
    assert len({tuple(row) for row in rows}) == 8  # flat, not stuck on one token
    assert len(set(tokens.ravel().tolist())) > 24


# ----------------------------------------------------------------------------- through the server

# The server of tests/serve/test_app.py (pytest finds fixtures by module-level name).
server_checkpoint, local = test_app.server_checkpoint, test_app.local
server = test_app.server


def ask(url: str, **body: object) -> httpx.Response:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, **body}
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=120)


def texts(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return [choice["text"] for choice in choices]


def test_the_server_applies_the_same_rule(server: str, local) -> None:
    greedy = local.complete(PROMPT, SampleParams(12))
    for temperature in (5e-324, 1e-45, 6e-8, GREEDY_BELOW * 0.999):
        assert texts(ask(server, temperature=temperature, seed=3)) == greedy, temperature
    assert texts(ask(server, temperature=2.0, top_p=1e-300, seed=3, n=2)) == greedy * 2
    vocab = local.config.vocab_size
    above = SampleParams(12, temperature=1.0, top_k=vocab + 100, seed=5)
    assert texts(ask(server, temperature=1.0, top_k=vocab, seed=5)) == local.complete(PROMPT, above)
    for top_k in (vocab + 100, TOP_K_OFF):  # above the vocabulary: off there too, not a 400
        assert texts(ask(server, temperature=1.0, top_k=top_k, seed=5)) == local.complete(
            PROMPT, above
        )
    hottest = SampleParams(12, temperature=MAX_TEMPERATURE, seed=9, n=3)
    assert texts(ask(server, temperature=2.0, seed=9, n=3)) == local.complete(PROMPT, hottest)
    refused = ask(server, temperature=2.0001)
    assert refused.status_code == 400 and "temperature" in refused.json()["error"]["message"]


def test_n_at_the_servers_limit(server: str, local) -> None:
    limit = httpx.get(f"{server}/health", timeout=10).json()["slots"]["total"]
    sample = SampleParams(12, temperature=1.0, seed=4, n=limit)
    assert texts(ask(server, temperature=1.0, seed=4, n=limit)) == local.complete(PROMPT, sample)
    over = ask(server, n=limit + 1)
    assert over.status_code == 400 and f"n must be in 1..{limit}" in over.json()["error"]["message"]
