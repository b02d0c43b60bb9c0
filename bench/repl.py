"""REPL latency as a person sees it, JSON lines out: the real `codegen-repl chat` in a
pseudo-terminal (pexpect), typed into like a person who takes `--think` seconds per step: a
key at a time, evenly spread over them (`--paste`: the whole step at once after them, as the
numbers before typed prefill were measured).

Per model and compile cache (cold: an empty JAX compilation cache; warm: the one the cold run
left), one JSON line: start-up to the prompt, per turn Enter -> first code text on screen and
Enter -> turn done (the next prompt), resume of the session to the prompt and the first turn
after it; next to the numbers issue 16 measured before (`before`).

    python bench/repl.py                       # tiny trained model and 350M shape, ~10 minutes
    python bench/repl.py --models 350M --turns 5 --runs 3

"first code text" is the first highlighted code character the REPL draws after Enter (rich's
Syntax colours: ESC[<fg>;49m); the tiny model runs its code (`--yes`), the 350M-shaped one has
random weights, so its code is shown but never run (`--run never`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pexpect

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))  # tests.trained builds the tiny trained model

SCRIPT = str(Path(sys.executable).with_name("codegen-repl"))
ASCII_BIAS = 10.0  # logits of random 350M weights spread about +-2: the bias decides
PROMPT = re.compile(re.escape(b">>>"))
CODE = re.compile(rb"\x1b\[\d+;49m[^\x1b\r\n ]")  # a highlighted code character
# The tiny model writes known code for these steps (tests/trained.py); none loops or fails.
TINY_STEPS = ["say hello", "define add", "use add", "make squares", "count to three"]
# MTPB-style steps, at most 50 characters: the random checkpoint's tokenizer has no merges, so
# a character is a token, and a turn's new text must stay within the 64 tokens the decoder
# prepares for (decoders/local.py STEP_TOKENS; with CodeGen's BPE, 64 tokens are ~250 chars).
MTPB_STEPS = [
    "Import numpy as np.",
    "Make a list 'values' of the integers 1 to 20.",
    "Assign the mean of 'values' to 'mean'.",
    "Define scale(x, factor) returning x * factor.",
    "Scale every element of 'values' by 3.",
    "Keep only the even numbers.",
    "Sort them in descending order.",
    "Map each number to its square in a dict.",
    "Print the sum of the dict's values.",
    "Print the largest scaled number.",
]
# Issue 16's table (350M shape, 2-core CPU, five turns, 128 new tokens), seconds.
BEFORE_350M = {
    "startup_to_prompt_s": {"cold": 7.0, "warm": 7.0},
    "first_text_s": {"cold": [5.2, 5.0, 2.0, 4.9, 0.44], "warm": [2.3, 1.9, 1.0, 1.9, 0.46]},
    "resume_to_prompt_s": {"cold": 17.0},
}


class Terminal:
    """One `codegen-repl chat` in a pseudo-terminal, with every byte it writes timestamped."""

    def __init__(self, args: list[str], folder: Path, cache: Path) -> None:
        env = {**os.environ, "TERM": "xterm", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
               "CODEGEN_REPL_CACHE": str(cache), "XDG_DATA_HOME": str(folder),
               "PROMPT_TOOLKIT_NO_CPR": "1"}  # fmt: skip
        self.start = time.perf_counter()
        self.child = pexpect.spawn(
            SCRIPT, ["chat", *args], cwd=str(folder), env=env, timeout=600, dimensions=(50, 160)
        )
        self.seen = b""

    def wait_for(self, pattern: re.Pattern[bytes], after: int, limit: float) -> tuple[float, int]:
        """Seconds since `start` at which `pattern` shows up in the output past byte `after`,
        and where it ends."""
        end = time.perf_counter() + limit
        while time.perf_counter() < end:
            found = pattern.search(self.seen, after)
            if found:
                return time.perf_counter() - self.start, found.end()
            try:
                self.seen += self.child.read_nonblocking(1 << 16, timeout=0.02)
            except pexpect.TIMEOUT:
                continue
        raise TimeoutError(f"no {pattern.pattern!r} within {limit} s; the screen ends with "
                           f"{self.seen[-400:]!r}")  # fmt: skip

    def turn(self, step: str, think: float, typed: bool) -> tuple[float, float, float]:
        """Type `step` over `think` seconds (`typed`: a key at a time, evenly spread, as a
        person types; else all at once after them), then Enter: (Enter -> first code text,
        Enter -> next prompt, the longest wait for the screen to answer a key)."""
        self.drain()
        echo = 0.0
        if typed:
            gap = think / len(step)
            for key in step:
                sent = time.perf_counter()
                self.child.send(key)
                echo = max(echo, self.answer(sent))
                time.sleep(max(0.0, sent + gap - time.perf_counter()))
        else:
            time.sleep(think)
        self.drain()
        mark = len(self.seen)
        self.child.send(step if not typed else "")
        self.child.send("\r")
        enter = time.perf_counter() - self.start
        first, at = self.wait_for(CODE, mark, 600)
        done, _ = self.wait_for(PROMPT, at, 600)
        return first - enter, done - enter, echo

    def answer(self, sent: float) -> float:
        """Seconds from `sent` to the next bytes on the screen (the key's echo; a frozen
        prompt writes nothing, not even its toolbar's redraw)."""
        while True:
            try:
                self.seen += self.child.read_nonblocking(1 << 16, timeout=60)
                return time.perf_counter() - sent
            except pexpect.TIMEOUT:
                return 60.0

    def drain(self) -> None:
        try:
            while True:
                self.seen += self.child.read_nonblocking(1 << 16, timeout=0.05)
        except pexpect.TIMEOUT:
            pass

    def close(self) -> None:
        self.child.sendcontrol("d")
        self.child.expect(pexpect.EOF, timeout=120)


def session_run(model: Path, steps: list[str], options: list[str], cache: Path, think: float,
                folder: Path, typed: bool) -> dict:  # fmt: skip
    """A new session of `steps`, then its resume with one more step: the timings."""
    session = folder / "bench.ipynb"
    session.unlink(missing_ok=True)
    args = ["--model", str(model), "--session", str(session), "--temperature", "0",
            "--max-new-tokens", "128", *options]  # fmt: skip
    repl = Terminal(args, folder, cache)
    startup, _ = repl.wait_for(PROMPT, 0, 600)
    turns = []
    for number, step in enumerate(steps, 1):
        turns.append(repl.turn(step, think, typed))
        print(f"turn {number}: first text {turns[-1][0]:.2f} s, done {turns[-1][1]:.2f} s, "
              f"echo {turns[-1][2]:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    repl.close()
    resumed = Terminal(args, folder, cache)
    resume, _ = resumed.wait_for(PROMPT, 0, 600)
    after_resume = resumed.turn(steps[0], think, typed)
    resumed.close()
    return {
        "startup_to_prompt_s": round(startup, 2),
        "first_text_s": [round(first, 2) for first, _, _ in turns],
        "turn_done_s": [round(done, 2) for _, done, _ in turns],
        "key_echo_max_s": round(max(echo for _, _, echo in turns), 2),
        "resume_to_prompt_s": round(resume, 2),
        "after_resume_first_text_s": round(after_resume[0], 2),
    }


def spread(runs: list[dict]) -> dict:
    """The median of each number over the runs, and the runs themselves."""
    first = runs[0]
    median: dict = {}
    for key, value in first.items():
        if isinstance(value, list):
            median[key] = [round(statistics.median(r[key][i] for r in runs), 2)
                           for i in range(len(value))]  # fmt: skip
        else:
            median[key] = round(statistics.median(r[key] for r in runs), 2)
    return {"median": median, "runs": runs}


def tiny_model(folder: Path) -> Path:
    """The tiny trained model of the tests (trained once, about a minute, then reused)."""
    checkpoint = folder / "checkpoint"
    if not (checkpoint / "config.json").exists():
        from tests.trained import build_trained_checkpoint

        build_trained_checkpoint(folder)
    return checkpoint


def random_350m(folder: Path) -> Path:
    """bench/make_random_checkpoint.py's 350M shape, with `lm_head.bias` raised by ASCII_BIAS
    on the tokens of printable ASCII, space and newline. Its tokenizer has no merges and
    placeholder tokens (`<fill_123>`, 11 characters): unbiased, 128 new tokens come back as
    ~1,400 tokens of context, where real code keeps its length. Biased, the text re-tokenizes
    to what was written and the session grows ~150 tokens a turn, as in the issue."""
    from make_random_checkpoint import make_random_checkpoint
    from safetensors.numpy import load_file, save_file

    from codegen_repl.model.tokenizer import CodeGenTokenizer

    out = folder.with_name(folder.name + "-ascii")
    if (out / "model.safetensors").exists():
        return out
    source = make_random_checkpoint(folder, "350M")
    out.mkdir(parents=True, exist_ok=True)
    tensors = load_file(source / "model.safetensors")
    tokenizer = CodeGenTokenizer.from_dir(source)
    ids = sorted({tokenizer.encode(chr(c))[0] for c in [10, *range(32, 127)]})
    tensors["lm_head.bias"][ids] += ASCII_BIAS
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (out / file.name).write_bytes(file.read_bytes())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny,350M", help="tiny and/or 350M")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--think", type=float, default=5.0, help="seconds before each step")
    parser.add_argument("--runs", type=int, default=1, help="runs per model and cache")
    paste = "send each step at once after --think seconds, not typed over them"
    parser.add_argument("--paste", action="store_true", help=paste)
    parser.add_argument("--checkpoints", type=Path,
                        default=Path(tempfile.gettempdir()) / "bench_ckpt")  # fmt: skip
    args = parser.parse_args()
    for name in args.models.split(","):
        if name == "tiny":
            model, steps, options = (
                tiny_model(args.checkpoints / "tiny-trained"),
                TINY_STEPS,
                ["--yes"],
            )
        else:
            model, steps, options = (
                random_350m(args.checkpoints / "350M"),
                MTPB_STEPS,
                ["--run", "never"],
            )
        turns = [steps[i % len(steps)] for i in range(args.turns)]
        results: dict[str, list[dict]] = {"cold": [], "warm": []}
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory() as scratch:
                folder, cache = Path(scratch), Path(scratch) / "cache"
                for kind in ("cold", "warm"):  # warm: the cache the cold run filled
                    results[kind].append(
                        session_run(
                            model, turns, options, cache, args.think, folder, not args.paste
                        )
                    )
        for kind, runs in results.items():
            record = {"bench": "repl", "model": name, "compile_cache": kind, "turns": args.turns,
                      "think_s": args.think, "typed": not args.paste, "new_tokens": 128,
                      "load_avg_1m": os.getloadavg()[0], **spread(runs)}  # fmt: skip
            if name == "350M":
                record["before"] = {key: value.get(kind) for key, value in BEFORE_350M.items()}
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
