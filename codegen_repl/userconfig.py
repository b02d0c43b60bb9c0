"""The user's `config.toml`: defaults for the REPL and the kernel; command-line options win.

It lives in the platform's config folder (`codegen-repl config path` prints it; the environment
variable CODEGEN_REPL_CONFIG points elsewhere). Every key is optional; what is not set takes the
built-in default (codegen_repl.core.settings, where the precedence is resolved):

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
import tomllib
from pathlib import Path
from typing import Any

from codegen_repl.core.settings import DEFAULT_MODEL, DType, ImageMode, Overrides, RunMode
from codegen_repl.errors import ConfigError
from codegen_repl.paths import config_path, default_cache_dir

__all__ = ["DEFAULT_MODEL", "UserConfig", "config_path", "default_cache_dir", "template"]


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """The settings a user may keep in config.toml (None: not set, the default applies).

    Raises:
        ConfigError: a value is out of range (the message lists what is allowed).
    """

    model: str | None = None  # with a server: the served model to ask for
    server: str | None = None
    dtype: DType | None = None
    run: RunMode | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    prefix: str | None = None
    theme: str | None = None
    images: ImageMode | None = None

    def __post_init__(self) -> None:
        self.overrides()  # the checks every source of settings gets

    def overrides(self) -> Overrides:
        """These settings as one source of codegen_repl.core.settings.resolve."""
        return Overrides(**dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path | None = None) -> UserConfig:
        """Read config.toml (nothing set when the file does not exist)."""
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
        """The settings that are set, as config.toml text."""
        lines = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                lines.append(f"{field.name} = {toml_value(value)}")
        return "\n".join(lines) + ("\n" if lines else "")


def template() -> str:
    """A config.toml with every key, commented out, as the module docstring lists them."""
    doc = __doc__ or ""
    keys = [line.strip() for line in doc.splitlines() if line.startswith("    ") and "=" in line]
    header = "# codegen-repl settings; uncomment a line to change it. Command-line options win.\n"
    return header + "".join(f"# {line}\n" for line in keys)


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


def toml_value(value: object) -> str:
    """`value` written as a TOML value (a basic string, a number, a bool)."""
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
