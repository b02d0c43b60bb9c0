"""The `codegen` kernel as JupyterLab drives it, through jupyter_client with cell ids in the
requests' metadata and the tiny trained model: a cell run again replaces its step, the code is
markdown that follows the theme, `%%python` cells are highlighted as IPython, usage mistakes are
UsageErrors, and a restart keeps the previous autosaved session. One kernel for the module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

from tests.kernel.conftest import install, kernel_env
from tests.kernel.helpers import kernel, run_cell
from tests.trained import PAIRS

pytestmark = pytest.mark.slow
NAME = "codegen-notebook-model-test"


@pytest.fixture(scope="module")
def started(
    trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KernelManager, BlockingKernelClient, Path]]:
    folder = tmp_path_factory.mktemp("notebook-model")
    data = install(folder / "jupyter", NAME, trained_checkpoint)
    before = os.environ.get("JPY_SESSION_NAME")
    os.environ["JPY_SESSION_NAME"] = str(folder / "steps.ipynb")  # as jupyter_server sets it
    try:
        with kernel_env(data), kernel(NAME, folder) as (manager, client):
            assert run_cell(client, "%set temperature=0").status == "ok"
            yield manager, client, folder
    finally:
        if before is None:
            os.environ.pop("JPY_SESSION_NAME", None)
        else:
            os.environ["JPY_SESSION_NAME"] = before


def code_displays(ran) -> list[dict]:
    return [c for c in ran.of("display_data", "update_display_data")
            if c["metadata"].get("codegen", {}).get("generated_code")]  # fmt: skip


def test_a_cell_run_again_replaces_its_step_and_the_code_follows_the_theme(started) -> None:
    _, client, folder = started
    first = run_cell(client, "define add", cell_id="cell-a")
    assert first.status == "ok", first.reply
    final = code_displays(first)[-1]["data"]
    assert "text/html" not in final  # no inline colours: markdown, highlighted by the theme
    assert final["text/markdown"] == f"```python\n{PAIRS['define add']}\n```\n\n---"
    assert final["text/plain"].rstrip("\n") == PAIRS["define add"]
    used = run_cell(client, "use add", cell_id="cell-b")
    assert used.stdout().endswith("5\n")

    again = run_cell(client, "define add", cell_id="cell-a")
    assert again.status == "ok", again.reply
    said = again.stderr()  # the kernel's notes, apart from the program's stdout
    assert "this replaces turn 1 (define add); the 1 later turn that ran will run again" in said
    assert "restarting the kernel\n" in said  # no turn before it to replay
    program = run_cell(client, "%code").of("display_data")[-1]["data"]["text/plain"]
    assert program.count(PAIRS["define add"]) == 1 and program.count(PAIRS["use add"]) == 1
    saved = nbformat.read(folder / ".codegen" / "steps.ipynb", as_version=4)
    assert [c.source for c in saved.cells if c.cell_type == "markdown"] == ["define add", "use add"]


def test_without_a_cell_id_a_cell_says_it_adds_a_turn(started) -> None:
    _, client, _ = started
    ran = run_cell(client, "say hello")
    assert ran.stderr().startswith("(this front end sent no cell id: the cell adds turn 3")
    assert ran.stdout() == "hello\n"
    assert run_cell(client, "%undo").status == "ok"
    odd = run_cell(client, "say hello", cell_id=["not", "a", "string"])  # was a TypeError
    assert (odd.status, odd.stdout()) == ("ok", "hello\n")  # as without a cell id
    assert run_cell(client, "%undo").status == "ok"


def test_language_info_highlights_python_cells_and_usage_errors_say_so(started) -> None:
    _, client, _ = started
    client.kernel_info()
    info = client.get_shell_msg(timeout=30)["content"]["language_info"]
    assert info["codemirror_mode"] == {"name": "ipython", "version": 3}
    assert (info["mimetype"], info["pygments_lexer"]) == ("text/x-ipython", "ipython3")
    bad = run_cell(client, "%mtpb one")
    assert (bad.reply["ename"], "`" in bad.reply["evalue"]) == ("UsageError", False)


def test_a_restart_keeps_the_previous_autosaved_session(started) -> None:
    manager, client, folder = started
    autosaves = folder / ".codegen"
    before = (autosaves / "steps.ipynb").read_text()
    manager.restart_kernel()
    client.wait_for_ready(timeout=120)
    ran = run_cell(client, "%%python\nprint('fresh')", cell_id="cell-c")
    assert ran.status == "ok", ran.reply
    [kept] = [path for path in autosaves.glob("steps.*.ipynb")]
    assert kept.read_text() == before
    assert ran.stderr().startswith(  # named as %load takes them: relative to the folder
        f"the session of the previous kernel is kept as {kept.relative_to(folder)}; this one "
        "autosaves to .codegen/steps.ipynb\n"
    )
    assert ran.stdout() == "fresh\n"  # the kernel's notes are not in the program's stdout
    fresh = nbformat.read(autosaves / "steps.ipynb", as_version=4)
    assert [cell.source for cell in fresh.cells] == ["print('fresh')"]
    assert not list(folder.glob("*.ipynb"))  # nothing in the notebook's own folder


def test_after_a_rename_the_restarted_kernel_names_the_previous_file(started) -> None:
    """Jupyter Server tells a kernel of a renamed notebook only at its next start (update_env);
    that kernel keeps its id (the connection file), by which it finds the last file."""
    manager, client, folder = started
    assert run_cell(client, "%%python\nx = 1", cell_id="cell-d").status == "ok"  # steps.ipynb
    renamed = str(folder / "renamed.ipynb")
    os.environ["JPY_SESSION_NAME"] = renamed  # the fixture puts it back
    manager.update_env(env={"JPY_SESSION_NAME": renamed})  # what Jupyter Server does
    manager.restart_kernel()
    client.wait_for_ready(timeout=120)
    ran = run_cell(client, "%%python\nprint('renamed')", cell_id="cell-e")
    assert ran.status == "ok", ran.reply
    assert ran.stderr().startswith(
        "the previous kernel autosaved to .codegen/steps.ipynb (the notebook's name then); this "
        "one autosaves to .codegen/renamed.ipynb; %load .codegen/steps.ipynb resumes that session"
    ), ran.stderr()
    assert ran.stdout() == "renamed\n"  # the note is not part of the program's output
    assert (folder / ".codegen" / "renamed.ipynb").exists()
