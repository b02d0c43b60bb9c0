"""MTPB's scoring rules, one test per rule of the reference scorer, salesforce/CodeGen's
`benchmark/mtpb_exec.py`; each cites the reference function and line it mirrors. The
`Corrections` (off by default) are tested next to the rule they correct.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas
import pytest
from typer.testing import CliRunner

from codegen_repl.cli.app import app
from codegen_repl.evals import mtpb
from codegen_repl.evals.mtpb import Corrections, outputs_match, with_last_value_printed
from codegen_repl.evals.mtpb.rules import check_in_sandbox, run_recording_prints
from codegen_repl.evals.sandbox import SandboxConfig

SANDBOX = SandboxConfig(workers=2, timeout_s=6.0, preload=("numpy", "pandas"))


def judged(program: str, expected: object, **corrections: bool) -> dict:
    """check_in_sandbox's verdict, run here (in-process: these programs are ours)."""
    payload = {"expected": expected, "corrections": corrections, "time_limit_s": 2.0}
    return check_in_sandbox(program, payload)


# ----------------------------------------------------------------------------- the last value


def test_rewrite_wraps_the_last_statements_value_in_print() -> None:
    # rewrite_ast_with_print: `new_node.value = ast.Call(func=ast.Name(id='print', ...),
    # args=[new_node.value], ...)`, then `ast.unparse`: also for None values and assignments.
    assert with_last_value_printed("def f(a):\n    return a ** 2\nf(2)").endswith("print(f(2))")
    assert with_last_value_printed("x = [1]\nx.append(2)").endswith("print(x.append(2))")
    assert with_last_value_printed("y = 3 * 4") == "y = print(3 * 4)"


def test_rewrite_leaves_a_program_ending_in_print_alone() -> None:
    # ends_with_print: `a.body[-1].value.func.id.startswith('print')`: also `x = print(...)`
    # and any name starting with "print".
    for program in ("x = 1\nprint(x)", "y = print(2)", "print_all(3)"):
        assert with_last_value_printed(program) == program


def test_rewrite_failures_leave_the_program_unchanged() -> None:
    # try_rewrite_ast_with_print: `except Exception as e: ... return code`: a syntax error,
    # an empty program, a last statement without a `.value` (a loop, a def).
    for program in ("def f(:\n", "", "for i in range(3):\n    i", "def g():\n    return 1"):
        assert with_last_value_printed(program) == program


def test_the_last_print_calls_first_argument_is_judged() -> None:
    # eval_problem: `print_output = globals["print_stack"][-1]["args"][0]`
    assert judged("print('a')\nprint(5)", 5)["passed"]
    assert not judged("print('total', 5)", "total 5")["passed"]
    assert judged("print('total', 5)", "total")["passed"]
    assert not judged("print(5)\nprint()", 5)["passed"]  # IndexError: no argument
    assert judged("x = 1", 1)["passed"]  # x = print(1)


def test_the_printed_object_itself_is_judged_not_a_copy() -> None:
    # overload_builtin_print: `print_stack.append({'args': args, ...})` keeps the object
    assert judged("x = [3, 4]\nprint(x)\nx.append(5)\nif x:\n    pass", [3, 4, 5])["passed"]


def test_only_the_programs_own_prints_are_recorded() -> None:
    # overload_builtin_print defines `print` in the program's globals: a library's print (here
    # a module's own builtins.print) is not recorded, and `builtins` is in scope.
    program = "import builtins\nprint(7)\nif True:\n    builtins.print(8)"
    assert judged(program, 7)["passed"]
    printed, error = run_recording_prints("print(builtins.abs(-2))\nprint(print_stack[0])", 2.0)
    assert error == "" and printed[0]["args"] == (2,)


def test_exceptions_after_the_print_do_not_fail_the_program() -> None:
    # do_exec: `except Exception as e: return False, str(e)`; eval_problem ignores `success`
    result = judged("print(3)\nraise ValueError('late')", 3)
    assert result["passed"] and result["detail"] == "passed (after ValueError: late)"
    assert not judged("raise ValueError('early')\nprint(3)", 3)["passed"]


def test_a_timeout_is_an_exception_the_run_swallows() -> None:
    # time_limit: `raise TimeoutException("Timed out!")`, an Exception, caught by do_exec
    result = judged("print(3)\nwhile True:\n    pass", 3)
    assert result["passed"] and "ProgramTimeout: Timed out!" in result["detail"]


def test_system_exit_is_a_failure() -> None:
    # `except Exception` in do_exec and eval_problem does not catch SystemExit: it would stop
    # the reference harness itself; here it fails this program only.
    with pytest.raises(SystemExit):
        run_recording_prints("print(3)\nraise SystemExit(0)", 2.0)


# ----------------------------------------------------------------------------- check_equivalence


