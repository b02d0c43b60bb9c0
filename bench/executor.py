"""Executor benchmarks, JSON lines out: kernel start, trivial-cell round trip, replay.

python bench/executor.py [--cells 200] [--turns 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from codegen_repl.core.executor import Executor, ExecutorConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--turns", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        executor = Executor(ExecutorConfig(cwd=Path(folder)))
        start = time.perf_counter()
        executor.start()
        started = time.perf_counter() - start
        with executor:
            round_trips = []
            for i in range(args.cells):
                start = time.perf_counter()
                executor.run(f"x = {i}")
                round_trips.append(time.perf_counter() - start)
            turns = [f"v{i} = [n * {i} for n in range(1000)]" for i in range(args.turns)]
            start = time.perf_counter()
            executor.restart(replay=turns)
            replayed = time.perf_counter() - start
    print(json.dumps({
        "bench": "executor",
        "kernel_start_s": round(started, 3),
        "trivial_cell_median_ms": round(1000 * statistics.median(round_trips), 2),
        "trivial_cell_p90_ms": round(1000 * sorted(round_trips)[int(0.9 * len(round_trips))], 2),
        "restart_and_replay_s": round(replayed, 3),
        "replayed_turns": args.turns,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
