"""MTPB's problems: the data shipped in the package, and each problem's turns and programs.

`data/mtpb.jsonl` is salesforce/CodeGen's `codegen1/benchmark/mtpb.jsonl` at commit
`COMMIT`, under the BSD 3-Clause license in `data/LICENSE-mtpb`; it is checked against
`SHA256` whenever it is read. Any other copy can be given as a path (it is not checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codegen_repl.core.context import MTPB_PREFIX, TurnText, build_context, step_line
from codegen_repl.errors import ConfigError
from codegen_repl.evals.jsonl import read_jsonl

COMMIT = "6f09e495f41e006375055239e4bcb18539f3a38b"  # salesforce/CodeGen, read at this commit
SHA256 = "3ab79ddb160f484a63491330ba72204930d56cc946f7c0c5fb469622a941f89c"
SHIPPED = Path(__file__).resolve().parent / "data" / "mtpb.jsonl"
PREFIX = MTPB_PREFIX  # `# Import libraries.\n\nimport numpy as np\n\n`
DEFAULT_MAX_GEN_LENGTH = 256


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem: prompt templates, 5 test inputs and their expected outputs."""

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

    def prompt(self, index: int, completions: Sequence[str]) -> str:
        """The context that asks for turn `len(completions)` of test input `index`, after the
        earlier turns' completions (the paper's format, through `build_context`)."""
        turns = self.turns(index)
        done = [
            TurnText(step, code, verbatim=True)
            for step, code in zip(turns, completions, strict=False)
        ]
        return build_context(PREFIX, done, turns[len(done)], verbatim=True)

    def program(self, index: int, completions: Sequence[str]) -> str:
        return "".join(program_pieces(self.turns(index), completions))


def program_pieces(turns: Sequence[str], completions: Sequence[str]) -> list[str]:
    """prefix, then `# {prompt}\\n` and `{completion}\\n\\n` per turn: the samples file's
    `prompts_completions` (they join to what `build_context` renders)."""
    pieces = [PREFIX]
    for prompt, completion in zip(turns, completions, strict=False):
        pieces += [step_line(prompt, verbatim=True), f"{completion}\n\n"]
    return pieces


def load_problems(path: Path | None = None) -> list[Problem]:
    """The problems of `path` (any copy of mtpb.jsonl), or of the copy shipped in the package,
    whose sha256 is checked first."""
    records = read_jsonl(Path(path)) if path is not None else _shipped_records()
    return [Problem.from_json(record) for record in records]


def _shipped_records() -> list[dict[str, Any]]:
    try:
        data = SHIPPED.read_bytes()
    except OSError as error:
        raise ConfigError(
            f"the MTPB data shipped with codegen-repl cannot be read ({error}); reinstall "
            "codegen-repl, or pass --problems PATH with a copy of mtpb.jsonl"
        ) from None
    found = hashlib.sha256(data).hexdigest()
    if found != SHA256:
        raise ConfigError(
            f"the MTPB data shipped with codegen-repl ({SHIPPED}) has sha256 {found}, expected "
            f"{SHA256}: the file was changed or damaged; reinstall codegen-repl, or pass "
            "--problems PATH with a copy of mtpb.jsonl"
        )
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


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
        if not _number(low) or (high and not _number(high)):
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


def _number(word: str) -> bool:
    """Digits int() takes: ASCII ones (str.isdigit() also takes "²", which int() refuses)."""
    return word.isascii() and word.isdigit()
