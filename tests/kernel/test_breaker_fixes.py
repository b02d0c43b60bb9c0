"""The `codegen` kernel where a breaker attacked it (issue 19's trial), through jupyter_client and
real kernels: an autosave folder that cannot be used turns the autosave off instead of failing
every cell, a failed autosave is told in the cell whose save failed, a turn saved before it ran
is loaded as not run, an interrupted replay fails its cell and names every turn the kernel
lacks, and an interrupt while the first cell waits for the kernel's start stops it.

The folders that cannot be written are made so with `chattr +i` (the tests run as root in CI,
where file modes do not stop a write) and made writable again afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

from tests.kernel.conftest import install, kernel_env
from tests.kernel.helpers import collect, kernel, run_cell, send

pytestmark = pytest.mark.slow
NAME = "codegen-breaker-fixes-test"
SLOW_TURN = "%%python\nimport time\ntime.sleep(4)\nx = 1"  # a replay of it can be interrupted


@pytest.fixture(scope="module")
def data(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The kernelspec's data folder (JUPYTER_PATH) and no user config, for the module."""
    folder = install(tmp_path_factory.mktemp("breaker-spec"), NAME, trained_checkpoint)
    with kernel_env(folder):
        yield folder


@contextlib.contextmanager
def notebook_kernel(
    folder: Path, notebook: str
) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A kernel started as Jupyter Server starts one for `folder/notebook`."""
    before = os.environ.get("JPY_SESSION_NAME")
    os.environ["JPY_SESSION_NAME"] = str(folder / notebook)
    try:
        with kernel(NAME, folder) as started:
            yield started
    finally:
        if before is None:
            os.environ.pop("JPY_SESSION_NAME", None)
        else:
            os.environ["JPY_SESSION_NAME"] = before


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """`folder` cannot be changed (no file added, renamed or removed), even by root."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is missing: no way to make a folder unwritable as root")
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i failed here ({made.stderr.strip()}): not root, or a filesystem "
                    "without the immutable flag")  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def statuses(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return [cell["metadata"]["codegen"]["status"] for cell in cells if cell["cell_type"] == "code"]


# ----------------------------------------------------------------------------- autosave


@pytest.mark.parametrize("blocked", ["a file named .codegen", "an immutable .codegen"])
def test_an_autosave_folder_that_cannot_be_used_turns_the_autosave_off(
    data: Path, tmp_path: Path, blocked: str
) -> None:
    """Was: every cell, `%save PATH` included, failed with an InternalError (NotADirectoryError,
    or PermissionError moving the previous session aside)."""
    autosaves = tmp_path / ".codegen"
    if blocked.startswith("a file"):
        autosaves.write_text("x\n")
        guard: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        autosaves.mkdir()
        (autosaves / "nb.ipynb").write_text("the previous kernel's session\n")
        guard = immutable(autosaves)
    mine = tmp_path / "elsewhere" / "mine.ipynb"
    with guard, notebook_kernel(tmp_path, "nb.ipynb") as (_, client):
        first = run_cell(client, "%%python\nprint(2)", cell_id="P")
        assert (first.status, first.stdout()) == ("ok", "2\n"), first.reply
        said = first.stderr()
        assert said.startswith("the autosave is off: the file of the previous kernel's session "
                               "cannot be checked or kept aside ("), said  # fmt: skip
        assert said.endswith("%save PATH.ipynb saves this session there, and it autosaves "
                             "there from then on\n")  # fmt: skip
        second = run_cell(client, "%%python\nprint(3)", cell_id="Q")
        assert (second.status, second.stdout(), second.stderr()) == ("ok", "3\n", "")  # once
        saved = run_cell(client, f"%save {mine}")
        assert saved.status == "ok", saved.reply
        assert saved.stdout() == f"saved to {mine}; the session autosaves there from now on\n"
        assert run_cell(client, "%%python\nprint(4)", cell_id="R").status == "ok"
    assert [c.source for c in nbformat.read(mine, as_version=4).cells] == [
        "print(2)", "print(3)", "print(4)"
    ]  # fmt: skip
    if autosaves.is_dir():  # the previous session is as it was
        assert (autosaves / "nb.ipynb").read_text() == "the previous kernel's session\n"


def test_a_failed_autosave_is_told_in_the_cell_whose_save_failed(
    data: Path, tmp_path: Path
) -> None:
    """Was: step and `%%python` cells replied ok and said nothing; the warning came in the next
    magic cell, and after a `%save PATH` that worked."""
    autosaves = tmp_path / ".codegen"
    autosaves.mkdir()  # empty: there is no previous session to keep, only this one to write
    mine = tmp_path / "mine.ipynb"
    with immutable(autosaves), notebook_kernel(tmp_path, "nb.ipynb") as (_, client):
        code = run_cell(client, "%%python\nprint(2)", cell_id="P")
        assert (code.status, code.stdout()) == ("ok", "2\n"), code.reply
        assert code.stderr().startswith("cannot write "), code.stderr()
        assert "the session is kept in memory" in code.stderr()
        step = run_cell(client, "define add", cell_id="A")
        assert step.status == "ok", step.reply
        assert step.stderr().count("cannot write ") == 1, step.stderr()
        saved = run_cell(client, f"%save {mine}")
        assert saved.stdout() == f"saved to {mine}; the session autosaves there from now on\n"
        assert saved.stderr() == ""  # no stale warning after a save that worked
        used = run_cell(client, "use add", cell_id="B")
        assert (used.stdout(), used.stderr()) == ("5\n", "")
    assert statuses(mine) == ["ok", "ok", "ok"]


# ----------------------------------------------------------------------------- replays


@pytest.fixture
def replaying(data: Path, tmp_path: Path) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A kernel with turns 1 (a slow `%%python` cell, S), 2 (Y) and 3 (Z, using both)."""
    with notebook_kernel(tmp_path, "nb.ipynb") as (manager, client):
        for code, cell in ((SLOW_TURN, "S"), ("%%python\ny = 2", "Y"),
                           ("%%python\nprint(x + y)", "Z")):  # fmt: skip
            assert run_cell(client, code, cell_id=cell).status == "ok"
        yield manager, client


def test_an_interrupted_replay_fails_its_cell_and_names_every_turn_the_kernel_lacks(
    replaying, tmp_path: Path
) -> None:
    """Was: the cell replied ok (Run All went on), and a later replay's advice left out the
    turn that never ran."""
    manager, client = replaying
    msg_id = send(client, "%%python\ny = 20", "Y")  # replaces turn 2: turn 1 is replayed first
    time.sleep(2.0)
    manager.interrupt_kernel()
    stopped = collect(client, msg_id, 60)
    assert (stopped.status, stopped.reply["ename"]) == ("error", "KeyboardInterrupt")
    advice = "; to replay them: %run 1 then %run 2 then %run 3"
    assert "interrupted" in stopped.reply["evalue"], stopped.reply
    assert advice in stopped.stderr()
    assert statuses(tmp_path / ".codegen" / "nb.ipynb") == ["ok", "skipped", "ok"]

    undone = run_cell(client, "%undo")  # turn 1 replays in full; turn 2 never ran
    assert undone.status == "ok", undone.reply
    assert "turn 2 never ran: the kernel lacks the state of turn 2; to replay it: %run 2" in (
        undone.stderr()
    ), undone.stderr()
    program = run_cell(client, "%code").of("display_data")[-1]["data"]["text/plain"]
    assert "y = 20" not in program  # the turn that never ran does not steer the model
    assert "# --- turn 2: skipped, left out of the context" in program


def test_a_turn_saved_before_it_ran_loads_as_not_run(replaying, tmp_path: Path) -> None:
    """A restart while a replacing re-run replays the turns before it: the file holds the new
    turn as `pending`. Was: `%load` showed it `[pending]`, did not replay it, turn 3 failed with
    a NameError and the advice left turn 2 out."""
    manager, client = replaying
    autosave = tmp_path / ".codegen" / "nb.ipynb"
    send(client, "%%python\ny = 20", "Y")
    deadline = time.monotonic() + 60
    while statuses(autosave)[1:2] != ["pending"]:  # saved, not run yet (turn 1 replays)
        assert time.monotonic() < deadline, statuses(autosave)
        time.sleep(0.1)
    manager.restart_kernel()
    client.wait_for_ready(timeout=120)
    assert run_cell(client, "%code").status == "ok"  # the new session began: the file is kept
    [kept] = (tmp_path / ".codegen").glob("nb.*.ipynb")
    loaded = run_cell(client, f"%load {kept.relative_to(tmp_path)}", timeout=120)
    assert loaded.status == "ok", loaded.reply
    said = loaded.stdout() + loaded.stderr()
    assert "[pending]" not in said
    advice = "to replay them: %run 2 then %run 3"
    assert f"turn 2 never ran: the kernel lacks the state of turns 2, 3; {advice}" in said, said
    assert "NameError" not in said  # turn 3 was not replayed without turn 2's state
    rerun = run_cell(client, "%run 2")
    assert rerun.status == "ok", rerun.reply
    assert run_cell(client, "%run 3").stdout().endswith("\n21\n")


# ----------------------------------------------------------------------------- interrupts


@pytest.fixture(scope="module")
def fresh(
    data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[KernelManager, BlockingKernelClient, Path]]:
    """One kernel for the tests below; the first of them gets it as it started."""
    folder = tmp_path_factory.mktemp("fresh")
    with notebook_kernel(folder, "nb.ipynb") as (manager, client):
        yield manager, client, folder


def test_an_interrupt_while_the_first_cell_waits_for_the_kernels_start_stops_it(fresh) -> None:
    """Was: the interrupt came while the cell waited behind the child kernel's start and was
    dropped; the loop then ran until a second interrupt. Whether it lands while the cell waits
    (it does not start) or once the loop runs (it is interrupted), the cell ends at once."""
    manager, client, _ = fresh
    msg_id = send(client, "%%python\nprint('started')\nwhile True:\n    pass", "L")
    time.sleep(0.2)
    manager.interrupt_kernel()
    ended = collect(client, msg_id, 30)
    assert (ended.status, ended.reply["ename"]) == ("error", "KeyboardInterrupt")
    if "started" not in ended.stdout():
        assert ended.reply["evalue"].startswith("interrupted before the cell began")
    assert run_cell(client, "%%python\nprint(1)", cell_id="M").stdout() == "1\n"


@pytest.mark.parametrize("cell", ["%%python", "%%python\n\n", "!"])
def test_a_cell_with_no_code_says_there_is_nothing_to_run(fresh, cell: str) -> None:
    ran = run_cell(fresh[1], cell, cell_id="E")
    assert ran.status == "ok"
    assert (
        ran.stderr() == "nothing to run: write the code after the ! or on the lines below "
        "%%python\n"
    )


def test_a_timed_out_turn_fails_as_a_timeout(fresh) -> None:
    _, client, _ = fresh
    assert run_cell(client, "%set timeout=1").status == "ok"
    try:
        ran = run_cell(client, "%%python\nimport time\ntime.sleep(30)", cell_id="T")
    finally:
        assert run_cell(client, "%set timeout=60").status == "ok"
    assert (ran.reply["ename"], ran.reply["evalue"]) == (
        "TimeoutError", "the cell ran longer than 1 s and was interrupted"
    )  # fmt: skip


def test_a_killed_child_kernel_is_told_in_turns_and_the_error_names_only_the_cause(fresh) -> None:
    _, client, _ = fresh
    ran = run_cell(client, "%%python\nimport os\nos.kill(os.getpid(), 9)", cell_id="K")
    assert ran.reply["ename"] == "KernelDied"
    assert ran.reply["evalue"] == (
        "the kernel died (killed by SIGKILL, by the system's out-of-memory killer or a kill -9)"
    )  # the error: the cause; the turn's status line above says what was replayed
    assert re.search(r"restarted it and replayed (\d+) of \1 turns?\b", ran.stderr()), ran.stderr()


def test_a_damaged_file_under_load_is_one_usage_error_line(fresh) -> None:
    _, client, folder = fresh
    (folder / "broken.ipynb").write_text('{"cells": [')
    ran = run_cell(client, "%load broken.ipynb")
    assert ran.reply["ename"] == "UsageError"
    evalue = ran.reply["evalue"]
    assert evalue.startswith(f"{folder / 'broken.ipynb'} is not a readable notebook (")
    assert evalue.endswith("; check the path, or open another session")
    assert "\n" not in evalue
