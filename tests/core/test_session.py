"""The Session over a real IPython kernel; a scripted decoder stands in for the model except
in the end-to-end test, which uses a tiny real checkpoint."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.errors import ConfigError
from codegen_repl.model.sample_params import SampleParams
from tests.conftest import local_decoder


class ScriptedDecoder:
    """Answers each step with the next scripted snippet, and records the prompts it saw."""

    max_context = 2048

    def __init__(self, *codes: str) -> None:
        self.codes = list(codes)
        self.prompts: list[str] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        self.prompts.append(prompt)
        code = self.codes.pop(0)
        yield from (code[: len(code) // 2], code[len(code) // 2 :])

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        return ["".join(self.generate(prompt, sample))]


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    with Executor(ExecutorConfig(cwd=tmp_path)) as running:
        running.start()
        yield running


def peek(executor: Executor, expression: str) -> str:
    """The kernel's repr of an expression, without making a turn."""
    result = executor.run(expression)
    assert result.status == "ok", result.outputs
    return result.outputs[-1]["data"]["text/plain"]


def test_turns_build_the_mtpb_context_and_keep_kernel_state(tmp_path, executor) -> None:
    decoder = ScriptedDecoder("a = 1", "b = a + 1\nprint(b)")
    session = Session(decoder, executor, tmp_path / "s.ipynb")
    streamed: list[str] = []
    first = session.step("Assign 1 to a.", on_text=streamed.append)
    second = session.step("Add one to a and print it.")
    assert "".join(streamed) == "a = 1"
    assert (
        decoder.prompts[1]
        == MTPB_PREFIX + "# Assign 1 to a.\na = 1\n\n# Add one to a and print it.\n"
    )
    assert first.status == second.status == "ok"
    assert second.outputs == [{"output_type": "stream", "name": "stdout", "text": "2\n"}]
    user = session.run_code("c = b * 10")
    assert user.step is None and peek(executor, "c") == "20"
    assert session.program().endswith("print(b)\n\nc = b * 10\n\n")


def test_the_notebook_is_saved_after_every_turn_and_validates(tmp_path, executor) -> None:
    path = tmp_path / "s.ipynb"
    session = Session(ScriptedDecoder("x = [1]", "x.append(2)\nx"), executor, path)
    session.step("Make a list.")
    saved = nbformat.read(str(path), as_version=4)
    nbformat.validate(saved)
    assert [c.cell_type for c in saved.cells] == ["markdown", "code"]
    session.step("Append 2.")
    saved = nbformat.read(str(path), as_version=4)
    assert saved.cells[-1].outputs[0]["data"]["text/plain"] == "[1, 2]"
    assert saved.metadata["codegen"]["settings"]["prefix"] == MTPB_PREFIX
    assert not list(tmp_path.glob(".s.ipynb.*"))  # no temp files left behind


def test_undo_restores_the_kernel_to_before_the_turn(tmp_path, executor) -> None:
    session = Session(ScriptedDecoder("items = []", "items.append(1)"), executor)
    session.step("Make a list.")
    session.step("Append one.")
    assert peek(executor, "items") == "[1]"
    dropped = session.undo()
    assert dropped is not None and dropped.code == "items.append(1)"
    assert peek(executor, "items") == "[]"
    assert len(session.turns) == 1


def test_retry_resamples_from_the_state_before(tmp_path, executor) -> None:
    decoder = ScriptedDecoder("items = []", "items.append(1)", "items.append(2)")
    session = Session(decoder, executor)
    session.step("Make a list.")
    session.step("Append something.")
    again = session.retry()
    assert again.code == "items.append(2)"
    assert peek(executor, "items") == "[2]"
    assert decoder.prompts[2] == decoder.prompts[1]


def test_ctrl_c_while_a_retry_writes_changes_nothing(tmp_path, executor) -> None:
    class Stopped(ScriptedDecoder):
        def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
            if len(self.prompts) == 2:
                self.prompts.append(prompt)
                yield "items.app"
                raise KeyboardInterrupt  # Ctrl-C while the new code streams
            yield from super().generate(prompt, sample)

    session = Session(Stopped("items = []", "items.append(1)"), executor)
    session.step("Make a list.")
    session.step("Append something.")
    with pytest.raises(KeyboardInterrupt):
        session.retry()
    assert [turn.code for turn in session.turns] == ["items = []", "items.append(1)"]
    assert session.settings.sample.seed == 0  # as if no retry began
    assert peek(executor, "items") == "[1]"  # the kernel was not rebuilt


