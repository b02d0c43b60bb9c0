"""MTPB's data: the copy shipped in the package (checked, licensed, usable offline), the
problems' turns and prompts, selection, and `mtpb list/show`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codegen_repl.cli.app import app
from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.errors import ConfigError
from codegen_repl.evals import mtpb
from codegen_repl.evals.mtpb import problems as problems_module

SHIPPED = problems_module.SHIPPED
# Imported first by the CLI's Python below: any attempt to reach the network fails loudly.
NO_NETWORK = """\
import socket

def _refuse(*args, **kwargs):
    raise OSError("the network is off in this test")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


@pytest.fixture(scope="module")
def problems() -> list[mtpb.Problem]:
    return mtpb.load_problems()


# ----------------------------------------------------------------------------- the shipped copy


def test_the_shipped_copy_is_the_pinned_one_with_its_license() -> None:
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == mtpb.SHA256
    license_text = (SHIPPED.parent / "LICENSE-mtpb").read_text()
    assert license_text.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2022, Salesforce.com, Inc." in license_text


def test_a_damaged_shipped_copy_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    damaged = tmp_path / "mtpb.jsonl"
    damaged.write_bytes(SHIPPED.read_bytes().replace(b"Sandwich", b"Sandwick"))
    monkeypatch.setattr(problems_module, "SHIPPED", damaged)
    with pytest.raises(ConfigError, match=r"has sha256 \w+, expected 3ab79ddb.*reinstall"):
        mtpb.load_problems()
    monkeypatch.setattr(problems_module, "SHIPPED", tmp_path / "gone.jsonl")
    with pytest.raises(ConfigError, match=r"cannot be read .*--problems PATH"):
        mtpb.load_problems()


def test_another_copy_by_path_is_read_as_it_is(tmp_path: Path) -> None:
    """Only the shipped copy is checked: --problems PATH may name an edited benchmark."""
    edited = tmp_path / "mine.jsonl"
    edited.write_bytes(SHIPPED.read_bytes().replace(b"Sandwich", b"Sandwick"))
    assert mtpb.load_problems(edited)[0].name == "Sandwick string"


def test_list_and_show_work_offline_from_a_fresh_home(tmp_path: Path) -> None:
    """A new machine without network: no cache, HF_HUB_OFFLINE=1, every connection refused."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.getcwd()]))  # fmt: skip
    command = [sys.executable, "-c", "from codegen_repl.cli.app import app; app()", "mtpb"]
    listed = subprocess.run([*command, "list"], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "Sandwich string" in listed.stdout and "115" in listed.stdout
    shown = subprocess.run([*command, "show", "4", "--input", "4"], env=env, timeout=120,
                           capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "Print out the square of 10-th Fibonacci number." in shown.stdout
    connect = "import socket; socket.create_connection(('127.0.0.1', 9))"
    probe = subprocess.run([sys.executable, "-c", connect], env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert "the network is off in this test" in probe.stderr  # the guard is really in place


def test_the_115_problems(problems: list[mtpb.Problem]) -> None:
    assert len(problems) == 115 and problems[0].id == "1" and problems[-1].id == "115"
    assert {p.category for p in problems} >= {"string", "math", "array", "data science"}
    assert all(len(p.inputs) == 5 and len(p.outputs) >= 5 for p in problems)  # 57 has 6 outputs
    assert {p.max_gen_length for p in problems} == {128, 256, 512}  # absent -> 256


def test_turns_are_filled_from_the_input(problems: list[mtpb.Problem]) -> None:
    invert = mtpb.find_problem(problems, 11)
    turns = invert.turns(1)
    assert (
        turns[0] == 'Assign the keys ["a", "b"] and values [1, 2] to a dictionary named "my_dict".'
    )
    assert 'invert({ "z": "q", "w": "f" })' in turns[1]  # {{ }} in templates are literal braces
    assert "initialize it with inverted" in turns[3]
    with pytest.raises(ConfigError, match=r"test inputs 0\.\.4, not 5"):
        invert.turns(5)
    program = invert.program(0, ["a = 1", "b = 2"])
    assert program == mtpb.PREFIX + f"# {turns[0]}\na = 1\n\n# {invert.turns(0)[1]}\nb = 2\n\n"


def test_prompts_are_the_papers_format_built_by_build_context(
    problems: list[mtpb.Problem],
) -> None:
    """`# {prompt}\\n` exactly, as the reference sampler writes it: problem 17's prompt carries
    its own `# ` on continuation lines, 58's ends in a space; both stay as they are."""
    for problem in problems:
        for index in range(len(problem.inputs)):
            turns = problem.turns(index)
            codes = [f"x{k} = {k}" for k in range(len(turns) - 1)]
            pairs = zip(turns[:-1], codes, strict=True)
            expected = MTPB_PREFIX + "".join(f"# {t}\n{c}\n\n" for t, c in pairs)
            assert problem.prompt(index, codes) == expected + f"# {turns[-1]}\n"
            assert problem.program(index, codes) == expected
    seventeen = mtpb.find_problem(problems, 17).prompt(0, [])
    assert "odd: \n# str(4) = 4\n# str(" in seventeen and "# # " not in seventeen
    assert mtpb.find_problem(problems, 58).prompt(0, ["a"]).endswith("square_root. \n")


def test_selection(problems: list[mtpb.Problem]) -> None:
    assert [p.id for p in mtpb.select(problems, "1-3,42")] == ["1", "2", "3", "42"]
    with pytest.raises(ConfigError, match="unknown MTPB problems"):
        mtpb.select(problems, "116")
    with pytest.raises(ConfigError, match="ids and ranges like 1-10,42"):
        mtpb.select(problems, "one")


def test_cli_list_and_show(tmp_path: Path) -> None:
    listed = CliRunner().invoke(app, ["mtpb", "list"])
    assert listed.exit_code == 0, listed.output
    assert "Sandwich string" in listed.output and "max_gen_length" in listed.output
    edited = tmp_path / "mine.jsonl"
    edited.write_bytes(SHIPPED.read_bytes().replace(b"Sandwich", b"Sandwick"))
    mine = CliRunner().invoke(app, ["mtpb", "list", "--problems", str(edited)])
    assert mine.exit_code == 0 and "Sandwick string" in mine.output, mine.output
    shown = CliRunner().invoke(app, ["mtpb", "show", "4", "--input", "4"])
    assert "Print out the square of 10-th Fibonacci number." in shown.output
    bad = CliRunner().invoke(app, ["mtpb", "show", "999"])
    assert bad.exit_code == 2 and "no MTPB problem 999" in bad.output


def test_the_wheel_carries_the_data_and_its_license(tmp_path: Path) -> None:
    """package-data is easy to lose: build the real wheel and look inside."""
    root = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"
    for name in ("codegen_repl", "model", "kernel", "train"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(source), "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read("codegen_repl/evals/mtpb/data/mtpb.jsonl")
        license_text = archive.read("codegen_repl/evals/mtpb/data/LICENSE-mtpb").decode()
    assert hashlib.sha256(data).hexdigest() == mtpb.SHA256
    assert license_text.startswith("BSD 3-Clause License")
