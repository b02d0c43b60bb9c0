"""REPL latency, JSON lines out: start-up to the prompt (the installed command in a
pseudo-terminal) and step to first streamed text (the Session API, warm compilation cache).

    python bench/repl.py MODEL [MODEL...]     # checkpoint folders, e.g. from make_random_checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pexpect

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.decoders.local import LocalDecoder, default_cache_dir
from codegen_repl.model.sample_params import SampleParams

SCRIPT = str(Path(sys.executable).with_name("codegen-repl"))


def startup_to_prompt(model: str, folder: Path) -> float:
    """Seconds from launching `codegen-repl chat` to its prompt."""
    env = {**os.environ, "TERM": "xterm", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = pexpect.spawn(
        SCRIPT, ["chat", "--model", model, "--session", str(folder / "s.ipynb")],
        cwd=str(folder), env=env, encoding="utf-8", timeout=600, dimensions=(40, 120),
    )  # fmt: skip
    child.expect(">>>")
    seconds = time.perf_counter() - start
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    return seconds


def step_to_first_text(model: str, folder: Path, steps: int = 3) -> list[float]:
    """Seconds from submitting a step to its first streamed piece of code, per step."""
    decoder = LocalDecoder.load(model, compilation_cache=default_cache_dir() / "jax")
    settings = SessionSettings(sample=SampleParams(max_new_tokens=16))
    times = []
    with Executor(ExecutorConfig(cwd=folder)) as executor:
        session = Session(decoder, executor, settings=settings)
        for number in range(steps):
            times.append(first_text_seconds(session, f"Assign {number} to a variable."))
    return times


def first_text_seconds(session: Session, step: str) -> float:
    start = time.perf_counter()
    first: list[float] = []

    def on_text(_: str) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    session.step(step, on_text=on_text)
    return first[0] if first else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    for model in args.models:
        with tempfile.TemporaryDirectory() as folder:
            startup_to_prompt(model, Path(folder))  # fills the compilation cache
            startup = startup_to_prompt(model, Path(folder))
            first_text = step_to_first_text(model, Path(folder))
        print(json.dumps({
            "bench": "repl", "model": model, "startup_to_prompt_s": round(startup, 2),
            "step_to_first_text_s": [round(t, 3) for t in first_text],
        }))  # fmt: skip


if __name__ == "__main__":
    main()