def test_edit_reruns_the_turn_and_those_after(tmp_path, executor) -> None:
    decoder = ScriptedDecoder("items = [0]", "items.append(1)", "total = sum(items)")
    session = Session(decoder, executor)
    for step in ("Make a list.", "Append one.", "Sum it."):
        session.step(step)
    session.edit(1, "items = [10]")  # turns are numbered from 1
    assert peek(executor, "items") == "[10, 1]"
    assert peek(executor, "total") == "11"
    with pytest.raises(ConfigError, match=r"there is no turn 7; turns are 1..3"):
        session.edit(7, "x")


def test_a_failing_turn_is_kept_but_not_replayed(tmp_path, executor) -> None:
    session = Session(ScriptedDecoder("n = 1", "n += 1\n1 / 0", "m = n"), executor)
    session.step("One.")
    failed = session.step("Break.")
    assert failed.status == "error"
    assert failed.outputs[-1]["ename"] == "ZeroDivisionError"
    session.step("Copy.")
    session.undo()  # replays turn 0 only: the failed turn's side effects are gone
    assert peek(executor, "n") == "1"


OWNER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from codegen_repl.core.executor import Executor, ExecutorConfig
    from codegen_repl.core.session import Session
    from tests.core.test_session import ScriptedDecoder

    path = Path(sys.argv[1])
    executor = Executor(ExecutorConfig(cwd=path.parent))
    executor.start()
    decoder = ScriptedDecoder("log = ['one']", "log.append('two')")
    session = Session(decoder, executor, path)
    session.step("Start a log.")
    session.step("Log two.")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_resume_after_the_owner_is_killed(tmp_path) -> None:
    path = tmp_path / "crash.ipynb"
    done = subprocess.run(
        [sys.executable, "-c", OWNER, str(path)], capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == -9, done.stderr
    nbformat.validate(nbformat.read(str(path), as_version=4))
    with Executor(ExecutorConfig(cwd=tmp_path)) as executor:
        executor.start()
        session = Session.open(path, ScriptedDecoder(), executor)
        assert [t.step for t in session.turns] == ["Start a log.", "Log two."]
        assert peek(executor, "log") == "['one', 'two']"


def test_export_to_python(tmp_path, executor) -> None:
    session = Session(ScriptedDecoder("a = 1"), executor, settings=SessionSettings(prefix=""))
    session.step("Set a.")
    session.save(tmp_path / "program.py")
    assert (tmp_path / "program.py").read_text() == "# Set a.\na = 1\n\n"


def test_open_a_missing_session(tmp_path, executor) -> None:
    with pytest.raises(ConfigError, match=r"does not exist; start a new session"):
        Session.open(tmp_path / "none.ipynb", ScriptedDecoder(), executor)


def test_end_to_end_with_a_tiny_model(tmp_path, executor, chat_checkpoint, tokenizer_files):
    decoder = local_decoder(chat_checkpoint, tokenizer_files)
    settings = SessionSettings(sample=SampleParams(max_new_tokens=16))
    session = Session(decoder, executor, tmp_path / "e2e.ipynb", settings)
    turn = session.step("Print hello.")
    assert turn.status in {"ok", "error"}  # random weights write random code; it must run
    assert turn.timings["generate_s"] > 0
    saved = nbformat.read(str(tmp_path / "e2e.ipynb"), as_version=4)
    assert saved.cells[-1].source == turn.code


def test_a_matplotlib_figure_is_a_png(tmp_path, executor) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
    turn = Session(ScriptedDecoder(code), executor).step("Plot a line.")
    images = [o for o in turn.outputs if "image/png" in o.get("data", {})]
    assert turn.status == "ok" and len(images) == 1


def test_a_segfault_restarts_and_replays(tmp_path, executor) -> None:
    crash = "import ctypes\nctypes.string_at(0)"
    session = Session(ScriptedDecoder("kept = 41", crash, "kept += 1"), executor)
    session.step("Keep a number.")
    died = session.step("Crash.")
    assert died.status == "died" and "restarted" in died.message
    session.step("Add one.")
    assert peek(executor, "kept") == "42"


def test_a_huge_allocation_under_a_memory_limit(tmp_path) -> None:
    config = ExecutorConfig(cwd=tmp_path, memory_limit_mb=1024)
    with Executor(config) as executor:
        executor.start()
        decoder = ScriptedDecoder("small = 1", "big = bytearray(16 * 2**30)", "small += 1")
        session = Session(decoder, executor)
        session.step("Small.")
        failed = session.step("Allocate 16 GiB.")
        assert failed.status in {"error", "died"}
        session.step("Go on.")
        assert peek(executor, "small") == "2"


def test_an_infinite_loop_times_out_and_the_session_goes_on(tmp_path, executor) -> None:
    settings = SessionSettings(timeout=1.0)
    session = Session(ScriptedDecoder("kept = 7", "while True:\n    pass", "kept += 1"), executor,
                      settings=settings)  # fmt: skip
    session.step("Keep seven.")
    looped = session.step("Loop forever.")
    assert looped.status == "timeout"
    session.step("Add one.")
    assert peek(executor, "kept") == "8"


def test_a_declined_turn_is_left_out_and_never_replayed(tmp_path, executor) -> None:
    """A declined turn is not part of the program and no replay (edit, undo, resume) runs it;
    it stays in the notebook, marked, and runs when asked by number."""
    path = tmp_path / "s.ipynb"
    codes = ("x = 1", "declined_ran = True", "skipped_ran = True", "y = x + 1")
    decoder = ScriptedDecoder(*codes)
    session = Session(decoder, executor, path, SessionSettings(prefix=""))
    session.step("Set x.")
    assert session.step("Mark.", run="decline").status == "declined"
    assert session.step("Mark again.", run=False).status == "skipped"  # run=never: shown only
    session.step("Set y.")
    assert "declined_ran" not in decoder.prompts[-1] and "skipped_ran" in decoder.prompts[-1]
    assert "declined_ran" not in session.program() and "skipped_ran" in session.program()
    session.edit(1, "x = 5")
    assert peek(executor, "y") == "6"
    ran = "('declined_ran' in globals(), 'skipped_ran' in globals())"
    assert peek(executor, ran) == "(False, False)"
    assert [t.status for t in session.turns] == ["ok", "declined", "skipped", "ok"]
    session.undo()
    assert peek(executor, "'declined_ran' in globals()") == "False"
    notebook = nbformat.read(str(path), as_version=4)
    marked = [
        cell for cell in notebook.cells if "codegen-declined" in cell.metadata.get("tags", [])
    ]
    assert [cell.source for cell in marked] == ["declined_ran = True"]
    assert "Mark.\n\n*(declined: this code was not run" in notebook.cells[2].source
    resumed = Session.open(path, ScriptedDecoder(), executor)
    assert [t.status for t in resumed.turns] == ["ok", "declined", "skipped"]
    assert peek(executor, "x, 'declined_ran' in globals()") == "(5, False)"
    ran = resumed.run_turn(2)  # on request
    assert ran.status == "ok" and peek(executor, "declined_ran") == "True"
    assert "declined_ran = True" in resumed.program()


REPLAY_IS_SLOW = """\
import os, time
if os.path.exists('ran-once'):
    time.sleep(60)
open('ran-once', 'w').close()"""


def test_replays_run_under_the_session_timeout(tmp_path, executor) -> None:
    settings = SessionSettings(prefix="", timeout=2.0)
    session = Session(ScriptedDecoder(REPLAY_IS_SLOW, "z = 1"), executor, settings=settings)
    session.step("Slow the second time.")
    session.step("Set z.")
    started = time.monotonic()
    session.undo()  # the replay of turn 1 hits the timeout, and says what the kernel lacks
    assert time.monotonic() - started < 30
    assert "turn 1 ran past the session's timeout when replayed" in session.notice
    assert session.notice.endswith("the kernel lacks the state of turn 1")
    assert session.missing == (1,)


def test_run_turn_runs_one_turn_again_now(tmp_path, executor) -> None:
    session = Session(ScriptedDecoder(), executor, settings=SessionSettings(prefix=""))
    session.run_code("n = 1")
    session.run_code("n += 1\nprint(n)")
    again = session.run_turn(2)  # no restart, no replay of turn 1
    assert again.outputs[-1]["text"] == "3\n" and peek(executor, "n") == "3"
    session.run_turn(1)
    assert peek(executor, "n") == "1"
    with pytest.raises(ConfigError, match=r"there is no turn 3; turns are 1..2"):
        session.run_turn(3)


def test_files_are_written_with_the_users_umask(tmp_path, executor) -> None:
    session = Session(ScriptedDecoder(), executor, tmp_path / "s.ipynb")
    previous = os.umask(0o022)
    try:
        session.run_code("x = 1")
        session.save(tmp_path / "program.py")
        assert stat.S_IMODE((tmp_path / "s.ipynb").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "program.py").stat().st_mode) == 0o644
        os.umask(0o077)
        session.save(tmp_path / "private.ipynb")
        assert stat.S_IMODE((tmp_path / "private.ipynb").stat().st_mode) == 0o600
        (tmp_path / "s.ipynb").chmod(0o640)  # a file's own mode is kept
        session.save()
        assert stat.S_IMODE((tmp_path / "s.ipynb").stat().st_mode) == 0o640
    finally:
        os.umask(previous)


