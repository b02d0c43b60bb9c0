"""The compact JSON summary that bench/gpu.sh prints last: the steps (exit codes, seconds), the
test counts and failures, and every benchmark line of $OUT/*.jsonl without the bulky fields.

    python bench/gpu_summary.py OUT_DIR [ELAPSED_S]
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

BULKY = {"machine", "runs_s", "ops", "label", "folder"}


def records(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file (other lines are skipped)."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return found


def compact(record: dict) -> dict:
    return {
        key: round(value, 3 if abs(value) < 10 else 1) if isinstance(value, float) else value
        for key, value in record.items()
        if key not in BULKY
    }


def tests(path: Path) -> dict:
    """Counts from pytest's junit XML, and the names of the failed tests."""
    if not path.exists():
        return {"missing": path.name}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return {"unreadable": path.name}
    failed = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failed[:20]}


# issue 18's goals: (size, batch) -> tokens/s at least; the 512-token 350M prefill at most 3 ms
GOALS = {("350M", 1): 1500, ("350M", 8): 8000, ("16B", 1): 110}


def goals(lines: list[dict]) -> dict:
    """The best codegen-repl number of each goal's configuration, against the goal."""
    result: dict = {}
    for (size, batch), goal in GOALS.items():
        speeds = [
            line["tokens_per_s"]
            for line in lines
            if line.get("size") == size and line.get("batch") == batch
            and str(line.get("impl", "")).startswith("codegen-repl") and "tokens_per_s" in line
        ]  # fmt: skip
        best = max(speeds, default=None)
        result[f"{size} b{batch} tok/s"] = {
            "best": best and round(best, 1), "goal": goal, "met": best is not None and best >= goal
        }  # fmt: skip
    prefills = [
        line["prefill_ms"]
        for line in lines
        if line.get("size") == "350M" and line.get("impl") == "codegen-repl prefill"
    ]
    best = min(prefills, default=None)
    result["350M prefill 512 ms"] = {
        "best": best and round(best, 2), "goal": 3.0, "met": best is not None and best <= 3.0
    }  # fmt: skip
    return result


def summary(out: Path, elapsed: str | None) -> dict:
    result: dict = {"elapsed_s": int(elapsed) if elapsed else None}
    gpu = out / "gpu.txt"
    if gpu.exists():
        result["device"] = " | ".join(gpu.read_text(errors="replace").split("\n")[1:3])[:300]
    result["steps"] = records(out / "steps.jsonl") if (out / "steps.jsonl").exists() else []
    result["tests"] = tests(out / "tests.xml")
    decode: list[dict] = []
    for path in sorted(out.glob("*.jsonl")):
        if path.name != "steps.jsonl":
            result[path.stem] = [compact(record) for record in records(path)]
            if path.stem.startswith("decode"):
                decode += records(path)
    result["goals"] = goals(decode)
    return result


if __name__ == "__main__":
    print(json.dumps(summary(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)))
