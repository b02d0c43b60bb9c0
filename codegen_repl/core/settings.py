"""Settings, resolved in one place: flags over the user's config.toml over the built-in defaults.

"Flags" are what a front end was started with: the command line's options, the kernel's
traitlets (its kernelspec argv), the magics' traitlets (IPython's config, `%codegen_config`).
Each source is an `Overrides` (None: the source does not set it); `resolve(flags, config)` takes
every setting from the first source that sets it, else from the defaults below, which are the
only place a default is written down. `apply_setting` is `/set key=value` on a session.

Nothing here imports JAX or a front-end library.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.errors import ConfigError
from codegen_repl.model.sample_params import SampleParams

if TYPE_CHECKING:
    from codegen_repl.core.session import SessionSettings

RunMode = Literal["ask", "auto", "never"]  # what a front end does with a step's code
RUN_MODES: tuple[RunMode, ...] = get_args(RunMode)
ImageMode = Literal["auto", "kitty", "sixel", "halfcell", "off"]  # how a terminal draws images
IMAGE_MODES: tuple[ImageMode, ...] = get_args(ImageMode)
DType = Literal["float32", "bfloat16", "float16"]  # the weights' dtype
DTYPES: tuple[DType, ...] = get_args(DType)
T = TypeVar("T")

# ----------------------------------------------------------------------------- the defaults

DEFAULT_MODEL = "Salesforce/codegen-350M-mono"
HUB_ID = re.compile(r"^[\w-][\w.-]*/[\w.-]+$")  # owner/name, as the hub spells repository ids
DEFAULT_SAMPLE = SampleParams(max_new_tokens=128, temperature=0.2, top_p=0.95)  # MTPB's
GENERATE_SAMPLE = dataclasses.replace(DEFAULT_SAMPLE, temperature=0.0)  # `generate`: greedy
DEFAULT_PREFIX = MTPB_PREFIX  # the imports MTPB puts before the first turn
DEFAULT_RUN_MODE: RunMode = "ask"  # where no one can answer (a kernel), "ask" means "auto"
DEFAULT_TIMEOUT_S = 60.0  # seconds a turn's code may run before it is interrupted
DEFAULT_THEME = "monokai"
DEFAULT_IMAGES: ImageMode = "auto"

# Every text setting but `prefix`, where "" means no prefix.
_UNSET_IF_EMPTY = ("model", "server", "api_key", "dtype", "run", "theme", "images")
SAMPLE_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")
SET_KEYS = (*SAMPLE_KEYS, "run", "timeout")  # what `/set key=value` changes


@dataclasses.dataclass(frozen=True)
class Overrides:
    """The settings one source sets; None: this source leaves it to the next one.

    Args:
        model: a checkpoint folder or hub id; with a server, the served model to ask for.
        server: a decoder server's URL (then no model is loaded in this process).
        api_key: the decoder server's API key.
        dtype: the weights' dtype (unset everywhere: fp32 on CPU, bf16 on a GPU or TPU).
        run: what a front end does with a step's code (ask, auto, never).
        temperature: a step's sampling temperature (0 = greedy).
        top_p: a step's nucleus mass, in (0, 1].
        max_new_tokens: most tokens per step.
        prefix: text before the first turn ("" for none; for every other text setting, ""
            is the same as None).
        timeout: seconds a turn's code may run; 0 for no limit.
        theme: a pygments style for code in the terminal.
        images: how the terminal draws images.
        context_window: a decoder server's context window in tokens, for servers that do not report
            it (llama.cpp without /props, Ollama without /api/show, ...).

    Raises:
        ConfigError: a value is out of its range; the message lists what is allowed.
    """

    model: str | None = None
    server: str | None = None
    api_key: str | None = None
    dtype: DType | None = None
    run: RunMode | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    prefix: str | None = None
    timeout: float | None = None
    theme: str | None = None
    images: ImageMode | None = None
    context_window: int | None = None

    def __post_init__(self) -> None:
        for key in _UNSET_IF_EMPTY:  # an empty option (`--dtype ""`, a kernelspec's) is unset
            if getattr(self, key) == "":
                object.__setattr__(self, key, None)
        for key, allowed in (("run", RUN_MODES), ("images", IMAGE_MODES), ("dtype", DTYPES)):
            value = getattr(self, key)
            if value is not None and value not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.context_window is not None and self.context_window < 2:
            raise ConfigError(
                f"context_window must be at least 2 tokens, got {self.context_window}"
            )
        if self.timeout is not None and self.timeout < 0:
            raise ConfigError(f"timeout must be >= 0 seconds (0 = no limit), got {self.timeout}")
        if self.theme is not None:
            check_theme(self.theme)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Overrides:
        """The settings among `values` (other keys are ignored), checked."""
        names = {field.name for field in _fields()}
        return cls(**{key: value for key, value in values.items() if key in names})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting, resolved (see `Overrides` for what each means).

    `model` is "" when a server is set and no model is named: the server's model is used.
    `dtype` None: fp32 on CPU, bf16 on a GPU or TPU. `timeout` None: no limit.
    """

    model: str
    server: str | None
    api_key: str | None
    dtype: DType | None
    run: RunMode
    temperature: float
    top_p: float
    max_new_tokens: int
    prefix: str
    timeout: float | None
    theme: str
    images: ImageMode
    context_window: int | None = None

    @property
    def sample(self) -> SampleParams:
        """A step's sampling (the defaults for what no setting names: top_k, seed, ...)."""
        return dataclasses.replace(
            DEFAULT_SAMPLE, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
        )  # fmt: skip