@pytest.mark.parametrize(
    "metadata",
    [
        {"codegen": "x"},
        {"codegen": {"settings": [1]}},
        {"codegen": {"settings": {"timeout": "abc"}}},
        {"codegen": {"settings": {"timeout": float("nan")}}},
        {"codegen": {"settings": {"sample": "x"}}},
        {"codegen": {"settings": {"sample": {"bogus": 1}}}},
        {"codegen": {"settings": {"sample": {"stop": 5}}}},
        {"codegen": {"settings": {"sample": {"temperature": "hot"}}}},
    ],
)
def test_damaged_session_metadata_is_one_clear_error(tmp_path, metadata) -> None:
    path = tmp_path / "damaged.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    notebook.metadata.update(metadata)
    path.write_text(json.dumps(notebook))  # as a hand edit would leave it (NaN included)
    with pytest.raises(ConfigError, match=r"holds session data this tool cannot read"):
        Session.open(path, ScriptedDecoder(), None)  # type: ignore[arg-type]


def test_damaged_cell_metadata_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "damaged.ipynb"
    cell = nbformat.v4.new_code_cell("x = 1", metadata={"codegen": {"step": 5}})
    nbformat.write(nbformat.v4.new_notebook(cells=[cell], metadata={"codegen": {}}), path)
    with pytest.raises(ConfigError, match=r"cell 1's metadata .* is not readable"):
        Session.open(path, ScriptedDecoder(), None)  # type: ignore[arg-type]