@pytest.mark.parametrize(
    ("got", "expected", "match"),
    [
        # (2) tuples: `if len(o1) > 0 and type(o1[0]) == tuple: o1 = [list(t) for t in o1]`
        ([(1, "a"), (2, "b")], [[1, "a"], [2, "b"]], True),
        ([[1, 2], (3, 4)], [[1, 2], [3, 4]], False),  # only when the first item is a tuple
        # (3) numpy: `type(o1) in [np.uint8, np.int16, np.int32, np.int64]: o1 = int(o1)`
        (np.int64(5), 5, True),
        (np.uint8(5), 5, True),
        (np.int64(5), "5", True),
        # `type(o1) in [np.float16, np.float32, np.float64]: o1 = float(o1)`
        (np.float32(0.5), 0.5, True),
        # `type(o1) in [np.bool_]: o1 = bool(o1)`
        (np.bool_(True), True, True),
        # `type(o1) == np.ndarray: o1 = o1.tolist()`
        (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]], True),
        (np.array([0.1 + 0.2]), [0.3], False),  # lists compare with ==: no tolerance inside
        # `o1 = type(o2)(o1)`: cast to the expected type
        ("7980", 7980, True),
        (7980.0, 7980, True),
        (7.9, 7, True),  # int(7.9) == 7 (see --strict-int)
        (3, "3", True),
        ([1, 2], "[1, 2]", True),
        ((1, 2), [1, 2], True),
        ("ab", ["a", "b"], True),  # list("ab")
        ("abc", 5, False),  # the cast raises: no match
        # `if type(o2) == bool: o1, o2 = str(o1), str(o2)`
        ("True", True, True),
        (1, True, False),
        (False, True, False),
        (True, True, True),  # same type: ==
        # `elif type_ == float: return abs(o1 - o2) < 1e-6`
        (0.1 + 0.2, 0.3, True),
        (0.3 + 2e-6, 0.3, False),
        (1e-6, 0.0, False),  # strictly less than 1e-6
        ("0.30000001", 0.3, True),
        (float("nan"), float("nan"), False),
        # `else: raise ValueError(f"Unsupported type {type_}")`: None, dict
        (None, None, False),  # see --lenient-none
        ("None", None, False),
        ({1: ["a", "b"]}, {"1": ["a", "b"]}, False),  # see --lenient-dict
        ({"1": ["a", "b"]}, {"1": ["a", "b"]}, False),
        ([1, 2], [1, 2, 3], False),
    ],
)
def test_check_equivalence(got: object, expected: object, match: bool) -> None:
    assert outputs_match(got, expected) is match


def test_pandas_series_compare_as_arrays_with_allclose() -> None:
    # (1) pandas: `o1 = o1.to_numpy(); o2 = np.array(o2)`, then `np.allclose(o1, o2)`
    assert outputs_match(pandas.Series([1, 2, 3]), [1, 2, 3])
    assert outputs_match(pandas.Series([0.3, 1.0]), [0.3 + 1e-9, 1.0])  # allclose's tolerance
    assert not outputs_match(pandas.Series([1, 2]), [2, 1])
    assert not outputs_match(pandas.Series(["a", "b"]), ["a", "b"])  # allclose raises


def test_a_dataframe_is_cast_to_the_expected_type() -> None:
    # no step for DataFrames: `o1 = type(o2)(o1)`, and list(DataFrame) is its column names
    frame = pandas.DataFrame({"a": [1, 2], "b": [3, 4]})
    assert not outputs_match(frame, [[1, 3], [2, 4]])
    assert outputs_match(frame, ["a", "b"])


# ----------------------------------------------------------------------------- corrections


def test_lenient_none_passes_an_expected_none() -> None:
    lenient = Corrections(lenient_none=True)
    assert outputs_match(None, None, lenient) and outputs_match("None", None, lenient)
    assert not outputs_match(0, None, lenient) and not outputs_match(None, None)


def test_lenient_dict_compares_keys_as_strings() -> None:
    lenient = Corrections(lenient_dict=True)
    assert outputs_match({1: ["a", "b"]}, {"1": ["a", "b"]}, lenient)
    assert outputs_match({2: (2, "2")}, {"2": [2, "2"]}, lenient)
    assert not outputs_match({1: ["a"], 2: ["b"]}, {"1": ["a"]}, lenient)
    assert not outputs_match({1: ["b"]}, {"1": ["a"]}, lenient)


def test_strict_int_fails_a_float_that_is_not_whole() -> None:
    strict = Corrections(strict_int=True)
    assert not outputs_match(7.9, 7, strict) and outputs_match(7.0, 7, strict)
    assert outputs_match("7", 7, strict) and outputs_match(7.9, 7)


def test_problem_41_input_5_expects_none_and_never_passes_by_default() -> None:
    problems = mtpb.load_problems()
    problem = mtpb.find_problem(problems, "41")
    assert problem.expected(4) is None
    program = problem.program(4, ["pass"] * (len(problem.prompts) - 1) + ["print(None)"])
    records = [{"id": "41", "input": problem.inputs[4], "gold_output": None,
                "completions": program}]  # fmt: skip
    reference = mtpb.evaluate(records, problems, SANDBOX)
    lenient = mtpb.evaluate(records, problems, SANDBOX, corrections=Corrections(True))
    assert reference.results[0]["got"] == "None" and not reference.results[0]["passed"]
    assert lenient.results[0]["passed"] and lenient.overall == 1.0 and reference.overall == 0.0


def test_cli_flags_turn_the_corrections_on(tmp_path: Path) -> None:
    problems = mtpb.load_problems()
    problem = mtpb.find_problem(problems, "41")
    program = problem.program(4, ["pass"] * (len(problem.prompts) - 1) + ["print(None)"])
    samples = tmp_path / "samples.jsonl"
    record = {"id": "41", "input": problem.inputs[4], "gold_output": None, "completions": program}
    samples.write_text(json.dumps(record) + "\n")
    overall = {}
    for flags in ([], ["--lenient-none"]):
        report = tmp_path / "report.json"
        args = ["mtpb", "evaluate", str(samples), "--workers", "1", "--timeout", "6"]
        done = CliRunner().invoke(app, [*args, "--json", str(report), *flags])
        assert done.exit_code == 0, done.output
        overall[tuple(flags)] = json.loads(report.read_text())["overall"]
    assert overall == {(): 0.0, ("--lenient-none",): 1.0}
