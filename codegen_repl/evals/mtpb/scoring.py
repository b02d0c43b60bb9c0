"""MTPB scoring: one program's verdict (`score_program`) and a samples file's report
(`evaluate`), both by the same sandbox checker, so a live session and an offline evaluation of
the same program always agree.

Samples files are salesforce/CodeGen `mtpb_sample.py`'s: one JSON line per problem x input x
sample with `id`, `input`, `gold_output`, `completions` (the whole program from the prefix on)
and `prompts_completions` (its pieces, in order; they join to `completions`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from codegen_repl.errors import ConfigError
from codegen_repl.evals.jsonl import write_json_atomic
from codegen_repl.evals.mtpb.problems import Problem
from codegen_repl.evals.mtpb.rules import CHECKER, TIME_LIMIT_S, Corrections
from codegen_repl.evals.passk import mean_pass_at_k
from codegen_repl.evals.sandbox import Job, Outcome, Sandbox, SandboxConfig


@dataclasses.dataclass(frozen=True)
class Result:
    """One program's verdict: `got` is the repr of the last printed value (None if none)."""

    passed: bool
    got: str | None
    expected: Any
    detail: str
    status: str = "passed"


_ALARM_MARGIN_S = 2.0  # the child's start and the comparison, after the program's time limit


def default_sandbox() -> SandboxConfig:
    """MTPB programs import numpy (and often pandas): preload both. The reference gives a
    program 20 s (`time_limit(20)`), then judges what it printed: the wall limit leaves room."""
    return SandboxConfig(timeout_s=TIME_LIMIT_S + _ALARM_MARGIN_S, preload=("numpy", "pandas"))


def job(
    program: str, expected: Any, config: SandboxConfig, corrections: Corrections | None = None
) -> Job:
    """The sandbox job judging `program` against `expected`: the program's own time limit
    (after which, as in the reference, what it printed is judged) is the reference's 20 s, or
    less when the sandbox's wall limit is shorter (then it ends `_ALARM_MARGIN_S` before)."""
    time_limit = min(TIME_LIMIT_S, max(config.timeout_s - _ALARM_MARGIN_S, config.timeout_s / 2))
    payload = {"expected": expected, "time_limit_s": time_limit,
               "corrections": (corrections or Corrections()).to_json()}  # fmt: skip
    return Job(program, CHECKER, payload)


def score_program(
    program: str,
    problem: Problem,
    index: int,
    config: SandboxConfig | None = None,
    corrections: Corrections | None = None,
) -> Result:
    """MTPB's verdict on one program (e.g. `Session.program()` after a replay)."""
    config = dataclasses.replace(config or default_sandbox(), workers=1)
    with Sandbox(config) as sandbox:
        outcome = sandbox.run_one(job(program, problem.expected(index), config, corrections))
    return _result(outcome, problem.expected(index))


def _result(outcome: Outcome, expected: Any) -> Result:
    got = outcome.result.get("got")
    return Result(outcome.passed, got, expected, outcome.detail, outcome.status)


def record_program(record: dict[str, Any]) -> str:
    """The program of a samples-file line."""
    if isinstance(record.get("completions"), str):
        return str(record["completions"])
    pieces = record.get("prompts_completions")
    if isinstance(pieces, list) and all(isinstance(piece, str) for piece in pieces):
        return "".join(pieces)
    raise ConfigError(f"sample of problem {record.get('id')} has no program ('completions')")


@dataclasses.dataclass(frozen=True)
class Report:
    """Pass rates over all programs, per category, per problem; pass@k per (problem, input)."""

    overall: float
    per_category: dict[str, float]
    per_problem: dict[str, float]
    pass_at: dict[str, float]
    results: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate(
    records: Sequence[dict[str, Any]],
    problems: Sequence[Problem],
    config: SandboxConfig | None = None,
    ks: Sequence[int] = (1, 5, 10),
    on_progress: Callable[[int], None] | None = None,
    corrections: Corrections | None = None,
) -> Report:
    """Run every sampled program in the sandbox and score it with MTPB's rules (the
    reference's, unless `corrections` enables some)."""
    by_id = {problem.id: problem for problem in problems}
    for record in records:
        if str(record.get("id")) not in by_id:
            raise ConfigError(f"a sample names problem {record.get('id')!r}, which MTPB lacks")
    config = config or default_sandbox()
    jobs = [job(record_program(r), r.get("gold_output"), config, corrections) for r in records]
    with Sandbox(config) as sandbox:
        outcomes = sandbox.run(jobs, lambda _i, _o: on_progress(1) if on_progress else None)
    return _report(records, outcomes, by_id, ks)


def _report(
    records: Sequence[dict[str, Any]],
    outcomes: Sequence[Outcome],
    problems: dict[str, Problem],
    ks: Sequence[int],
) -> Report:
    results = []
    units: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    per_problem: dict[str, list[bool]] = collections.defaultdict(list)
    per_category: dict[str, list[bool]] = collections.defaultdict(list)
    for record, outcome in zip(records, outcomes, strict=True):
        problem = problems[str(record["id"])]
        unit = units[(problem.id, json.dumps(record.get("input"), sort_keys=True))]
        unit[0], unit[1] = unit[0] + 1, unit[1] + outcome.passed
        per_problem[problem.id].append(outcome.passed)
        per_category[problem.category].append(outcome.passed)
        results.append({"id": problem.id, "input": record.get("input"), "passed": outcome.passed,
                        "status": outcome.status, "detail": outcome.detail,
                        "got": outcome.result.get("got")})  # fmt: skip
    every = [passed for passes in per_problem.values() for passed in passes]
    return Report(
        overall=sum(every) / len(every) if every else 0.0,
        per_category={name: sum(p) / len(p) for name, p in sorted(per_category.items())},
        per_problem={name: sum(p) / len(p) for name, p in per_problem.items()},
        pass_at=mean_pass_at_k(((n, c) for n, c in units.values()), ks),
        results=results,
    )


def save_report(report: Report, path: Path) -> None:
    write_json_atomic(path, report.to_json())
