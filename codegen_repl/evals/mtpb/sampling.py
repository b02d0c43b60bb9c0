"""MTPB sampling: n multi-turn programs per problem and test input, appended to a samples file
in the reference format (see `scoring`), resumable after a crash.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codegen_repl.core.settings import DEFAULT_SAMPLE
from codegen_repl.errors import ConfigError
from codegen_repl.evals.jsonl import append_jsonl, drop_torn_tail, read_jsonl
from codegen_repl.evals.mtpb.problems import Problem, program_pieces

if TYPE_CHECKING:  # both import JAX; the sandbox workers import this package
    from codegen_repl.core.decoding import Decoder
    from codegen_repl.model.sample_params import SampleParams


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """The paper's protocol: n samples per problem and input, each turn sampled with the
    problem's max_gen_length and truncated by CodeGen's rules."""

    n: int = 5
    temperature: float = DEFAULT_SAMPLE.temperature
    top_p: float = DEFAULT_SAMPLE.top_p
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
    completions: list[list[str]] = [[] for _ in range(settings.n)]
    for turn in range(len(turns)):
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, done in enumerate(completions):
            groups[problem.prompt(index, done)].append(i)
        for group, (context, members) in enumerate(groups.items()):
            seed = zlib.crc32(f"{settings.seed}/{problem.id}/{index}/{turn}/{group}".encode())
            texts = _complete(decoder, context, len(members), problem, settings, seed)
            for i, text in zip(members, texts, strict=True):
                completions[i].append(text)
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
