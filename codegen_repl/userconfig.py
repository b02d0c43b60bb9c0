"""The user's `config.toml`: defaults for the REPL and the kernel; command-line options win.

It lives in the platform's config folder (`codegen-repl config path` prints it; the environment
variable CODEGEN_REPL_CONFIG points elsewhere). Every key is optional:

    model = "Salesforce/codegen-350M-mono"   # a checkpoint folder or a hub id (the default)
    server = "http://127.0.0.1:8000"         # use a decoder server instead of a local model
    dtype = "bfloat16"                       # float32 | bfloat16 | float16 (default: auto)
    run = "ask"                              # ask | auto | never
    temperature = 0.2
    top_p = 0.95
    max_new_tokens = 128
    prefix = "# Import libraries.\\n\\nimport numpy as np\\n\\n"
    theme = "monokai"                        # a pygments style for code
    images = "auto"                          # auto | kitty | sixel | halfcell | off
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from codegen_repl.errors import ConfigError

DEFAULT_MODEL = "Salesforce/codegen-350M-mono"
RUN_MODES = ("ask", "auto", "never")
IMAGE_MODES = ("auto", "kitty", "sixel", "halfcell", "off")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """The settings a user may keep in config.toml (None: the built-in default applies)."""

    model: str | None = None  # None: DEFAULT_MODEL, or with a server the model it serves
    server: str | None = None
    dtype: str | None = None
    run: str = "ask"
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    prefix: str | None = None
    theme: str = "monokai"
    images: str = "auto"

    def __post_init__(self) -> None:
        choices = {"run": RUN_MODES, "images": IMAGE_MODES, "dtype": (*DTYPES, None)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                shown = ", ".join(str(value) for value in allowed if value is not None)
                raise ConfigError(f"{key} must be one of {shown}; got {getattr(self, key)!r}")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check_theme(self.theme)

    @classmethod
    def load(cls, path: Path | None = None) -> UserConfig:
        """Read config.toml (the defaults when the file does not exist)."""
        path = path or config_path()
        if not path.is_file():
            return cls()
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path} is not valid TOML ({error}); fix or delete it") from None
        try:
            return cls(**_checked(values))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_toml(self) -> str:
        """The settings that differ from the defaults, as config.toml text."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value != field.default:
                lines.append(f"{field.name} = {_toml_value(value)}")
        return "\n".join(lines) + ("\n" if lines else "")


def template() -> str:
    """A config.toml with every key, commented out, as the module docstring lists them."""
    doc = __doc__ or ""
    keys = [line.strip() for line in doc.splitlines() if line.startswith("    ") and "=" in line]
    header = "# codegen-repl settings; uncomment a line to change it. Command-line options win.\n"
    return header + "".join(f"# {line}\n" for line in keys)


def default_cache_dir() -> Path:
    """The project's cache folder (compiled programs, MTPB): $CODEGEN_REPL_CACHE, else
    $XDG_CACHE_HOME/codegen-repl, else ~/.cache/codegen-repl."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("CODEGEN_REPL_CACHE", Path(base) / "codegen-repl"))


def config_path() -> Path:
    """Where config.toml is read from."""
    override = os.environ.get("CODEGEN_REPL_CONFIG")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return platformdirs.user_config_path("codegen-repl") / "config.toml"


def _checked(values: dict[str, Any]) -> dict[str, Any]:
    """Known keys with values of the right type."""
    types: dict[str, tuple[type, ...]] = {
        "temperature": (int, float), "top_p": (int, float), "max_new_tokens": (int,),
    }  # fmt: skip
    known = {field.name for field in dataclasses.fields(UserConfig)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(sorted(known))}")
        wanted = types.get(key, (str,))
        if not isinstance(value, wanted) or isinstance(value, bool):
            kind = " or ".join(t.__name__ for t in wanted)
            raise ConfigError(f"{key} must be a {kind}, got {value!r}")
    return values


def _check_theme(theme: str) -> None:
    from pygments.styles import get_all_styles

    styles = sorted(get_all_styles())
    if theme not in styles:
        raise ConfigError(
            f"theme {theme!r} is not a pygments style; try one of {', '.join(styles)}"
        )


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return repr(value)
