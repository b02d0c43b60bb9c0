"""/help in the terminal at common widths: each command whole on its row, descriptions wrapped in
their own column."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.frontend import HELP_STEPS, help_rows
from codegen_repl.core.session import Session
from codegen_repl.repl.loop import Repl
from tests.core.test_session import ScriptedDecoder


@pytest.mark.parametrize("width", [80, 120])
def test_help_keeps_each_command_whole_at_any_width(tmp_path: Path, width: int) -> None:
    out = io.StringIO()
    session = Session(ScriptedDecoder(), Executor(ExecutorConfig(cwd=tmp_path)))
    repl = Repl(session, Console(file=out, width=width, force_terminal=False))
    repl.handle("/help")
    lines = out.getvalue().splitlines()
    assert lines[0] == "commands:" and lines[-1] == f"  {HELP_STEPS}"
    assert all(len(line) <= width for line in lines)
    heads = [head for head, _ in help_rows("/")]
    rows = lines[1:-1]
    column = rows[0].index("show this help")  # where every description starts
    for head in heads:  # typed as shown: never broken, never stripped of `[key=value]`
        assert any(line.startswith(f"  {head} ") for line in rows), head
    for line in rows:  # a command's row, or the rest of its description in the same column
        assert line[:column].strip() in ("", *heads), line
        assert line[column : column + 1] != " ", line