def merge(*sources: Overrides) -> Overrides:
    """One Overrides: each setting from the first source that sets it (flags first)."""
    merged: dict[str, Any] = {}
    for field in _fields():
        values = (getattr(source, field.name) for source in sources)
        merged[field.name] = next((value for value in values if value is not None), None)
    return Overrides(**merged)


def resolve(*sources: Overrides, can_ask: bool = True) -> Settings:
    """Every setting: from the first source that sets it (flags first), else the default.

    Args:
        sources: the front end's flags, then config.toml (`UserConfig.overrides()`), ...
        can_ask: False for a front end where no one answers "run it?" (a kernel): there
            `run = "ask"` (the default, or config.toml's, which the REPL shares) means "auto".
    """
    given = merge(*sources)
    run = given.run or DEFAULT_RUN_MODE
    timeout = DEFAULT_TIMEOUT_S if given.timeout is None else given.timeout
    return Settings(
        model=given.model or ("" if given.server else DEFAULT_MODEL),
        server=given.server,
        api_key=given.api_key,
        dtype=given.dtype,
        run="auto" if run == "ask" and not can_ask else run,
        temperature=_either(given.temperature, DEFAULT_SAMPLE.temperature),
        top_p=_either(given.top_p, DEFAULT_SAMPLE.top_p),
        max_new_tokens=_either(given.max_new_tokens, DEFAULT_SAMPLE.max_new_tokens),
        prefix=_either(given.prefix, DEFAULT_PREFIX),
        timeout=timeout or None,
        theme=given.theme or DEFAULT_THEME,
        images=given.images or DEFAULT_IMAGES,
        context_window=given.context_window,
    )


def check_theme(theme: str) -> None:
    """A ConfigError unless `theme` is a pygments style (pygments is imported only here)."""
    from pygments.styles import get_all_styles

    styles = sorted(get_all_styles())
    if theme not in styles:
        raise ConfigError(
            f"theme {theme!r} is not a pygments style; try one of {', '.join(styles)}"
        )


# ----------------------------------------------------------------------------- /set


def apply_setting(
    settings: SessionSettings, run_mode: str, assignment: str, prefix: str = "/"
) -> tuple[SessionSettings, RunMode]:
    """`key=value` (a `set` command's argument) applied to a session's settings and the front
    end's run mode; a ConfigError says what is allowed (`prefix`: how the front end spells its
    commands)."""
    key, equals, value = (part.strip() for part in assignment.partition("="))
    if not equals or key not in SET_KEYS:
        raise ConfigError(f"use {prefix}set key=value with key one of {', '.join(SET_KEYS)}")
    if key == "run":
        return settings, run_mode_of(value)
    current = run_mode_of(run_mode)
    if key == "timeout":
        timeout = None if value.lower() in ("none", "off", "0") else _number(key, value, float)
        return dataclasses.replace(settings, timeout=timeout), current
    kind = float if key in ("temperature", "top_p") else int
    sample = dataclasses.replace(settings.sample, **{key: _number(key, value, kind)})
    return dataclasses.replace(settings, sample=sample), current


def run_mode_of(value: str) -> RunMode:
    """`value` as a RunMode; a ConfigError lists the modes."""
    for mode in RUN_MODES:
        if value == mode:
            return mode
    raise ConfigError(f"run must be one of {', '.join(RUN_MODES)}, got {value!r}")


def _number(key: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return number


def _either(value: T | None, default: T) -> T:
    return default if value is None else value


def _fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(Overrides)


def check_model(model: str) -> None:
    """A model the kernel or the server can load: a checkpoint folder (with config.json) or a
    hub id (whether the hub has it is known only when it is downloaded).

    Raises:
        ConfigError: neither; the message says what to give instead.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{model} holds no config.json; give the checkpoint's folder")
        return
    if path.exists() or not HUB_ID.match(model):
        raise ConfigError(
            f"{model} is neither a checkpoint folder nor a hub id like "
            "'Salesforce/codegen-350M-mono'; check the path"
        )
