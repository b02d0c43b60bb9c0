"""config.toml: defaults, every error message, the template, and `codegen-repl config`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from codegen_repl.core.settings import resolve
from codegen_repl.errors import ConfigError
from codegen_repl.userconfig import UserConfig, config_path, template

SCRIPT = Path(sys.executable).with_name("codegen-repl")


def test_a_missing_file_gives_the_defaults(tmp_path: Path) -> None:
    assert UserConfig.load(tmp_path / "absent.toml") == UserConfig()
    assert UserConfig().to_toml() == ""


def test_values_are_read_and_written_back(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('model = "/models/mine"\nrun = "auto"\ntemperature = 0\nprefix = "a\\nb"\n')
    config = UserConfig.load(path)
    assert (config.model, config.run, config.temperature, config.prefix) == (
        "/models/mine", "auto", 0, "a\nb",
    )  # fmt: skip
    assert tomllib.loads(config.to_toml()) == tomllib.loads(path.read_text())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run = 'sometimes'", "run must be one of ask, auto, never; got 'sometimes'"),
        ("images = 'ascii'", "images must be one of auto, kitty, sixel, halfcell, off"),
        ("temperature = -1", "temperature must be >= 0"),
        ("top_p = 2", "top_p must be in (0, 1]"),
        ("max_new_tokens = 'many'", "max_new_tokens must be a int, got 'many'"),
        ("max_new_tokens = true", "max_new_tokens must be a int, got True"),
        ("colour = 'red'", "unknown key 'colour'; the keys are dtype, images, max_new_tokens"),
        ("theme = 'neon'", "theme 'neon' is not a pygments style; try one of"),
        ("model = ", "is not valid TOML"),
    ],
)
def test_bad_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as caught:
        UserConfig.load(path)
    assert str(caught.value).startswith(str(path)) and message in str(caught.value)


def test_the_template_documents_every_key_and_parses_when_uncommented() -> None:
    lines = template().splitlines()[1:]
    uncommented = "\n".join(line.removeprefix("# ") for line in lines)
    values = tomllib.loads(uncommented)
    assert set(values) == {"model", "server", "dtype", "run", "temperature", "top_p",
                           "max_new_tokens", "prefix", "theme", "images"}  # fmt: skip
    UserConfig(**values)  # and every example value is valid
    defaults = resolve()  # and the examples of keys with a default show that default
    for key in ("model", "run", "temperature", "top_p", "max_new_tokens", "prefix", "theme"):
        assert values[key] == getattr(defaults, key), key


def test_the_environment_variable_moves_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CODEGEN_REPL_CONFIG", str(tmp_path / "c.toml"))
    assert config_path() == tmp_path / "c.toml"
    monkeypatch.delenv("CODEGEN_REPL_CONFIG")
    assert config_path().name == "config.toml" and "codegen-repl" in str(config_path())


def run(*args: str, config: Path, **options) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    env = {**os.environ, "CODEGEN_REPL_CONFIG": str(config), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=300, **options)  # fmt: skip


def test_config_commands(tmp_path: Path) -> None:
    config = tmp_path / "settings" / "config.toml"
    assert run("config", "path", config=config).stdout.strip() == str(config)
    assert run("config", "init", config=config).returncode == 0
    assert config.read_text() == template()
    again = run("config", "init", config=config)
    assert again.returncode == 2 and "--force" in again.stderr
    config.write_text("run = 'auto'\n")
    shown = run("config", "show", config=config).stdout
    assert 'run = "auto"  # config.toml' in shown
    assert 'model = "Salesforce/codegen-350M-mono"  # default' in shown
    assert "temperature = 0.2  # default" in shown and "# dtype = (not set)  # default" in shown
    tomllib.loads(shown)  # what it prints is valid TOML
    config.write_text("run = 'often'\n")
    broken = run("config", "show", config=config)
    assert broken.returncode == 2 and "run must be one of" in broken.stderr


def test_chat_takes_its_defaults_from_the_config(tmp_path: Path, chat_checkpoint: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f"model = {str(chat_checkpoint)!r}\nrun = 'never'\nmax_new_tokens = 4\n")
    session = tmp_path / "s.ipynb"
    done = run("chat", "--session", str(session), config=config, cwd=tmp_path,
               input="Say something.\n!print(6 * 7)\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(chat_checkpoint) in done.stdout  # the banner names the configured model
    assert "(not run: run=never" in done.stdout and "42\n" in done.stdout
    overridden = run("chat", "--run", "sometimes", config=config)
    assert overridden.returncode == 2 and "run must be one of" in overridden.stderr
