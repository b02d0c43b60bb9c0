"""The REPL while its model loads in the background: the prompt's toolbar never waits for it."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

from rich.console import Console

from codegen_repl.core.decoding import BackgroundDecoder
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.repl.loop import Repl


def test_the_toolbar_says_loading_instead_of_waiting(tmp_path: Path, chat_checkpoint: Path) -> None:
    gate = threading.Event()

    def load() -> LocalDecoder:
        assert gate.wait(60), "the test never let the load go on"
        return LocalDecoder.load(chat_checkpoint)

    decoder = BackgroundDecoder(load, "tiny")
    session = Session(decoder, Executor(ExecutorConfig(cwd=tmp_path)))  # kernel not started
    repl = Repl(session, Console(file=io.StringIO()), model_name="tiny")
    assert " · loading the model · " in repl.toolbar()  # at once, while the load is held
    gate.set()
    decoder.wait()
    assert re.search(r" · context \d+/128 tokens · ", repl.toolbar())


def test_the_toolbar_says_what_the_kernel_does_behind_the_prompt(tmp_path: Path) -> None:
    from tests.core.test_session import ScriptedDecoder

    path = tmp_path / "s.ipynb"
    with Executor(ExecutorConfig(cwd=tmp_path)) as first:
        saved = Session(ScriptedDecoder(), first, path)
        saved.run_code("import time; time.sleep(2)")
        saved.run_code("1 / 0")
        saved.turns[1].status = "ok"  # as if it had run: its replay now fails
        saved.save()
    executor = Executor(ExecutorConfig(cwd=tmp_path))
    try:
        session = Session.open(path, ScriptedDecoder(), executor, background=True)
        repl = Repl(session, Console(file=io.StringIO()), model_name="scripted")
        assert re.search(r" · kernel (restarting|replaying 1/2: turn 1)", repl.toolbar())
        session.wait_kernel()
        assert " · kernel up (lacks the state of turn 2) · " in repl.toolbar()
    finally:
        executor.shutdown()
