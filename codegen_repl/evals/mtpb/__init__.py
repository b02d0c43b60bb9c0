"""MTPB, the Multi-Turn Programming Benchmark of the CodeGen paper: problems, sampling, scoring.

The front-end-neutral API (the REPL's `/mtpb N`, the kernel's `%mtpb N` and the `mtpb`
commands use it), one module per job:

- `problems`: `load_problems(path=None) -> list[Problem]`: the 115 problems, from `path` or
  from the copy shipped in the package (BSD 3-Clause, `data/LICENSE-mtpb`; its sha256 is
  checked at load), so nothing needs the network. `find_problem(problems, "42")` picks one,
  `select(problems, "1-10,42")` several. `Problem` (frozen): id, name, category, description,
  prompts (templates), inputs, outputs, max_gen_length; `problem.turns(k)` are the prompts
  filled from test input k (0-based), `problem.expected(k)` its expected output,
  `problem.prompt(k, completions)` the context for the next turn and `problem.program(k,
  completions)` the program, in the paper's format (prefix, then per turn `# {prompt}\\n` +
  completion + `\\n\\n`), both through `codegen_repl.core.context`.
- `rules`: MTPB's rules, those of salesforce/CodeGen's `mtpb_exec.py` rule for rule, run in
  the sandbox (`check_in_sandbox`, `with_last_value_printed`, `outputs_match`); `Corrections`
  holds the opt-in fixes where the reference is arguably wrong.
- `scoring`: `score_program(program, problem, k) -> Result(passed, got, expected, detail)` and
  `evaluate(records, problems) -> Report` over a samples file, with the same checker, so a live
  session and an offline evaluation of the same program always agree.
- `sampling`: `sample(decoder, problems, out, SampleSettings(...))` writes salesforce/CodeGen
  `mtpb_sample.py`'s samples format, resumably.
- `replay`: `replay(session, problem, k, ...)` generates and runs each turn in a live
  `Session` (the callbacks stream the code and the outputs) and returns `score_program(
  session.program(), problem, k)`.
"""

from __future__ import annotations

from codegen_repl.evals.mtpb.problems import (
    PREFIX,
    SHA256,
    Problem,
    find_problem,
    load_problems,
    parse_ids,
    program_pieces,
    select,
)
from codegen_repl.evals.mtpb.replay import replay
from codegen_repl.evals.mtpb.rules import (
    CHECKER,
    Corrections,
    check_in_sandbox,
    outputs_match,
    run_recording_prints,
    with_last_value_printed,
)
from codegen_repl.evals.mtpb.sampling import SampleSettings, finished, sample
from codegen_repl.evals.mtpb.scoring import (
    Report,
    Result,
    default_sandbox,
    evaluate,
    job,
    record_program,
    save_report,
    score_program,
)

__all__ = [
    "CHECKER",
    "PREFIX",
    "SHA256",
    "Corrections",
    "Problem",
    "Report",
    "Result",
    "SampleSettings",
    "check_in_sandbox",
    "default_sandbox",
    "evaluate",
    "find_problem",
    "finished",
    "job",
    "load_problems",
    "outputs_match",
    "parse_ids",
    "program_pieces",
    "record_program",
    "replay",
    "run_recording_prints",
    "sample",
    "save_report",
    "score_program",
    "select",
    "with_last_value_printed",
]
