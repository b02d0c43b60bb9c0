"""The one settings resolver: flags over config.toml over the defaults, and `/set key=value`."""

from __future__ import annotations

import pytest

from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.core.session import SessionSettings
from codegen_repl.core.settings import (
    DEFAULT_MODEL,
    DEFAULT_SAMPLE,
    DEFAULT_TIMEOUT_S,
    Overrides,
    apply_setting,
    merge,
    resolve,
)
from codegen_repl.errors import ConfigError
from codegen_repl.userconfig import UserConfig


def test_nothing_set_gives_the_defaults_the_session_also_starts_from() -> None:
    settings = resolve()
    assert (settings.model, settings.server, settings.dtype, settings.run) == (
        DEFAULT_MODEL, None, None, "ask",
    )  # fmt: skip
    assert settings.sample == DEFAULT_SAMPLE == SessionSettings().sample
    assert settings.prefix == MTPB_PREFIX == SessionSettings().prefix
    assert settings.timeout == DEFAULT_TIMEOUT_S == SessionSettings().timeout
    assert (settings.theme, settings.images) == ("monokai", "auto")


def test_each_setting_comes_from_the_first_source_that_sets_it() -> None:
    flags = Overrides(temperature=0.0, run="never")
    config = UserConfig(model="/models/mine", temperature=0.7, top_p=0.5, run="auto")
    settings = resolve(flags, config.overrides())
    assert (settings.model, settings.run) == ("/models/mine", "never")
    assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.0, 0.5, 128)
    assert merge(flags, config.overrides()).max_new_tokens is None  # neither sets it


def test_a_server_without_a_model_asks_for_the_served_one() -> None:
    assert resolve(Overrides(server="http://127.0.0.1:8000")).model == ""
    assert resolve(Overrides(server="http://h:1", model="m")).model == "m"


def test_where_no_one_can_answer_ask_means_auto() -> None:
    assert resolve(can_ask=False).run == "auto"
    assert resolve(UserConfig(run="ask").overrides(), can_ask=False).run == "auto"
    assert resolve(Overrides(run="never"), can_ask=False).run == "never"


def test_empty_text_is_unset_except_for_the_prefix_where_it_means_none() -> None:
    given = Overrides.of({"model": "", "server": "", "dtype": "", "prefix": "", "other": 1})
    assert (given.model, given.server, given.dtype, given.prefix) == (None, None, None, "")
    assert resolve(given).prefix == "" and resolve(given).model == DEFAULT_MODEL


def test_a_zero_timeout_means_no_limit() -> None:
    assert resolve(Overrides(timeout=0)).timeout is None
    assert resolve(Overrides(timeout=5)).timeout == 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"run": "sometimes"}, "run must be one of ask, auto, never; got 'sometimes'"),
        ({"dtype": "int4"}, "dtype must be one of float32, bfloat16, float16; got 'int4'"),
        ({"images": "ascii"}, "images must be one of auto, kitty, sixel, halfcell, off"),
        ({"temperature": -1}, "temperature must be >= 0 (0 = greedy)"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"timeout": -1}, "timeout must be >= 0 seconds (0 = no limit)"),
        ({"theme": "neon"}, "theme 'neon' is not a pygments style; try one of"),
    ],
)
def test_bad_values_say_what_is_allowed(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Overrides.of(values)
    assert message in str(caught.value)


def test_set_changes_one_setting_and_says_what_is_allowed() -> None:
    settings = SessionSettings()
    changed, mode = apply_setting(settings, "ask", "temperature = 0.5")
    assert (changed.sample.temperature, changed.sample.top_p, mode) == (0.5, 0.95, "ask")
    assert apply_setting(settings, "ask", "run=never") == (settings, "never")
    assert apply_setting(settings, "auto", "timeout=off")[0].timeout is None
    assert apply_setting(settings, "auto", "top_k=40")[0].sample.top_k == 40
    with pytest.raises(ConfigError, match="use %set key=value with key one of temperature"):
        apply_setting(settings, "ask", "colour=red", prefix="%")
    with pytest.raises(ConfigError, match="run must be one of ask, auto, never, got 'often'"):
        apply_setting(settings, "ask", "run=often")
    with pytest.raises(ConfigError, match="max_new_tokens must be a int, got 'many'"):
        apply_setting(settings, "ask", "max_new_tokens=many")
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        apply_setting(settings, "ask", "top_p=2")


@pytest.mark.parametrize("assignment", ["timeout=nan", "timeout=inf", "temperature=nan"])
def test_set_refuses_numbers_that_are_not_finite(assignment: str) -> None:
    with pytest.raises(ConfigError, match=r"must be a finite number"):
        apply_setting(SessionSettings(), "ask", assignment)


@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999])
def test_a_seed_outside_what_a_jax_key_takes_is_refused(seed: int) -> None:
    from codegen_repl.model.sample_params import SampleParams

    with pytest.raises(ConfigError, match=r"seed must be in \[0, 9223372036854775807\]"):
        SampleParams(seed=seed)
    assert SampleParams(seed=2**32 - 1).seed == 2**32 - 1  # a crc32, as MTPB sampling uses
