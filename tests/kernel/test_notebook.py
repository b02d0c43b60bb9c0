"""A real notebook of steps, executed by nbclient with the installed `codegen` kernel and the
tiny trained model: outputs, an image, an error, %undo, %mtpb, and the autosaved sessions."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.kernel.conftest import install, kernel_env
from tests.trained import PAIRS

pytestmark = pytest.mark.slow
NAME = "codegen-notebook-test"
CELLS = [
    "%set temperature=0",
    "define add",
    "use add",
    "plot a line",
    "divide by zero",
    "%undo",
    "%code",
    "%%python\nprint(add(40, 2))",
    "%context",
    "%mtpb 7 --problems {problems}",
    "%code",
]
# An MTPB-format problem whose prompts the trained model knows: it prints 5, as expected.
PROBLEM = {"id": 7, "name": "add two numbers", "category": "math", "description": "",
           "prompts": ["define add", "use add"], "inputs": [{}], "outputs": [5]}  # fmt: skip


def generated(outputs: list[nbformat.NotebookNode]) -> str:
    """The code the kernel showed for a step (a display, updated in place while streaming)."""
    [shown] = [out for out in outputs if out.get("metadata", {}).get("codegen")]
    assert shown["metadata"]["codegen"]["generated_code"] is True
    return shown["data"]["text/plain"].rstrip("\n")


def test_nbclient_runs_a_notebook_of_steps(
    trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = install(tmp_path / "jupyter", NAME, trained_checkpoint)
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.setenv("JPY_SESSION_NAME", str(folder / "steps.ipynb"))  # as jupyter_server
    problems = tmp_path / "mtpb.jsonl"
    problems.write_text(json.dumps(PROBLEM) + "\n")
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(source.format(problems=problems)) for source in CELLS],
        metadata={"kernelspec": {"name": NAME, "display_name": "CodeGen", "language": "codegen"}},
    )
    client = NotebookClient(
        notebook, timeout=180, startup_timeout=120, kernel_name=NAME, allow_errors=True,
        resources={"metadata": {"path": str(folder)}},
    )  # fmt: skip
    config = tmp_path / "config.toml"
    config.write_text("max_new_tokens = 48\n")  # the user's config.toml is read
    with kernel_env(data, user_config=config):
        client.execute()
    cells = notebook.cells

    # nbclient sends no cell ids: the first step says that each run adds a turn (after the
    # "loading the model" line, where the model was still loading when the cell ran)
    texts = [out.get("text", "") for out in cells[1].outputs if out["output_type"] == "stream"]
    notes = [text for text in texts if not text.startswith("loading the model ")]
    assert notes[0].startswith("(this front end sent no cell id"), texts
    assert generated(cells[1].outputs) == PAIRS["define add"]
    assert generated(cells[2].outputs) == PAIRS["use add"]
    assert cells[2].outputs[1] == {"output_type": "stream", "name": "stdout", "text": "5\n"}
    assert any("image/png" in out.get("data", {}) for out in cells[3].outputs), cells[3].outputs
    [error] = [out for out in cells[4].outputs if out["output_type"] == "error"]
    assert error["ename"] == "ZeroDivisionError"
    undo = "".join(out.get("text", "") for out in cells[5].outputs)
    assert "undone: turn 4 (divide by zero)" in undo  # numbered from 1
    assert "(turn 4 failed: it is left out of the model's context;" in "".join(
        out.get("text", "") for out in cells[4].outputs
    )
    assert "restarting the kernel to replay 3 turns" in undo  # long work says so
    program = cells[6].outputs[0]["data"]["text/plain"]
    assert PAIRS["plot a line"] in program and PAIRS["divide by zero"] not in program
    assert cells[7].outputs[0]["text"] == "42\n"  # the undo kept the kernel's earlier state
    assert "up to 48 new tokens" in cells[8].outputs[-1]["text"]

    mtpb = cells[9].outputs
    turns = [generated([out]) for out in mtpb if out.get("metadata", {}).get("codegen")]
    assert turns == [PAIRS["define add"], PAIRS["use add"]]
    assert "PASS: MTPB problem 7; got 5, expected 5" in mtpb[-1]["text"]
    mtpb_program = cells[10].outputs[0]["data"]["text/plain"]
    assert PAIRS["plot a line"] not in mtpb_program  # a fresh session, with the problem's turns

    autosaves = folder / ".codegen"  # hidden, out of the file browser's way
    saved = nbformat.read(autosaves / "steps.ipynb", as_version=4)
    steps = [cell.source for cell in saved.cells if cell.cell_type == "markdown"]
    assert steps == ["define add", "use add", "plot a line"]
    played = nbformat.read(autosaves / "steps.mtpb-7-0.ipynb", as_version=4)
    assert [c.source for c in played.cells if c.cell_type == "markdown"] == PROBLEM["prompts"]
