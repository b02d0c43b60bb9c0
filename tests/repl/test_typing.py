"""The step prefilled as it is typed: the terminal reader tells the input as it changes
(a real prompt_toolkit prompt on a pipe), and the REPL hands a step's text to the decoder,
which prefills it behind the prompt (a real LocalDecoder on the tiny checkpoint)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.repl.input import TYPING_INTERVAL, prompt_reader
from codegen_repl.repl.loop import Repl


def test_the_reader_tells_the_input_as_it_is_typed_and_not_after_enter(tmp_path: Path) -> None:
    told: list[str] = []
    with create_pipe_input() as keys, create_app_session(input=keys, output=DummyOutput()):
        read = prompt_reader(lambda: "", tmp_path / "history", told.append)

        def typist() -> None:
            for text in ("Import num", "py as", " np"):  # three bursts, a pause after each
                time.sleep(TYPING_INTERVAL * 3)
                keys.send_text(text)
            time.sleep(TYPING_INTERVAL * 3)
            keys.send_text("\r")

        thread = threading.Thread(target=typist)
        thread.start()
        line = read()
        thread.join()
        time.sleep(TYPING_INTERVAL * 3)  # nothing is told once the line is submitted
        assert line == "Import numpy as np"
        assert told == ["Import num", "Import numpy as", "Import numpy as np"]
        # a burst of keys is told once, TYPING_INTERVAL after its first key
        keys.send_text("x")
        second: list[str] = []
        thread = threading.Thread(target=lambda: second.append(read()))
        thread.start()
        time.sleep(TYPING_INTERVAL * 3)
        keys.send_text("\r")
        thread.join()
        assert second == ["x"] and told[-1] == "x"


def test_a_typed_step_is_prefilled_and_commands_are_not(
    tmp_path: Path, chat_checkpoint: Path
) -> None:
    decoder = LocalDecoder.load(chat_checkpoint)
    executor = Executor(ExecutorConfig(cwd=tmp_path))  # never started: no code runs here
    settings = SessionSettings(prefix="import os\n", sample=SampleParams(max_new_tokens=16))
    session = Session(decoder, executor, tmp_path / "s.ipynb", settings)  # a 128-token window
    repl = Repl(session, Console(file=io.StringIO()), "never")
    repl.typing("Make a list of the  numbers ")
    decoder.wait_prepared()
    # the step's comment line as far as typed (no line end yet: the step goes on)
    assert decoder._tokens == decoder.tokenizer.encode("import os\n# Make a list of the  numbers")
    for text in ("/undo", "!print(1)", "   "):  # nothing for the model: nothing prefilled
        repl.typing(text)
        decoder.wait_prepared()
        assert decoder._tokens == decoder.tokenizer.encode(
            "import os\n# Make a list of the  numbers"
        )
    full = decoder.tokenizer.encode("import os\n# Make a list of the numbers 1 to 5.\n")
    assert decoder.reused_tokens(full) >= len(decoder.tokenizer.encode("import os\n# Make"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_chat_command_hands_what_is_typed_to_the_repl(
    tmp_path: Path, chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`codegen-repl chat` on a terminal wires its prompt's typing to `Repl.typing` (the
    prompt itself is the test above's; here a reader that types one step and leaves)."""
    from codegen_repl.repl import chat
    from codegen_repl.repl import input as terminal_input

    told: list[object] = []

    def reader(toolbar: object, history: Path, on_typing: object = None) -> object:
        told.append(on_typing)

        def read() -> str:
            raise EOFError  # Ctrl-D

        return read

    monkeypatch.setattr(terminal_input, "prompt_reader", reader)
    monkeypatch.setattr("sys.stdin", _Terminal())
    monkeypatch.setattr("sys.stdout", _Terminal())
    monkeypatch.setenv("CODEGEN_REPL_DATA", str(tmp_path / "data"))
    options = chat.ChatOptions(model=str(chat_checkpoint), session=tmp_path / "s.ipynb")
    assert chat.run_chat(options, Console(file=io.StringIO())) == 0
    [on_typing] = told
    assert getattr(on_typing, "__func__", None) is Repl.typing