class CountingDecoder(ScriptedDecoder):
    max_context = 64

    def __init__(self) -> None:
        super().__init__()
        self.counted = 0

    def count_tokens(self, text: str) -> int:
        self.counted += 1
        return super().count_tokens(text)


def test_the_fitted_context_is_kept_until_the_turns_change(tmp_path: Path) -> None:
    """The REPL asks for the fitted context at every pause in typing, in its prompt's thread:
    fitting tokenizes once per turn left out (a 400-turn session took seconds a keypress),
    so the answer is kept while nothing it depends on changes (breaker trial)."""
    from codegen_repl.core.notebook import Turn

    decoder = CountingDecoder()
    settings = SessionSettings(prefix="", sample=SampleParams(max_new_tokens=8))
    session = Session(decoder, Executor(ExecutorConfig(cwd=tmp_path)), None, settings)
    session.turns = [Turn(f"step {n}", f"x{n} = {n}", status="ok") for n in range(40)]
    first = session.fitted_context()
    assert first[1] > 0  # older turns left out
    counted = decoder.counted
    for _ in range(5):  # typing pauses
        assert session.fitted_context() == first
    assert decoder.counted == counted
    session.turns.append(Turn("one more", "y = 1", status="ok"))
    assert session.fitted_context() != first and decoder.counted > counted
    session.settings = SessionSettings(prefix="", sample=SampleParams(max_new_tokens=16))
    assert session.fitted_context()[1] > first[1]  # a smaller budget: fitted again
