"""Cell parsing, position maps, magic completion and `%%codegen` options: pure functions."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from codegen_repl.errors import ConfigError
from codegen_repl.kernel.cells import Magic, magic_completions, parse_cell
from codegen_repl.kernel.magics import NotebookHistory, StepOptions, parse_options


def test_a_cell_of_text_is_one_step_whatever_its_lines() -> None:
    cell = parse_cell("\n  Load the data.\nThen print its length.  \n")
    assert (cell.kind, cell.step) == ("step", "Load the data.\nThen print its length.")
    assert parse_cell(" \n\n").kind == "empty"


def test_python_header_cells_are_code_and_positions_map_back() -> None:
    source = "%%python\nimport os\nos.getc"
    cell = parse_cell(source)
    assert cell.kind == "code" and cell.code == "import os\nos.getc"
    view = cell.view
    assert view is not None
    assert view.to_code(len(source)) == len(cell.code)
    assert view.to_cell(cell.code.index("getc")) == source.index("getc")
    assert view.to_code(0) == 0  # a cursor on the header line maps to the code's start


def test_bang_lines_are_code_with_the_marks_removed() -> None:
    source = "!def f(x):\n!    return x + 1\n  !f(2)"
    cell = parse_cell(source)
    assert cell.code == "def f(x):\n    return x + 1\nf(2)"
    view = cell.view
    assert view is not None
    for word in ("def", "return", "f(2)"):
        assert view.to_cell(cell.code.index(word)) == source.index(word)
        assert view.to_code(source.index(word)) == cell.code.index(word)
    assert view.to_cell(len(cell.code)) == len(source)


def test_magic_lines_in_order_and_unknown_ones_named() -> None:
    cell = parse_cell("%set temperature=0\n%SET top_p=0.9\n%undo")
    assert cell.magics == (
        Magic("set", "temperature=0"),
        Magic("set", "top_p=0.9"),
        Magic("undo", ""),
    )
    with pytest.raises(
        ConfigError, match=r"unknown command %frobnicate; the commands are: .*%undo"
    ):
        parse_cell("%frobnicate now")


@pytest.mark.parametrize("source", ["Print x.\n!print(x)", "%undo\nthen print x", "!x=1\n%undo"])
def test_mixed_cells_are_refused_with_how_to_split_them(source: str) -> None:
    with pytest.raises(ConfigError, match="own cell"):
        parse_cell(source)


def test_magic_names_complete_at_the_start_of_a_line() -> None:
    assert magic_completions("%un", 3) == (["%undo"], 0)
    assert magic_completions("x\n  %s", 6) == (["%set", "%save"], 4)
    assert magic_completions("%%py", 4) == (["%%python"], 0)
    assert magic_completions("%set te", 7) == ([], 7)  # an argument, not a magic name
    assert magic_completions("plain step", 5) == ([], 5)


def test_codegen_options_lead_and_the_rest_is_the_step() -> None:
    assert parse_options("--insert -t 0.5 --model some/model") == (
        StepOptions(True, "some/model", 0.5),
        "",
    )
    assert parse_options("-m m Print 'a --insert' -t 2") == (
        StepOptions(model="m"),
        "Print 'a --insert' -t 2",
    )
    assert parse_options("") == (StepOptions(), "")
    with pytest.raises(UsageError, match="-t takes a number"):
        parse_options("-t hot")


def test_history_keeps_python_of_user_cells_only() -> None:
    history = NotebookHistory()
    history.add_step("define add", "def add(a, b):\n    return a + b")
    history.add_cell("%matplotlib inline\nx = add(1, 2)\n!ls")
    history.add_cell("%%codegen\nuse add")
    history.add_cell("%load_ext codegen_repl")
    assert [(t.step, t.code) for t in history.turns] == [
        ("define add", "def add(a, b):\n    return a + b"),
        (None, "x = add(1, 2)"),
    ]


def test_edit_takes_the_lines_after_it_as_the_new_code() -> None:
    cell = parse_cell("%edit 2\nfor i in range(3):\n    print(i)")
    assert cell.magics == (Magic("edit", "2\nfor i in range(3):\n    print(i)"),)
    with pytest.raises(ConfigError, match="unknown command %exit"):  # the terminal's only
        parse_cell("%exit")
