"""Ctrl-C at any moment of an undo or a kernel restart, with a real kernel: the session always
has a live kernel whose state matches the turns it lists, except for the turns it names as
missing, and an interrupted undo happened completely or not at all.

The Ctrl-C is `_thread.interrupt_main` (SIGINT's effect in the main thread) from a timer, at
delays that fall before, during and after the restart and each replayed turn."""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbformat

from codegen_repl.core.commands import Commands
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.notebook_commands import missing_text
from codegen_repl.core.session import Session, SessionSettings, Turn
from tests.core.test_session import ScriptedDecoder

TURNS = 4
DELAYS_S = (0.0, 0.02, 0.1, 0.25, 0.5, 0.8, 1.1, 1.5, 2.0, 3.0)  # for a restart
# Ctrl-C during an undo: at these fractions of the time an uninterrupted undo takes, so the
# moments fall before, in the restart, in each replayed turn and after, however loaded the
# machine is.
UNDO_FRACTIONS = (0.0, 0.03, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97, 1.1)


def interrupted(action: Callable[[], object], delay: float) -> bool:
    """Run `action` with a Ctrl-C after `delay` seconds; whether a KeyboardInterrupt came out
    (also one that lands just after the action returned)."""
    timer = threading.Timer(delay, _thread.interrupt_main)
    try:
        try:
            timer.start()
            action()
        finally:
            timer.cancel()
            timer.join()
            time.sleep(0.01)  # a Ctrl-C that fired at the very end lands here
    except KeyboardInterrupt:
        return True
    return False


def names_in_kernel(executor: Executor) -> set[str]:
    result = executor.run("print(' '.join(sorted(k for k in globals() if k.startswith('v_'))))")
    assert result.status == "ok", result
    return set(result.outputs[-1]["text"].split())


def fresh_session(executor: Executor, path: Path) -> Session:
    executor.restart()
    session = Session(ScriptedDecoder(), executor, path, SessionSettings(prefix=""))
    for number in range(1, TURNS + 1):
        session.run_code(f"import time\ntime.sleep(0.15)\nv_{number} = {number}")
    return session


def test_ctrl_c_anywhere_in_an_undo_keeps_turns_and_kernel_consistent(tmp_path: Path) -> None:
    path = tmp_path / "s.ipynb"
    outcomes = set()
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = fresh_session(executor, path)
        started = time.monotonic()
        session.undo()
        undo_s = time.monotonic() - started
        for fraction in UNDO_FRACTIONS:
            delay = fraction * undo_s
            session = fresh_session(executor, path)
            escaped = interrupted(session.undo, delay)
            listed = len(session.turns)
            assert listed in (TURNS, TURNS - 1), "an undo drops exactly one turn, or none"
            saved = nbformat.read(str(path), as_version=4)
            assert len(saved.cells) == listed, "the file says what the session says"
            assert executor.alive, f"no kernel after a Ctrl-C at {delay} s"
            expected = {f"v_{n}" for n in range(1, listed + 1) if n not in session.missing}
            assert names_in_kernel(executor) == expected, (delay, session.notice)
            if session.missing:
                assert missing_text(session).endswith(
                    " then ".join(f"/run {n}" for n in session.missing)
                )
            outcomes.add((escaped, listed, bool(session.missing)))
    assert len(outcomes) >= 2, f"the delays should hit different moments: {outcomes}"
    assert (False, TURNS - 1, True) in outcomes, "some Ctrl-C should stop a replay"


def test_ctrl_c_anywhere_in_a_restart_leaves_a_live_kernel(tmp_path: Path) -> None:
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        for delay in DELAYS_S[:7]:
            interrupted(executor.restart, delay)
            assert executor.alive, f"no kernel after a Ctrl-C at {delay} s"
            assert executor.run("1 + 1").status == "ok"


class Shown:
    """A Frontend that records what it is given."""

    prefix, can_ask = "/", False

    def __init__(self, on_progress: Callable[[str], None] = lambda text: None) -> None:
        self.texts: list[str] = []
        self.progressed: list[str] = []
        self.on_progress = on_progress

    def show_text(self, text: str, style: str = "plain") -> None:
        self.texts.append(text)

    def progress(self, text: str) -> None:
        self.progressed.append(text)
        self.on_progress(text)

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def test_an_undo_stopped_mid_replay_says_what_the_kernel_lacks(tmp_path: Path) -> None:
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = fresh_session(executor, tmp_path / "s.ipynb")

        def stop_at_the_second(text: str) -> None:
            if text.startswith("replaying 2/"):
                session.request_stop()

        shown = Shown(stop_at_the_second)
        commands = Commands(session, shown, run_mode="auto")
        commands.handle("/undo")
        assert shown.progressed[:2] == ["restarting the kernel to replay 3 turns",
                                        "replaying 1/3: turn 1"]  # fmt: skip
        assert shown.texts[0] == "undone: turn 4 (your code)"
        assert shown.texts[1] == ("the replay was interrupted: the kernel lacks the state of "
                                  "turns 2, 3; to replay them: /run 2 then /run 3")  # fmt: skip
        assert names_in_kernel(executor) == {"v_1"}
        commands.handle("/run 2")
        commands.handle("/run 3")
        assert names_in_kernel(executor) == {"v_1", "v_2", "v_3"} and session.missing == ()


def test_waiting_out_a_kernel_that_ignores_the_interrupt_is_shown(tmp_path: Path) -> None:
    config = ExecutorConfig(cwd=tmp_path, inline_matplotlib=False, interrupt_grace=1.0)
    with Executor(config) as executor:
        progress: list[str] = []
        executor.on_progress = progress.append
        assert executor.run("kept = 1").status == "ok"
        stubborn = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass"
        result = executor.run(stubborn, timeout=1.0)
        assert result.status == "timeout" and result.restarted
        assert progress == [
            "interrupting the kernel; waiting up to 1 s for the code to stop",
            "the kernel did not stop within 1 s of the interrupt; restarting it and replaying "
            "1 turn",
        ]
        assert executor.run("print(kept)").outputs[0]["text"] == "1\n"


def test_a_replace_stopped_mid_replay_keeps_the_new_code_unrun(tmp_path: Path) -> None:
    """A cell run again (or /retry) whose rebuild is stopped: the new code is kept, "skipped"
    (`/run N` runs it), not left "pending" as if it were still to be decided."""
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = fresh_session(executor, tmp_path / "s.ipynb")

        def stop_at_the_second(text: str) -> None:
            if text.startswith("replaying 2/"):
                session.request_stop()

        session.on_progress = stop_at_the_second
        session.replace(4, Turn(None, "print('new')"))
        assert session.turns[3].status == "skipped" and session.turns[3].code == "print('new')"
        assert session.missing == (2, 3, 4)
