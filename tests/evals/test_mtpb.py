"""MTPB: MTPB's scoring rules, evaluation, sampling files and replay (the data: test_mtpb_data)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from codegen_repl.cli.app import app
from codegen_repl.evals import mtpb
from codegen_repl.evals.mtpb import sampling
from codegen_repl.evals.sandbox import SandboxConfig

SANDBOX = SandboxConfig(workers=2, timeout_s=10.0, preload=("numpy",))

FIB = """def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a"""
# Hand-written turn completions, by problem: a function of the test input -> one per turn.
CORRECT = {
    "1": lambda i: [f"my_string = {i['A']!r}", "my_string = my_string.lower()",
                    "chars = set(my_string)", "chars = sorted(chars)", "print(chars)"],
    "3": lambda i: ["def minutes_to_seconds(minutes):\n    return minutes * 60",
                    "def hours_to_seconds(hours):\n    return hours * 3600",
                    f"print(hours_to_seconds({i['a1']}) + minutes_to_seconds({i['a2']}))"],
    "4": lambda i: [FIB, "def square(x):\n    return x * x",
                    f"square(fib({i['a1']}))"],  # a last expression: printed by MTPB's rule
    "5": lambda i: [f"my_numbers = {i['A']}", "n_neg = sum(1 for x in my_numbers if x < 0)",
                    "n_pos = sum(1 for x in my_numbers if x > 0)",
                    "print(np.int64(max(n_neg, n_pos)))"],  # a numpy scalar
    "33": lambda i: [f"n = {i['n']}", "total = (n - 2) * 180", "angle = np.radians(total)",
                     "angle = round(angle, 2)", "print(angle)"],
}  # fmt: skip
# Subtly wrong versions and which inputs they still pass.
WRONG = {
    "1": (lambda i: [*CORRECT["1"](i)[:1], "pass", *CORRECT["1"](i)[2:]],  # no lowercasing
          [True, False, False, False, True]),
    "3": (lambda i: [*CORRECT["3"](i)[:2], f"print(hours_to_seconds({i['a1']}) + {i['a2']})"],
          [False] * 5),
    "4": (lambda i: [CORRECT["4"](i)[0].replace("range(n)", "range(n - 1)"),
                     *CORRECT["4"](i)[1:]], [False, True, False, False, False]),
    "5": (lambda i: [*CORRECT["5"](i)[:3], "print(min(n_neg, n_pos))"], [False] * 5),
    "33": (lambda i: [*CORRECT["33"](i)[:3], "pass", "print(angle)"], [False] * 5),
}  # fmt: skip


@pytest.fixture(scope="module")
def problems() -> list[mtpb.Problem]:
    return mtpb.load_problems()  # the copy shipped in the package


def records_for(problem: mtpb.Problem, turns_of: object) -> list[dict]:
    records = []
    for index, given in enumerate(problem.inputs):
        completions = turns_of(given)  # type: ignore[operator]
        program = problem.program(index, completions)
        records.append({"id": problem.id, "input": given, "gold_output": problem.outputs[index],
                        "completions": program})  # fmt: skip
    return records


# ----------------------------------------------------------------------------- MTPB's rules


# (MTPB's rules, one test per rule of the reference scorer: test_mtpb_rules.py)


def test_hand_written_programs_pass_all_inputs_and_wrong_ones_fail(
    problems: list[mtpb.Problem],
) -> None:
    records, expected = [], []
    for problem_id in CORRECT:
        problem = mtpb.find_problem(problems, problem_id)
        records += records_for(problem, CORRECT[problem_id])
        expected += [True] * 5
        wrong, passes = WRONG[problem_id]
        records += records_for(problem, wrong)
        expected += passes
    report = mtpb.evaluate(records, problems, SANDBOX, ks=(1,))
    assert [r["passed"] for r in report.results] == expected, report.results
    assert report.per_problem["3"] == 0.5 and report.per_problem["1"] == 0.7


def test_printing_rules_in_the_sandbox(problems: list[mtpb.Problem]) -> None:
    def record(program: str, gold: object) -> dict:
        return {"id": "3", "input": {}, "gold_output": gold, "completions": program}

    records = [
        record("print('ignored')\nprint(7980)", 7980),  # the last print counts
        record("x = [3, 4]\nprint(x)\nx.append(5)", [3, 4]),  # print(x.append(5)): None
        record("print('total', 5)", "total 5"),  # the first argument only: 'total'
        record("x = 1", 1),  # the assignment's value is printed: x = print(1)
        record("def f(:\n", 1),  # syntax error
        record("import numpy as np\nnp.array([1, 2]) * 2", [2, 4]),  # last expression
        record("x = [2, 1]\nprint(x)\nx.sort()", [2, 1]),  # print(x.sort()): None
        record("print(3)\nraise ValueError('late')", 3),  # an error after the print
    ]
    report = mtpb.evaluate(records, problems, SANDBOX)
    verdicts = [True, False, False, True, False, True, False, True]
    assert [r["passed"] for r in report.results] == verdicts, report.results
    assert report.results[4]["detail"].startswith("failed: the program printed nothing (after Syn")
    assert report.results[7]["detail"] == "passed (after ValueError: late)"


def test_report_rates_and_pass_at_k(problems: list[mtpb.Problem]) -> None:
    three = mtpb.find_problem(problems, 3)
    records = records_for(three, CORRECT["3"]) + records_for(three, WRONG["3"][0])
    records += records_for(mtpb.find_problem(problems, 5), WRONG["5"][0])
    report = mtpb.evaluate(records, problems, SANDBOX, ks=(1, 2))
    assert report.overall == pytest.approx(5 / 15)
    assert report.per_category == {"math": 0.5, "array": 0.0}  # problem 5 is an array one
    # Problem 3: each input has 2 samples, 1 correct -> pass@1 0.5, pass@2 1; problem 5 has 1.
    assert report.pass_at == {"pass@1": pytest.approx((5 * 0.5 + 5 * 0.0) / 10)}


# ----------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_files: Path) -> Path:
    """A tiny random checkpoint with a 512-token window: MTPB's prompts need more than 128."""
    from codegen_repl.model.tokenizer import CodeGenTokenizer
    from tests.conftest import hf_codegen

    vocab_size = CodeGenTokenizer.from_dir(tokenizer_files).vocab_size
    folder = tmp_path_factory.mktemp("long_checkpoint")
    hf_codegen(seed=5, vocab_size=vocab_size, n_positions=512).save_pretrained(folder)
    for file in tokenizer_files.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


