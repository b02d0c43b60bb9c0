"""Where the project keeps its files: the cache, the config and the data folders.

Each has an environment variable that moves it (for tests, and for users with other plans):
CODEGEN_REPL_CACHE, CODEGEN_REPL_CONFIG (the config.toml file itself), CODEGEN_REPL_DATA.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """The project's cache folder (compiled programs, MTPB): $CODEGEN_REPL_CACHE, else
    $XDG_CACHE_HOME/codegen-repl, else ~/.cache/codegen-repl."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("CODEGEN_REPL_CACHE", Path(base) / "codegen-repl"))


def config_path() -> Path:
    """Where config.toml is read from: $CODEGEN_REPL_CONFIG, else the platform's config folder
    (~/.config/codegen-repl/config.toml on Linux)."""
    override = os.environ.get("CODEGEN_REPL_CONFIG")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return platformdirs.user_config_path("codegen-repl") / "config.toml"


def data_dir() -> Path:
    """The project's data folder (the REPL's input history): $CODEGEN_REPL_DATA, else
    $XDG_DATA_HOME/codegen-repl, else ~/.local/share/codegen-repl."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(os.environ.get("CODEGEN_REPL_DATA", Path(base) / "codegen-repl"))
