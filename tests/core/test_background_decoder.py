"""BackgroundDecoder: the front ends' decoder while the model loads in a thread (a real
LocalDecoder loading a real checkpoint, held back by an event where a test needs it slow)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codegen_repl.core.decoding import BackgroundDecoder, Decoder, open_decoder
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.errors import CheckpointError
from codegen_repl.model.sample_params import SampleParams

SAMPLE = SampleParams(max_new_tokens=8)


def held_load(folder: Path, gate: threading.Event) -> BackgroundDecoder:
    def load() -> Decoder:
        assert gate.wait(60), "the test never let the load go on"
        return open_decoder(folder)  # in the load's thread: compiles while the weights load

    return BackgroundDecoder(load, "tiny", "load another model with /model NAME")


def eventually(condition, seconds: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return bool(condition())


def test_a_step_waits_for_the_load_visibly_then_decodes(chat_checkpoint: Path) -> None:
    gate, told, got = threading.Event(), list[str](), list[str]()
    decoder = held_load(chat_checkpoint, gate)
    decoder.on_status = told.append
    assert not decoder.loaded
    step = threading.Thread(target=lambda: got.extend(decoder.generate("import os\n", SAMPLE)))
    step.start()
    assert eventually(lambda: told == ["loading the model tiny …"])
    assert step.is_alive() and not got  # waiting, not decoding
    gate.set()
    step.join(120)
    assert decoder.loaded and not step.is_alive()
    assert "".join(got) == "".join(
        LocalDecoder.load(chat_checkpoint).generate("import os\n", SAMPLE)
    )


def test_prepare_asked_during_the_load_is_done_after_it(chat_checkpoint: Path) -> None:
    gate = threading.Event()
    decoder = held_load(chat_checkpoint, gate)
    decoder.prepare(lambda: "import math\n", SAMPLE)  # built once the model can count
    gate.set()
    loaded = decoder.wait()
    assert isinstance(loaded, LocalDecoder)
    loaded.wait_prepared()
    assert loaded._tokens == loaded.tokenizer.encode("import math\n")


def test_the_samples_asked_during_the_load_compile_while_the_weights_load(
    chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sample a session asks to prepare for (and one asked later) reaches the decoder
    before its weights are read: the weights are held until both programs have compiled."""
    from codegen_repl.model import checkpoint

    compiled: list[tuple[object, bool]] = []
    both = threading.Event()
    original = LocalDecoder._compile

    def spy(self: LocalDecoder, job: tuple, sample: SampleParams) -> None:
        original(self, job, sample)
        compiled.append((job, self.loaded))
        modes = {job[4] for job, _ in compiled if job[0] == "decode"}
        if len(modes) == 2:
            both.set()

    load_params = checkpoint.load_params

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert both.wait(120), f"no compile for both samples before the weights: {compiled}"
        return load_params(*args, **kwargs)

    monkeypatch.setattr(LocalDecoder, "_compile", spy)
    monkeypatch.setattr(checkpoint, "load_params", held)
    gate = threading.Event()
    decoder = held_load(chat_checkpoint, gate)
    decoder.prepare("", SAMPLE)  # greedy
    gate.set()
    assert eventually(lambda: any(job[0] == "decode" for job, _ in compiled), 120)
    decoder.prepare("", SampleParams(max_new_tokens=8, temperature=0.5))  # sampled
    decoder.wait()
    decodes = [(job, loaded) for job, loaded in compiled if job[0] == "decode"]
    assert len(decodes) == 2 and not any(loaded for _, loaded in decodes), decodes


EXIT_WHILE_LOADING = """
import sys
from codegen_repl.core.decoding import open_decoder
from codegen_repl.model.sample_params import SampleParams
decoder = open_decoder(sys.argv[1], background="hint")  # loads, and compiles early, in a thread
decoder.prepare("", SampleParams(max_new_tokens=8))
"""  # and exits at once, before the thread has imported the local decoder


def test_exiting_while_the_model_loads_and_compiles_is_clean(chat_checkpoint: Path) -> None:
    """The load thread imports the local decoder (and registers its exit handler) after the
    main thread has exited: the early compiles must still stop before Python finalizes (a
    thread inside XLA then aborts the process: 'FATAL: exception not rethrown', rc 134, in 2
    runs of 3 for 350M)."""
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_WHILE_LOADING, str(chat_checkpoint)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]


def test_a_model_that_is_not_there_fails_at_the_check_and_at_each_use(tmp_path: Path) -> None:
    decoder = open_decoder(tmp_path / "nothing", background="load another model with /model NAME")
    assert isinstance(decoder, BackgroundDecoder)
    with pytest.raises(CheckpointError, match="neither a folder nor a hub id"):
        decoder.checked()
    with pytest.raises(
        CheckpointError, match=r"neither a folder.*\(load another model with /model"
    ):
        decoder.generate("x = 1\n", SAMPLE)
    assert decoder.loaded  # ended: the next use raises at once


def test_wait_with_a_timeout_says_the_model_is_still_loading(chat_checkpoint: Path) -> None:
    gate = threading.Event()
    decoder = held_load(chat_checkpoint, gate)
    with pytest.raises(TimeoutError, match="the model tiny is still loading"):
        decoder.wait(timeout=0.05)
    gate.set()
    assert isinstance(decoder.wait(), LocalDecoder)


def test_ctrl_c_while_a_step_waits_for_the_load_stops_the_wait(chat_checkpoint: Path) -> None:
    import signal

    gate = threading.Event()
    decoder = held_load(chat_checkpoint, gate)
    main = threading.main_thread().ident
    assert main is not None
    # A real SIGINT to the main thread, as Ctrl-C sends (interrupt_main() would not wake a
    # blocked wait), while it waits on "loading the model".
    threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT)).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            list(decoder.generate("import os\n", SAMPLE))
    finally:
        gate.set()
    assert list(decoder.generate("import os\n", SAMPLE))  # the load went on: it decodes now
