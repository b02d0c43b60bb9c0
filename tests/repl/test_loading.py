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
