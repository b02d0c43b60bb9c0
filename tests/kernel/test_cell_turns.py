"""The notebook model of the `codegen` kernel, on KernelRunner over a real child kernel (a scripted
decoder writes the code): a cell is its step (a re-run replaces its turn), failed steps leave the
model's context unless kept, `%drop`, `%retry`'s report, "loading the model", and an autosave
that never overwrites the previous kernel's session."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from codegen_repl.kernel.runner import KernelRunner, RunnerOptions, keep_previous
from tests.core.test_session import ScriptedDecoder
from tests.kernel.test_runner import Collected

ADD = "def add(a, b):\n    return a + b"
TIMES = "def add(a, b):\n    return a * b"
USE = "total = add(2, 3)\nprint(total)"


def make_runner(folder: Path, decoder: ScriptedDecoder) -> KernelRunner:
    options = RunnerOptions(model="scripted", cwd=folder, session_path=folder / "s.ipynb")
    return KernelRunner(options, load_decoder=lambda name: decoder)


@pytest.fixture
def scripted() -> ScriptedDecoder:
    return ScriptedDecoder()


@pytest.fixture
def runner(tmp_path: Path, scripted: ScriptedDecoder) -> Iterator[KernelRunner]:
    running = make_runner(tmp_path, scripted)
    try:
        yield running
    finally:
        running.shutdown()


def texts(shown: Collected) -> str:
    return "".join(text for _, text in shown.kinds("stream"))


def test_a_cell_run_again_replaces_its_turn(runner, scripted, tmp_path) -> None:
    scripted.codes += [ADD, USE, TIMES]
    shown = Collected()
    assert runner.run_cell("define add", shown, cell_id="A").status == "ok"
    assert runner.run_cell("use add", shown, cell_id="B").status == "ok"
    again = Collected()
    assert runner.run_cell("define add as a product", again, cell_id="A").status == "ok"
    session = runner.session
    assert session is not None
    assert [(turn.step, turn.code) for turn in session.turns] == [
        ("define add as a product", TIMES),
        ("use add", USE),
    ]
    # the new code was written from the turns before it only: not the old wording, not turn 2
    assert scripted.prompts[-1].endswith("# define add as a product\n")
    assert "# define add\n" not in scripted.prompts[-1] and "use add" not in scripted.prompts[-1]
    said = texts(again)
    assert "this replaces turn 1 (define add); the 1 later turn that ran will run again" in said
    assert session.turns[1].outputs[-1]["text"] == "6\n"  # turn 2 ran again, with the new add
    saved = nbformat.read(tmp_path / "s.ipynb", as_version=4)
    assert [c.source for c in saved.cells if c.cell_type == "markdown"] == [
        "define add as a product",
        "use add",
    ]

    code = Collected()  # a %%python cell run again, edited, replaces its turn too
    assert runner.run_cell("%%python\nprint(total)", code, cell_id="C").status == "ok"
    assert runner.run_cell("%%python\nprint(total + 1)", code, cell_id="C").status == "ok"
    assert [turn.code for turn in session.turns][2:] == ["print(total + 1)"]
    assert code.kinds("output")[-1]["text"] == "7\n"


def test_without_a_cell_id_a_run_adds_a_turn_and_says_so(runner, scripted) -> None:
    scripted.codes += ["x = 1", "y = 2", "x = 1"]
    shown = [Collected() for _ in range(6)]
    cells = ["%%python\nn = 1", "set x", "set y", "set x", "%%python\nm = 2", "%%python\nn = 1"]
    for cell, sink in zip(cells, shown, strict=True):
        assert runner.run_cell(cell, sink, cell_id="").status == "ok"
    note = "(this front end sent no cell id: the cell adds turn {}, even if it ran before; "
    said = [texts(sink) for sink in shown]
    assert said[0] == "" and said[2] == "" and said[4] == ""  # code, and steps after the first
    assert said[1].startswith(note.format(2)) and "%drop N deletes a turn" in said[1]
    assert said[3].startswith(note.format(4))  # a step again: said again
    assert said[5].startswith(note.format(6))  # so is code again
    assert runner.session is not None and len(runner.session.turns) == 6


def test_a_failed_step_leaves_the_context_unless_kept(runner, scripted) -> None:
    scripted.codes += ["x = 1", "1 / 0", "y = 2", "z = 3"]
    shown = Collected()
    runner.run_cell("set x", shown, cell_id="A")
    failed = runner.run_cell("divide by zero", shown, cell_id="B")
    assert failed.ename == "ZeroDivisionError"
    assert ("(turn 2 failed: it is left out of the model's context; %keep 2 keeps it there, "
            "%drop 2 deletes it)") in texts(shown)  # fmt: skip
    runner.run_cell("set y", shown, cell_id="C")
    assert "1 / 0" not in scripted.prompts[-1] and "# set x\nx = 1\n" in scripted.prompts[-1]
    code = Collected()
    runner.run_cell("%code", code)
    assert (
        "# --- turn 2: error, left out of the context: divide by zero"
        in (code.kinds("display")[-1]["text/plain"])
    )
    assert runner.run_cell("%keep 2", shown).status == "ok"
    runner.run_cell("set z", shown, cell_id="D")
    assert "# divide by zero\n1 / 0\n" in scripted.prompts[-1]
    session = runner.session
    assert session is not None and session.path is not None
    saved = nbformat.read(session.path, as_version=4)
    assert saved.cells[3].metadata["codegen"]["kept"] is True  # the failed turn's code cell


def test_drop_deletes_a_turn_and_the_kernel_forgets_it(runner) -> None:
    shown = Collected()
    for code in ("log = []", "log.append('two')", "log.append('three')"):
        assert runner.run_cell(f"%%python\n{code}", shown).status == "ok"
    dropped = Collected()
    assert runner.run_cell("%drop 2", dropped).status == "ok"
    assert "deleted turn 2 (your code); turns from 2 on are renumbered" in texts(dropped)
    assert "replaying 1/1: turn 1" in texts(dropped)
    assert runner.run_cell("%%python\nprint(log)", shown).status == "ok"
    assert shown.kinds("output")[-1]["text"] == "['three']\n"
    assert runner.run_cell("%drop 9", shown).ename == "UsageError"


def test_loading_is_said_and_a_restart_keeps_the_previous_session(tmp_path) -> None:
    previous = tmp_path / "s.ipynb"
    previous.write_text("the previous kernel's session")
    os.utime(previous, (0, 0))
    loaded = threading.Event()

    def slow_load(name: str) -> ScriptedDecoder:
        loaded.wait(30)  # until the cell has said that it waits (or 30 s: the test fails)
        return ScriptedDecoder("x = 1")

    class Waiting(Collected):
        def stream(self, name: str, text: str) -> None:
            super().stream(name, text)
            if text.startswith("loading the model"):
                loaded.set()

    options = RunnerOptions(model="scripted", cwd=tmp_path, session_path=previous)
    runner = KernelRunner(options, load_decoder=slow_load)
    try:
        shown = Waiting()
        assert runner.run_cell("set x", shown).status == "ok"
        said = texts(shown)
        assert "loading the model scripted (the first step waits for it) ...\n" in said
        kept = sorted(tmp_path.glob("s.*.ipynb"))
        assert [path.read_text() for path in kept] == ["the previous kernel's session"]
        assert f"the session of the previous kernel is kept as {kept[0].name}" in said
        assert nbformat.read(previous, as_version=4).cells[0].source == "set x"
    finally:
        runner.shutdown()


def test_keep_previous_numbers_what_it_keeps(tmp_path) -> None:
    path = tmp_path / "n.ipynb"
    assert keep_previous(path) is None
    names = []
    for _ in range(2):
        path.write_text("old")
        os.utime(path, (0, 0))
        kept = keep_previous(path)
        assert kept is not None and not path.exists()
        names.append(kept.name)
    assert names[1] == names[0].replace(".ipynb", "-2.ipynb")


def test_a_re_run_counts_and_names_only_the_turns_run_again(runner, scripted) -> None:
    scripted.codes += ["x = 1", "y = 1", "x = 2"]
    shown = Collected()
    assert runner.run_cell("set x", shown, cell_id="A").status == "ok"
    assert runner.run_cell("%%python\n1 / 0", shown, cell_id="B").ename == "ZeroDivisionError"
    assert runner.run_cell("%%python\nprint(x)", shown, cell_id="C").status == "ok"
    assert runner.run_cell("%set timeout=1", shown).status == "ok"
    slow = Collected()
    assert runner.run_cell("%%python\nimport time\ntime.sleep(30)", slow, cell_id="D").ename
    # one line for the one thing that happened (not `[timeout]`, the message, the note apart)
    said = slow.kinds("stream")[-1][1]  # after the executor's `interrupting the kernel ...`
    assert said.startswith("[timeout] the cell ran longer than 1 s and was interrupted (turn 4 "
                           "failed: it is left out of the model's context;")  # fmt: skip
    assert runner.run_cell("%set timeout=60", shown).status == "ok"

    again = Collected()  # turn 2 failed before, turn 4 did not finish: neither is news
    assert runner.run_cell("set y instead", again, cell_id="A").status == "ok"
    said = texts(again)
    assert "this replaces turn 1 (set x); the 2 later turns that ran will run again" in said
    assert "turn 3 (your code) now fails: NameError: name 'x' is not defined" in said
    assert "turn 2 " not in said and "turn 4 " not in said, said
    # the kernel's notes are on stderr: no stdout block of the program's merges with them
    assert {name for name, _ in again.kinds("stream")} == {"stderr"}
    fixed = Collected()
    assert runner.run_cell("set x again", fixed, cell_id="A").status == "ok"
    assert "turn 3 (your code) now runs without an error" in texts(fixed)
    assert "now fails" not in texts(fixed)
    dropped = Collected()  # turn 2 (now 1) fails again when run again: it is not named
    assert runner.run_cell("%drop 1", dropped).status == "ok"
    said = texts(dropped)
    assert "turn 2 (your code) now fails: NameError" in said  # x is gone again
    assert "turn 1 (your code) now" not in said and "turn 3 " not in said, said
    session = runner.session
    assert session is not None
    assert [turn.status for turn in session.turns] == ["error", "error", "timeout"]


def test_a_cell_finds_its_turn_after_load_and_a_new_cell_with_a_turns_step_says_so(
    runner, scripted, tmp_path
) -> None:
    scripted.codes += [ADD, USE, TIMES, USE, USE, USE]
    shown = Collected()
    assert runner.run_cell("define add", shown, cell_id="A").status == "ok"
    assert runner.run_cell("use add", shown, cell_id="B").status == "ok"
    saved = nbformat.read(tmp_path / "s.ipynb", as_version=4)
    ids = [c.metadata["codegen"].get("cell_id") for c in saved.cells if c.cell_type == "code"]
    assert ids == ["A", "B"]  # kept in the autosaved session
    assert runner.run_cell("%reset", shown).status == "ok"
    assert runner.run_cell("%load s.ipynb", shown).status == "ok"
    again = Collected()
    assert runner.run_cell("define add as a product", again, cell_id="A").status == "ok"
    assert "this replaces turn 1 (define add); the 1 later turn" in texts(again)
    session = runner.session
    assert session is not None
    assert [turn.step for turn in session.turns] == ["define add as a product", "use add"]
    other = Collected()  # another cell with a turn's step: a new turn, said in one line
    assert runner.run_cell("use add", other, cell_id="Z").status == "ok"
    assert texts(other).startswith(
        "(this cell made no turn of this session: it adds turn 3, although turn 2 has the same "
        "step; %drop 2 deletes that one)\n"
    )
    assert [turn.cell_id for turn in session.turns] == ["A", "B", "Z"]
    assert runner.run_cell("%retry", other).status == "ok"  # the new turn is still Z's
    assert runner.run_cell("use add", other, cell_id="Z").status == "ok"
    assert [turn.cell_id for turn in session.turns] == ["A", "B", "Z"]
