"""`codegen-repl generate`, run as a user runs it: the installed console script, a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

SCRIPT = Path(sys.executable).with_name("codegen-repl")
PROMPT = "def fibonacci(n):\n    "


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


def test_generate_prints_what_transformers_greedy_decodes(chat_checkpoint: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_checkpoint)
    model = transformers.CodeGenForCausalLM.from_pretrained(chat_checkpoint).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in out:  # we print the completion up to, not including, EOS
        out = out[: out.index(tokenizer.eos_token_id)]
    expected = tokenizer.decode(out)
    assert expected.strip(), "the reference completion is empty; pick another seed"

    args = ["generate", "--model", str(chat_checkpoint), "--max-new-tokens", "24", PROMPT]
    for extra in ([], ["--stream"]):
        result = run_cli(*args, *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected


def test_sampling_is_seeded(chat_checkpoint: Path) -> None:
    args = ["generate", "--model", str(chat_checkpoint), "--max-new-tokens", "16"]
    first = run_cli(*args, "--temperature", "0.8", "--seed", "3", PROMPT)
    again = run_cli(*args, "--temperature", "0.8", "--seed", "3", PROMPT)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    result = run_cli("generate", "--model", str(tmp_path / "nothing"), "x")
    assert result.returncode == 2
    assert "neither a folder nor a hub id" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_offline_hub_id_without_cache_says_how_to_proceed(tmp_path: Path) -> None:
    result = run_cli(
        "generate", "--cache-dir", str(tmp_path), "x", env={"HF_HUB_OFFLINE": "1"}
    )  # default model: Salesforce/codegen-350M-mono
    assert result.returncode == 2
    assert "Salesforce/codegen-350M-mono is not in the local HF cache" in result.stderr
    assert "--model PATH" in result.stderr and "Traceback" not in result.stderr


def test_bad_option_value(chat_checkpoint: Path) -> None:
    result = run_cli("generate", "--model", str(chat_checkpoint), "--top-p", "1.5", "x")
    assert result.returncode == 2
    assert "top_p must be in (0, 1]" in result.stderr


def test_n_samples_with_int8_weights(chat_checkpoint: Path) -> None:
    args = ["--model", str(chat_checkpoint), "--max-new-tokens", "8", "--temperature", "0.8"]
    result = run_cli("generate", *args, "-n", "3", "--int8", "--top-k", "40", PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n<|sample-end|>\n") == 3


# ----------------------------------------------------------------------------- the bare command


def chat_options() -> list[list[str]]:
    """Each option of `codegen-repl chat`, with a value where it takes one."""
    import typer.main

    from codegen_repl.cli.app import app

    chat = typer.main.get_command(app).commands["chat"]  # type: ignore[attr-defined]
    options = [param for param in chat.params if param.opts[0].startswith("--")]
    assert len(options) >= 12
    return [[o.opts[0]] if o.is_flag else [o.opts[0], "1"] for o in options]


@pytest.mark.parametrize("option", chat_options(), ids=lambda option: option[0])
def test_the_bare_command_takes_every_chat_option(option: list[str]) -> None:
    from typer.testing import CliRunner

    from codegen_repl.cli.app import app

    result = CliRunner().invoke(app, [*option, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage: codegen-repl chat [OPTIONS]" in result.output


def test_the_bare_command_runs_the_chat(tmp_path: Path, chat_checkpoint: Path) -> None:
    session = tmp_path / "s.ipynb"
    env = {"CODEGEN_REPL_CONFIG": str(tmp_path / "absent.toml")}
    args = ["--model", str(chat_checkpoint), "--yes", "--session", str(session)]
    done = subprocess.run(
        [str(SCRIPT), *args, "--max-new-tokens", "4"], input="!print(6 * 7)\n",
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(chat_checkpoint) in done.stdout and "42\n" in done.stdout
    assert session.is_file()
    wrong = run_cli("--run", "sometimes", env=env)
    assert wrong.returncode == 2 and "run must be one of ask, auto, never" in wrong.stderr
    both = run_cli("--yes", "--run", "never", env=env)  # one wins silently: refused instead
    assert both.returncode == 2 and "conflicts with --run never" in both.stderr
    typo = run_cli("generat", env=env)
    assert typo.returncode == 2 and "No such command 'generat'" in typo.stderr


@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_generate_ends_its_line_on_a_terminal(chat_checkpoint: Path) -> None:
    pexpect = pytest.importorskip("pexpect", reason="pexpect is in the test extra")
    args = ["generate", "--model", str(chat_checkpoint), "--max-new-tokens", "5", PROMPT]
    piped = run_cli(*args)
    assert piped.returncode == 0 and not piped.stdout.endswith("\n"), "pick another length"
    child = pexpect.spawn(str(SCRIPT), args, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          encoding="utf-8", timeout=300)  # fmt: skip
    child.expect(pexpect.EOF)
    assert child.before == piped.stdout.replace("\n", "\r\n") + "\r\n"  # a pty writes \r\n


@pytest.mark.parametrize("model", ["/no/such/model", "not a hub id"])
def test_serve_checks_the_model_before_it_starts(model: str) -> None:
    from typer.testing import CliRunner

    from codegen_repl.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--model", model, "--port", "1"])
    assert result.exit_code == 2, result.output
    assert "is neither a checkpoint folder nor a hub id" in result.output
    assert "serving" not in result.output  # nothing started


def test_version_as_an_option_and_as_a_module() -> None:
    from typer.testing import CliRunner

    from codegen_repl import __version__
    from codegen_repl.cli.app import app

    assert __version__ in CliRunner().invoke(app, ["--version"]).output
    module = subprocess.run([sys.executable, "-m", "codegen_repl", "--version"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert module.returncode == 0 and __version__ in module.stdout, module.stderr