def test_sample_writes_the_reference_format_and_resumes(
    tmp_path: Path, long_checkpoint: Path, problems: list[mtpb.Problem]
) -> None:
    out = tmp_path / "samples.jsonl"
    args = ["mtpb", "sample", "--model", str(long_checkpoint), "-n", "2", "-t", "0.8",
            "-o", str(out), "--problems", "3-4"]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * 5 * 2
    for record in records:
        assert set(record) == {"id", "input", "gold_output", "completions", "prompts_completions"}
        problem = mtpb.find_problem(problems, record["id"])
        index = problem.inputs.index(record["input"])
        assert record["gold_output"] == problem.outputs[index]
        pieces = record["prompts_completions"]
        assert "".join(pieces) == record["completions"] and pieces[0] == mtpb.PREFIX
        assert pieces[1::2] == [f"# {turn}\n" for turn in problem.turns(index)]
        assert all(piece.endswith("\n\n") for piece in pieces[2::2])
    assert any(piece.strip() for r in records for piece in r["prompts_completions"][2::2])
    before = out.read_bytes()
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    assert "0 problems sampled, 2 already" in second.output
    assert out.read_bytes() == before

    # The file scores with `mtpb evaluate` (a random tiny model: everything fails).
    report = tmp_path / "report.json"
    evaluated = CliRunner().invoke(app, ["mtpb", "evaluate", str(out), "--json", str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "overall" in evaluated.output and "Convert time" in evaluated.output
    data = json.loads(report.read_text())
    assert len(data["results"]) == 20 and set(data["per_problem"]) == {"3", "4"}


def test_resume_drops_a_torn_problem(tmp_path: Path, problems: list[mtpb.Problem]) -> None:
    three = mtpb.find_problem(problems, 3)
    out = tmp_path / "samples.jsonl"
    lines = [json.dumps(r) for r in records_for(three, CORRECT["3"])]
    out.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # 3 of 5 lines, then torn
    assert mtpb.finished(out, [three], 1) == set()
    sampling._drop_partial(out, set())
    assert out.read_text() == ""


# ----------------------------------------------------------------------------- replay


@dataclasses.dataclass
class ScriptedDecoder:
    """Stands in for the model in the replay test: it answers each turn with the hand-written
    code, so the test checks the replay and scoring path, not a model."""

    answers: dict[str, str]
    max_context: int = 2048

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, prompt: str, sample: object) -> Iterator[str]:
        step = prompt.rstrip("\n").rsplit("\n", 1)[-1].removeprefix("# ")
        yield self.answers[step]

    def complete(self, prompt: str, sample: object) -> list[str]:
        return ["".join(self.generate(prompt, sample))]


def test_replay_runs_turns_in_a_live_kernel_and_scores(
    tmp_path: Path, problems: list[mtpb.Problem]
) -> None:
    from codegen_repl.core.executor import Executor, ExecutorConfig
    from codegen_repl.core.session import Session

    problem = mtpb.find_problem(problems, 3)
    turns = problem.turns(2)
    decoder = ScriptedDecoder(dict(zip(turns, CORRECT["3"](problem.inputs[2]), strict=True)))
    seen: list[str] = []
    outputs: list[dict] = []
    with Executor(ExecutorConfig(cwd=tmp_path)) as executor:
        session = Session(decoder, executor, tmp_path / "replay.ipynb")  # type: ignore[arg-type]
        result = mtpb.replay(session, problem, 2, on_turn=lambda n, p: seen.append(p),
                             on_output=outputs.append, config=SANDBOX)  # fmt: skip
    assert seen == turns
    assert result.passed and result.expected == 117120 and result.got == "117120"
    assert outputs[-1]["text"] == "117120\n"  # printed by the live kernel
    assert (tmp_path / "replay.ipynb").exists()


def test_cli_replay_with_a_tiny_model(long_checkpoint: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["mtpb", "replay", "3", "--input", "1", "--model", str(long_checkpoint), "--yes",
              "--session", str(tmp_path / "r.ipynb")],
    )  # fmt: skip
    assert result.exit_code in (0, 1), result.output  # 1: the random model's program failed
    assert "turn 1: Write a function that takes an integer minutes" in result.output
    assert "turn 3: Print the total seconds of 1 hours and 2 minutes." in result.output
    assert ("FAIL" in result.output) == (result.exit_code == 1)
    assert "expected 3720" in result.output
