"""`codegen-repl ... --help` at common terminal widths: prose paragraphs filled to the width (not
broken where the docstring's source lines end), every option's help shown whole."""

from __future__ import annotations

import inspect
import itertools

import pytest
import typer.main
from typer.testing import CliRunner

from codegen_repl.cli.app import app


def commands() -> list[list[str]]:
    """Every command's words (`["mtpb", "replay"]`), groups included."""
    found, todo = [], [([], typer.main.get_command(app))]
    while todo:
        words, command = todo.pop()
        found.append(words)
        for name, sub in getattr(command, "commands", {}).items():
            todo.append(([*words, name], sub))
    return found


def prose(output: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first box, as their rendered lines."""
    lines = output.splitlines()
    start = next(at for at, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    end = next((at for at, line in enumerate(lines) if line.startswith("╭")), len(lines))
    paragraphs: list[list[str]] = [[]]
    for line in lines[start:end]:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    return [paragraph for paragraph in paragraphs if paragraph]


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("words", commands(), ids=lambda words: " ".join(words) or "app")
def test_help_fills_its_lines(words: list[str], width: int) -> None:
    result = CliRunner().invoke(app, [*words, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    assert all(len(line) <= width for line in result.output.splitlines())
    for paragraph in prose(result.output):
        for line, following in itertools.pairwise(paragraph):
            # a line ends only where the next word would not fit (one space of margin each side)
            assert len(line) + 1 + len(following.split()[0]) > width - 2, (line, following)


@pytest.mark.parametrize("width", [80, 120])
def test_generate_help_shows_each_option_whole(width: int) -> None:
    result = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": str(width)})
    flat = " ".join(result.output.replace("│", " ").split())  # the table's cells, unwrapped
    generate = typer.main.get_command(app).commands["generate"]  # type: ignore[attr-defined]
    for param in generate.params:
        assert param.opts[0] in flat
        assert " ".join(inspect.cleandoc(param.help or "").split()) in flat, param.help
