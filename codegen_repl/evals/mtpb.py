"""MTPB, the Multi-Turn Programming Benchmark of the CodeGen paper: problems, sampling, scoring.

The front-end-neutral API (the REPL's `/mtpb N` and the kernel's `%mtpb N` use it):

- `load_problems(path=None) -> list[Problem]`: the 115 problems, from `path` or from the user
  cache, downloaded once from the pinned salesforce/CodeGen commit and checked against its
  sha256 (`fetch_problems`). `find_problem(problems, "42")` picks one.
- `Problem` (frozen): id, name, category, description, prompts (templates), inputs, outputs,
  max_gen_length. `problem.turns(k)` are the prompts filled from test input k (0-based),
  `problem.expected(k)` its expected output, `problem.program(k, completions)` the program in
  the paper's format (prefix, then per turn `# {prompt}\\n` + completion + `\\n\\n`).
- `replay(session, problem, k, ...)` generates and runs each turn in a live `Session` (the
  callbacks stream the code and the outputs) and returns `score_program(session.program(),
  problem, k)`.
- `score_program(program, problem, k) -> Result(passed, got, expected, detail)`: runs the
  program in the sandbox and applies MTPB's rules, exactly as `mtpb evaluate` does, so a live
  session and an offline evaluation of the same program always agree. (The kernel is not asked:
  its state may hold the outputs of undone turns and of the user's own experiments.)

MTPB's rules (`check_in_sandbox`, `outputs_match`): the last statement, if it is an
expression, becomes a print (unless its value is None, as a notebook shows it); the value of
the last `print` call (its one argument, or the printed text if it had several) is compared
with the expected output after coercions: pandas objects and numpy arrays to lists, numpy
scalars to Python scalars, tuples (also inside lists) to lists, then a cast to the expected
type; bools are compared as strings, floats within 1e-6, dict keys as strings.

Samples files are salesforce/CodeGen `mtpb_sample.py`'s: one JSON line per problem x input x
sample with `id`, `input`, `gold_output`, `completions` (the whole program from the prefix on)
and `prompts_completions` (its pieces, in order: prefix, then each turn's `# {prompt}\\n` and
`{completion}\\n\\n`; they join to `completions`).
"""

from __future__ import annotations

import ast
import collections
import copy
import dataclasses
import hashlib
import json
import math
import os
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codegen_repl.errors import ConfigError
from codegen_repl.evals.humaneval import (
    append_jsonl,
    drop_torn_tail,
    mean_pass_at_k,
    read_jsonl,
    write_json_atomic,
)
from codegen_repl.evals.sandbox import Job, Outcome, Sandbox, SandboxConfig
from codegen_repl.userconfig import default_cache_dir

if TYPE_CHECKING:  # these import JAX and jupyter; sandbox workers import this module
    from codegen_repl.core.decoding import Decoder
    from codegen_repl.core.executor import OutputCallback
    from codegen_repl.core.session import Session
    from codegen_repl.model.sample_params import SampleParams

COMMIT = "6f09e495f41e006375055239e4bcb18539f3a38b"
URL = f"https://raw.githubusercontent.com/salesforce/CodeGen/{COMMIT}/codegen1/benchmark/mtpb.jsonl"
SHA256 = "3ab79ddb160f484a63491330ba72204930d56cc946f7c0c5fb469622a941f89c"
PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"  # = codegen_repl.core.context.MTPB_PREFIX
DEFAULT_MAX_GEN_LENGTH = 256
CHECKER = "codegen_repl.evals.mtpb:check_in_sandbox"
FLOAT_TOLERANCE = 1e-6
SHOW = "__mtpb_show__"  # the name the last expression is passed to
_SHOWN_CHARS = 300


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    name: str
    category: str
    description: str
    prompts: tuple[str, ...]
    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[Any, ...]
    max_gen_length: int = DEFAULT_MAX_GEN_LENGTH

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Problem:
        try:
            return cls(
                id=str(record["id"]), name=record["name"], category=record["category"],
                description=record.get("description", ""), prompts=tuple(record["prompts"]),
                inputs=tuple(record["inputs"]), outputs=tuple(record["outputs"]),
                max_gen_length=record.get("max_gen_length") or DEFAULT_MAX_GEN_LENGTH,
            )  # fmt: skip
        except KeyError as missing:
            message = f"an MTPB problem lacks the field {missing}; is this mtpb.jsonl?"
            raise ConfigError(message) from None

    def _check_input(self, index: int) -> None:
        if not 0 <= index < len(self.inputs):
            raise ConfigError(
                f"problem {self.id} has test inputs 0..{len(self.inputs) - 1}, not {index}"
            )

    def turns(self, index: int) -> list[str]:
        """The prompts filled from test input `index` (the templates use str.format)."""
        self._check_input(index)
        return [prompt.format(**self.inputs[index]) for prompt in self.prompts]

    def expected(self, index: int) -> Any:
        self._check_input(index)
        return self.outputs[index]

    def program(self, index: int, completions: Sequence[str]) -> str:
        return "".join(program_pieces(self.turns(index), completions))


