"""KernelRunner over a real child kernel; a scripted decoder stands in for the model where the
test is about timing (a generation that an interrupt stops half-way)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from codegen_repl.errors import CheckpointError
from codegen_repl.kernel.runner import KernelRunner, RunnerOptions
from codegen_repl.model.sample_params import SampleParams


class SlowDecoder:
    """Writes `x = 1` one character every `pause` seconds; counts what it was asked."""

    max_context = 2048

    def __init__(self, pause: float = 0.0) -> None:
        self.pause = pause
        self.prompts: list[str] = []
        self.started = threading.Event()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        self.prompts.append(prompt)
        self.started.set()
        for char in "x = 1" * (50 if self.pause else 1):
            time.sleep(self.pause)
            yield char

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        return ["".join(self.generate(prompt, sample))]


class Collected:
    """A Frontend that keeps everything it is sent."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def stream(self, name: str, text: str) -> None:
        self.events.append(("stream", (name, text)))

    def output(self, output: dict[str, Any]) -> None:
        self.events.append(("output", output))

    def show_code(self, code: str, final: bool) -> None:
        self.events.append(("code", (code, final)))

    def display(self, bundle: dict[str, str]) -> None:
        self.events.append(("display", bundle))

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        self.events.append(("error", (ename, evalue)))

    def kinds(self, kind: str) -> list[Any]:
        return [value for name, value in self.events if name == kind]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[KernelRunner]:
    decoder = SlowDecoder()
    options = RunnerOptions(model="scripted", cwd=tmp_path, session_path=tmp_path / "s.ipynb")
    running = KernelRunner(options, load_decoder=lambda name: decoder)
    try:
        yield running
    finally:
        running.shutdown()


def test_a_step_streams_its_code_then_runs_it_and_autosaves(runner, tmp_path) -> None:
    frontend = Collected()
    assert runner.run_cell("Set x.", frontend).status == "ok"
    codes = frontend.kinds("code")
    assert codes[0] == ("", False) and codes[-1] == ("x = 1", True)
    assert runner.run_cell("!x + 1", frontend).status == "ok"
    assert frontend.kinds("output")[-1]["data"]["text/plain"] == "2"
    assert (tmp_path / "s.ipynb").read_text().count("x = 1") == 1


def test_an_interrupt_stops_the_generation_and_drops_the_turn(tmp_path) -> None:
    decoder = SlowDecoder(pause=0.05)
    options = RunnerOptions(model="scripted", cwd=tmp_path)
    runner = KernelRunner(options, load_decoder=lambda name: decoder)
    try:
        frontend = Collected()

        def stop_mid_generation() -> None:
            decoder.started.wait(30)
            time.sleep(0.3)  # a few characters in
            runner.interrupt()

        stopper = threading.Thread(target=stop_mid_generation)
        stopper.start()
        outcome = runner.run_cell("Set x slowly.", frontend)
        stopper.join()
        assert (outcome.status, outcome.ename) == ("error", "KeyboardInterrupt")
        assert "partial code was dropped" in outcome.evalue
        assert runner.session is not None and runner.session.turns == []
        assert frontend.kinds("code")[-1][1] is True  # the display is finished, not "writing"
        assert runner.run_cell("%%python\nprint('still here')", frontend).status == "ok"
    finally:
        runner.shutdown()


def test_a_model_that_failed_to_load_is_reported_in_the_cell(tmp_path) -> None:
    def fail(name: str) -> SlowDecoder:
        raise CheckpointError(f"{name} is neither a folder nor a hub id")

    runner = KernelRunner(RunnerOptions(model="no/such", cwd=tmp_path), load_decoder=fail)
    try:
        frontend = Collected()
        outcome = runner.run_cell("Print 1.", frontend)
        assert outcome.ename == "CheckpointError" and "%model NAME" in outcome.evalue
        assert runner.run_cell("%%python\n1 + 1", frontend).status == "ok"
    finally:
        runner.shutdown()


def test_magics_set_retry_save_context_and_help(runner, tmp_path) -> None:
    frontend = Collected()
    assert runner.run_cell("%set run=never", frontend).status == "ok"
    assert runner.run_cell("Set x.", frontend).status == "ok"
    assert "(not run: run=never" in frontend.kinds("stream")[-1][1]
    refused = runner.run_cell("%set run=ask", frontend)
    assert refused.ename == "UsageError" and "run=auto or run=never" in refused.evalue
    assert runner.run_cell("%set run=auto\n%retry", frontend).status == "ok"
    assert "retried with seed 1: the same code as before" in frontend.kinds("stream")[-1][1]
    session = runner.session
    assert session is not None and [t.status for t in session.turns] == ["ok"]
    assert session.turns[0].sample["seed"] == 1  # a retry samples with the next seed
    assert runner.run_cell("%save prog.py", frontend).status == "ok"
    assert (tmp_path / "prog.py").read_text().endswith("# Set x.\nx = 1\n\n")
    assert runner.run_cell("%context", frontend).status == "ok"
    assert frontend.kinds("display")[-1]["text/plain"] == session.program()
    assert runner.run_cell("%help", frontend).status == "ok"
    shown = frontend.kinds("stream")[-1][1]
    for name in ("help", "undo", "drop", "retry", "edit", "run", "fix", "keep", "mtpb"):
        assert len(re.findall(rf"^  %{name}\b", shown, re.MULTILINE)) == 1, name
    assert "`" not in shown and "%exit" not in shown
    bad = runner.run_cell("%mtpb one", frontend)
    assert bad.ename == "UsageError" and "%mtpb N [K]" in bad.evalue
    mixed = runner.run_cell("Print x.\n!print(x)", frontend)
    assert mixed.ename == "UsageError" and "`" not in mixed.evalue


def test_undo_shows_its_progress_and_an_interrupt_says_what_is_missing(runner) -> None:
    frontend = Collected()
    for number in (1, 2, 3):
        assert runner.run_cell(f"%%python\nv_{number} = {number}", frontend).status == "ok"

    class Interrupting(Collected):
        def stream(self, name: str, text: str) -> None:
            super().stream(name, text)
            if text.startswith("replaying 2/"):
                runner.interrupt()  # as the kernel's interrupt_request does, from its thread

    shown = Interrupting()
    stopped = runner.run_cell("%undo", shown)  # fails as an interrupted cell: Run All stops
    assert (stopped.status, stopped.ename) == ("error", "KeyboardInterrupt")
    texts = [text for _, text in shown.kinds("stream")]
    assert texts[:3] == ["restarting the kernel to replay 2 turns\n", "replaying 1/2: turn 1\n",
                         "replaying 2/2: turn 2\n"]  # fmt: skip
    assert texts[3] == "undone: turn 3 (your code)\n"
    assert texts[4] == ("the replay was interrupted: the kernel lacks the state of turn 2; to "
                        "replay it: %run 2\n")  # fmt: skip
    assert runner.run_cell("%run 2", frontend).status == "ok"
    assert runner.run_cell("%%python\nprint(v_1 + v_2)", frontend).status == "ok"
    assert frontend.kinds("output")[-1]["text"] == "3\n"


def test_input_in_the_kernel_is_one_line_saying_no_one_can_answer(runner) -> None:
    frontend = Collected()
    outcome = runner.run_cell("%%python\nname = input('name? ')", frontend)
    assert outcome.ename == "StdinNotImplementedError" and len(outcome.traceback) == 1
    assert "cannot be answered here" in outcome.traceback[0]
