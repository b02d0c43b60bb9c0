"""The kernel's start and a resume's replay behind the prompt (`Session.start_kernel`,
`Session.open(background=True)`), over real IPython kernels."""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from codegen_repl.core.commands import Commands
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session
from codegen_repl.errors import KernelError
from tests.core.test_interrupts import Shown
from tests.core.test_session import ScriptedDecoder

SLOW = "import time; time.sleep(3); x = 41"  # a turn whose replay takes a while


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    executor = Executor(ExecutorConfig(cwd=tmp_path))  # not started: the session starts it
    yield executor
    executor.shutdown()


def saved_session(tmp_path: Path, *codes: str) -> Path:
    path = tmp_path / "s.ipynb"
    with Executor(ExecutorConfig(cwd=tmp_path)) as executor:
        session = Session(ScriptedDecoder(), executor, path)
        for code in codes:
            session.run_code(code)
    return path


def test_a_resume_replays_behind_the_prompt_and_code_waits_for_it(tmp_path, executor) -> None:
    path = saved_session(tmp_path, SLOW, "y = x + 1")
    told: list[str] = []
    started = time.monotonic()
    session = Session.open(path, ScriptedDecoder(), executor, told.append, background=True)
    assert time.monotonic() - started < 2.5  # the replay sleeps 3 s: it was not waited for
    assert session.kernel_status  # "restarting ...", then "replaying 1/2: turn 1"
    assert told == []  # nothing is printed from behind the prompt
    turn = session.run_code("print(x, y)")
    assert turn.status == "ok" and turn.outputs[0]["text"] == "41 42\n"
    assert any(text.startswith("waiting for the kernel: replaying") for text in told), told
    assert session.kernel_status == "" and session.notice == "" and not session.new_notice


def test_a_replay_behind_the_prompt_that_falls_short_is_told_once(tmp_path, executor) -> None:
    path = saved_session(tmp_path, "x = 1", "y = 2")
    path.write_text(path.read_text().replace("y = 2", "1 / 0"))  # turn 2 now fails on replay
    session = Session.open(path, ScriptedDecoder(), executor, background=True)
    session.wait_kernel()
    assert session.new_notice and session.missing == (2,)
    assert "turn 2 raised ZeroDivisionError when replayed (division by zero)" in session.notice
    shown = Shown()
    commands = Commands(session, shown, run_mode="auto")
    commands.handle("/help")
    commands.handle("/help")
    warnings = [text for text in shown.texts if "the kernel lacks the state of turn 2" in text]
    assert len(warnings) == 1, shown.texts
    assert "/run 2" in warnings[0]


def test_ctrl_c_while_code_waits_stops_the_replay_and_keeps_the_turn(tmp_path, executor) -> None:
    path = saved_session(tmp_path, SLOW, "z = 2")
    session = Session.open(path, ScriptedDecoder(), executor, background=True)
    threading.Timer(1.0, _thread.interrupt_main).start()  # Ctrl-C, one second into the wait
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        session.run_code("print(x)")
    assert time.monotonic() - started < 6  # the replayed turn was interrupted, not waited out
    assert session.kernel_status == ""
    assert session.missing == (1, 2, 3) and "interrupted" in session.notice
    assert session.notice.endswith("turn 3 was not run")
    assert [turn.status for turn in session.turns] == ["ok", "ok", "skipped"]  # kept, unrun
    assert session.run_turn(3).status == "error"  # the kernel is live, without x (NameError)


def test_a_kernel_that_cannot_start_behind_the_prompt_says_so_at_first_use(
    tmp_path, executor, monkeypatch
) -> None:
    def broken() -> None:
        raise KernelError("no kernel: ipykernel is gone")

    monkeypatch.setattr(executor, "_launch", broken)
    session = Session(ScriptedDecoder(), executor, tmp_path / "s.ipynb")
    session.start_kernel(background=True)
    with pytest.raises(KernelError, match="ipykernel is gone"):
        session.run_code("print(1)")
    assert session.turns[0].code == "print(1)"  # kept, unrun: the code is not lost
    assert session.turns[0].status == "skipped" and "ipykernel is gone" in session.turns[0].message


def test_a_new_sessions_kernel_starts_behind_the_prompt(tmp_path, executor) -> None:
    session = Session(ScriptedDecoder(), executor, tmp_path / "s.ipynb")
    session.start_kernel(background=True)
    assert session.kernel_status == "starting"
    assert session.run_code("print(6 * 7)").outputs[0]["text"] == "42\n"


STUBBORN = """import os, time
while not os.path.exists({flag!r}):
    try:
        time.sleep(0.05)
    except KeyboardInterrupt:
        pass
stubborn = 1"""


def test_a_replayed_turn_that_ignores_the_interrupt_does_not_hold_the_prompt(tmp_path) -> None:
    flag = tmp_path / "go"
    flag.touch()
    path = saved_session(tmp_path, "x0 = 1", STUBBORN.format(flag=str(flag)), "after = 2")
    flag.unlink()  # replayed now, the turn loops and swallows every KeyboardInterrupt
    executor = Executor(ExecutorConfig(cwd=tmp_path, interrupt_grace=1.0))
    try:
        session = Session.open(path, ScriptedDecoder(), executor, background=True)
        deadline = time.monotonic() + 60
        while "replaying 2/3" not in session.kernel_status and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        session.stop_kernel_work()  # as /undo, /load or Ctrl-D do
        assert time.monotonic() - started < 30  # the grace, a restart: not forever
        assert session.missing == (2, 3) and "turn 2" in session.notice
        session.new_notice = False  # as the front end does once it has told the notice
        assert executor.alive and session.run_code("print(x0 + 1)").outputs[0]["text"] == "2\n"
    finally:
        executor.shutdown()


def test_code_entered_while_a_replay_falls_short_waits_and_is_kept_unrun(tmp_path) -> None:
    path = saved_session(tmp_path, SLOW, "q = 1")
    path.write_text(path.read_text().replace("q = 1", "1 / 0"))  # turn 2 now fails on replay
    executor = Executor(ExecutorConfig(cwd=tmp_path))
    try:
        session = Session.open(path, ScriptedDecoder(), executor, background=True)
        with pytest.raises(KernelError, match="lacks the state of turn 2"):
            session.run_code("print(x)")  # typed during the replay: it would run without turn 2
        assert session.turns[2].status == "skipped"
        assert "lacks the state of turn 2" in session.turns[2].message
        assert session.new_notice  # the front end tells the notice next (once)
    finally:
        executor.shutdown()