def program_pieces(turns: Sequence[str], completions: Sequence[str]) -> list[str]:
    """prefix, then `# {prompt}\\n` and `{completion}\\n\\n` per turn."""
    pieces = [PREFIX]
    for prompt, completion in zip(turns, completions, strict=False):
        pieces += [f"# {prompt}\n", f"{completion}\n\n"]
    return pieces


# ----------------------------------------------------------------------------- data


def fetch_problems(
    folder: Path | None = None, url: str = URL, sha256: str = SHA256, timeout: float = 30.0
) -> Path:
    """The cached mtpb.jsonl, downloaded first if needed; never caches a file that does not
    match `sha256`."""
    path = (folder or default_cache_dir()) / "mtpb" / f"mtpb-{sha256[:12]}.jsonl"
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError) as error:
        raise ConfigError(
            f"could not download MTPB from {url} ({error}); connect to the network once, or "
            "pass --problems PATH with a local copy of mtpb.jsonl"
        ) from None
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ConfigError(
            f"the MTPB file from {url} has sha256 {found}, expected {sha256}; nothing was "
            "cached. Retry later, or pass --problems PATH with a verified copy"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path


def load_problems(path: Path | None = None, folder: Path | None = None) -> list[Problem]:
    """The problems of `path`, or of the cached (downloaded once) pinned copy."""
    source = Path(path) if path is not None else fetch_problems(folder)
    return [Problem.from_json(record) for record in read_jsonl(source)]


def find_problem(problems: Sequence[Problem], problem_id: str | int) -> Problem:
    for problem in problems:
        if problem.id == str(problem_id):
            return problem
    raise ConfigError(f"there is no MTPB problem {problem_id}; ids are 1..{len(problems)}")


def parse_ids(spec: str) -> set[int]:
    """`1-10,42` -> {1, ..., 10, 42}."""
    wanted: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError(f"bad id list {spec!r}; write ids and ranges like 1-10,42")
        wanted.update(range(int(low), int(high or low) + 1))
    return wanted


def select(problems: Sequence[Problem], spec: str | None) -> list[Problem]:
    """Problems named by a spec like `1-10,42` (None or "": all), in benchmark order."""
    if not spec:
        return list(problems)
    wanted = {str(i) for i in parse_ids(spec)}
    if unknown := sorted(wanted - {p.id for p in problems}, key=int):
        raise ConfigError(f"unknown MTPB problems {unknown[:5]}; ids are 1..{len(problems)}")
    return [p for p in problems if p.id in wanted]


# ----------------------------------------------------------------------------- MTPB's rules


def last_expression_to_print(program: str) -> ast.Module:
    """The program with its last statement, if it is an expression, shown as a notebook shows
    it: printed unless it is None (so a final `print(...)` is not printed twice)."""
    tree = ast.parse(program)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        call = ast.Call(ast.Name(SHOW, ast.Load()), [last.value], [])
        tree.body[-1] = ast.copy_location(ast.Expr(call), last)
        ast.fix_missing_locations(tree)
    return tree


def _show(value: Any) -> None:
    if value is not None:
        print(value)


def plain(value: Any) -> Any:
    """numpy/pandas values as Python lists and scalars; tuples as lists (recursively)."""
    module = type(value).__module__.split(".")[0]
    if module in ("numpy", "pandas"):
        if hasattr(value, "tolist"):  # ndarray, numpy scalar, Series, Index
            value = value.tolist()
        elif hasattr(value, "to_numpy"):  # DataFrame
            value = value.to_numpy().tolist()
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def outputs_match(got: Any, expected: Any) -> bool:
    """MTPB's comparison of a printed value with the expected output."""
    got = plain(got)
    try:
        return _matches(got, expected)
    except (TypeError, ValueError, OverflowError):  # the cast to the expected type failed
        return False


def _matches(got: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or expected is None:
        return str(got) == str(expected)
    if isinstance(expected, float):
        return math.isclose(float(got), expected, rel_tol=0.0, abs_tol=FLOAT_TOLERANCE)
    if isinstance(expected, int):
        if isinstance(got, float) and not got.is_integer():
            return False  # int(7.9) == 7 would pass a wrong program
        return int(got) == expected
    if isinstance(expected, str):
        return str(got) == expected
    if isinstance(expected, list):
        items = list(got)
        return len(items) == len(expected) and all(map(_matches_plain, items, expected))
    if isinstance(expected, dict):
        mapping = {str(key): item for key, item in dict(got).items()}  # JSON keys are strings
        return mapping.keys() == expected.keys() and all(
            _matches_plain(mapping[key], expected[key]) for key in expected
        )
    return bool(got == expected)


def _matches_plain(got: Any, expected: Any) -> bool:
    try:
        return _matches(plain(got), expected)
    except (TypeError, ValueError, OverflowError):
        return False


def check_in_sandbox(program: str, expected: Any) -> dict[str, Any]:
    """The sandbox checker: run the program, take its last printed value, compare. Runs in the
    disposable child process, so replacing `builtins.print` there is harmless."""
    import builtins

    try:
        code = compile(last_expression_to_print(program), "<program>", "exec")
    except (SyntaxError, ValueError) as error:
        return {"passed": False, "detail": f"failed: SyntaxError: {error}", "got": None}
    printed: list[Any] = []
    builtins.print = _recording_print(builtins.print, printed)
    try:
        exec(
            code, {"__name__": "__main__", SHOW: _show}
        )  # the program is the model's sample: we are sandboxed
    except BaseException as error:
        return {"passed": False, "detail": f"failed: {type(error).__name__}: {error}", "got": None}
    if not printed:
        return {"passed": False, "detail": "failed: the program printed nothing", "got": None}
    got = printed[-1]
    passed = outputs_match(got, expected)
    shown = _shown(got)
    return {"passed": passed, "detail": "passed" if passed else f"wrong output: {shown}",
            "got": shown}  # fmt: skip


def _recording_print(real: Callable[..., None], printed: list[Any]) -> Callable[..., None]:
    def recording(*args: Any, sep: str | None = " ", **kwargs: Any) -> None:
        if len(args) == 1:
            try:
                printed.append(copy.deepcopy(args[0]))  # later mutation must not change it
            except Exception:
                printed.append(args[0])
        else:
            printed.append((" " if sep is None else sep).join(map(str, args)))
        real(*args, sep=sep, **kwargs)

    return recording


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass(frozen=True)
class Result:
    """One program's verdict: `got` is the repr of the last printed value (None if none)."""

    passed: bool
    got: str | None
    expected: Any
    detail: str
    status: str = "passed"


def default_sandbox() -> SandboxConfig:
    """MTPB programs import numpy (and often pandas): preload both, allow 10 s."""
    return SandboxConfig(timeout_s=10.0, preload=("numpy", "pandas"))


def score_program(
    program: str, problem: Problem, index: int, config: SandboxConfig | None = None
) -> Result:
    """MTPB's verdict on one program (e.g. `Session.program()` after a replay)."""
    config = dataclasses.replace(config or default_sandbox(), workers=1)
    with Sandbox(config) as sandbox:
        outcome = sandbox.run_one(Job(program, CHECKER, problem.expected(index)))
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
) -> Report:
    """Run every sampled program in the sandbox and score it with MTPB's rules."""
    by_id = {problem.id: problem for problem in problems}
    for record in records:
        if str(record.get("id")) not in by_id:
            raise ConfigError(f"a sample names problem {record.get('id')!r}, which MTPB lacks")
    jobs = [Job(record_program(r), CHECKER, r.get("gold_output")) for r in records]
    with Sandbox(config or default_sandbox()) as sandbox:
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


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The paper's protocol: n samples per problem and input, each turn sampled with the
    problem's max_gen_length and truncated by CodeGen's rules."""

    n: int = 5
    temperature: float = 0.2
    top_p: float = 0.95
    batch_size: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.params(1, 1, 0)  # validates temperature and top_p

    def params(self, count: int, max_new_tokens: int, seed: int) -> SampleParams:
        from codegen_repl.model.sample_params import SampleParams

        return SampleParams(
            max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            n=count, seed=seed, codegen_rules=True,
        )  # fmt: skip


def finished(out: Path, problems: Sequence[Problem], n: int) -> set[str]:
    """Problems whose every input x sample line is in `out`."""
    if not out.exists():
        return set()
    counts = collections.Counter(str(r.get("id")) for r in read_jsonl(out))
    return {p.id for p in problems if counts[p.id] >= len(p.inputs) * n}


def sample(
    decoder: Decoder,
    problems: Sequence[Problem],
    out: Path,
    settings: SampleSettings,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Sample every problem not yet finished in `out` and append its lines in one atomic
    write; returns how many problems were sampled. `on_progress` counts (problem, input)s."""
    drop_torn_tail(out)
    done = finished(out, problems, settings.n)
    _drop_partial(out, done)
    sampled = 0
    for problem in problems:
        if problem.id in done:
            if on_progress:
                on_progress(len(problem.inputs))
            continue
        records = []
        for index in range(len(problem.inputs)):
            records += _sample_input(decoder, problem, index, settings)
            if on_progress:
                on_progress(1)
        append_jsonl(out, records)
        sampled += 1
    return sampled


def _drop_partial(out: Path, done: set[str]) -> None:
    """Lines of problems that did not finish (a torn block) are sampled again: drop them."""
    if not out.exists():
        return
    records = read_jsonl(out)
    kept = [r for r in records if str(r.get("id")) in done]
    if len(kept) < len(records):
        temporary = out.with_name(f".{out.name}.tmp")
        temporary.unlink(missing_ok=True)
        append_jsonl(temporary, kept)
        os.replace(temporary, out)


def _sample_input(
    decoder: Decoder, problem: Problem, index: int, settings: SampleSettings
) -> list[dict[str, Any]]:
    """n multi-turn samples for one test input. Samples whose histories are still equal share
    one batched request (at low temperature most do)."""
    turns = problem.turns(index)
    histories = [PREFIX] * settings.n
    completions: list[list[str]] = [[] for _ in range(settings.n)]
    for turn, prompt in enumerate(turns):
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, history in enumerate(histories):
            groups[history + f"# {prompt}\n"].append(i)
        for group, (context, members) in enumerate(groups.items()):
            seed = zlib.crc32(f"{settings.seed}/{problem.id}/{index}/{turn}/{group}".encode())
            texts = _complete(decoder, context, len(members), problem, settings, seed)
            for i, text in zip(members, texts, strict=True):
                completions[i].append(text)
                histories[i] = context + text + "\n\n"
    return [
        {"id": problem.id, "input": problem.inputs[index], "gold_output": problem.outputs[index],
         "completions": "".join(program_pieces(turns, c)),
         "prompts_completions": program_pieces(turns, c)}
        for c in completions
    ]  # fmt: skip


def _complete(
    decoder: Decoder, context: str, count: int, problem: Problem, settings: SampleSettings,
    seed: int,
) -> list[str]:  # fmt: skip
    """`count` completions of `context` in batches; no room left in the window gives ""."""
    room = decoder.max_context - decoder.count_tokens(context)
    max_new_tokens = min(problem.max_gen_length, room)
    if max_new_tokens < 1:
        return [""] * count
    texts: list[str] = []
    while len(texts) < count:
        batch = min(settings.batch_size, count - len(texts))
        params = settings.params(batch, max_new_tokens, seed + len(texts))
        texts += decoder.complete(context, params)
    return texts


# ----------------------------------------------------------------------------- replay


def replay(
    session: Session,
    problem: Problem,
    index: int,
    on_turn: Callable[[int, str], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_output: OutputCallback | None = None,
    confirm: Callable[[str], bool] | None = None,
    config: SandboxConfig | None = None,
) -> Result:
    """Play problem `problem` with test input `index` in a live session: for each turn,
    `on_turn(number, prompt)`, generate (streamed to `on_text`), ask `confirm(code)` (None:
    run everything), run in the kernel (outputs to `on_output`); then score the program.
    The session samples each turn with the problem's max_gen_length (at most half the
    model's window, so a small model still gets context)."""

    before = session.settings
    tokens = min(problem.max_gen_length, max(1, session.decoder.max_context // 2))
    sample_params = dataclasses.replace(before.sample, max_new_tokens=tokens)
    session.settings = dataclasses.replace(before, sample=sample_params)
    try:
        for number, prompt in enumerate(problem.turns(index), start=1):
            if on_turn:
                on_turn(number, prompt)
            code, seconds = session.generate(prompt, on_text)
            session.add_step(prompt, code, seconds, on_output, confirm(code) if confirm else True)
    finally:
        session.settings = before
    return score_program(session.program(), problem, index, config)
