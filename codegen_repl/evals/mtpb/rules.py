"""MTPB's rules for judging a program: those of the reference scorer, salesforce/CodeGen's
`benchmark/mtpb_exec.py` (REFERENCE), rule for rule, run inside the sandbox's child process.

Each rule names the reference function it mirrors (the README's table quotes each line; the
tests in tests/evals/test_mtpb_rules.py cite them):

- `with_last_value_printed` (`rewrite_ast_with_print`, `try_rewrite_ast_with_print`): unless
  the last statement's `.value.func.id` starts with "print", its `.value` is wrapped in
  `print(...)` and the program unparsed, also when that value is None (`df.info()` prints None)
  and also for an assignment (`x = f()` becomes `x = print(f())`). A program that does not
  parse, is empty, or ends in a statement without a value is left as it is.
- `run_recording_prints` (`overload_builtin_print`, `do_exec`, `eval_problem`): the program
  runs in fresh globals holding `print_stack`, `builtins` and a recording `print` (so only the
  program's own prints count, not a library's); an `Exception` it raises, a timeout included
  (`time_limit(20)` raises inside `exec`), does not fail it: the verdict is on what it printed
  before. The judged value is the first argument of the last recorded print call, the object
  itself (not a copy); no print, or a last print with no argument, is a failure.
- `outputs_match` (`check_equivalence`): a pandas Series becomes a numpy array and the expected
  one too (compared by `np.allclose`); else a list whose first item is a tuple becomes a list of
  lists; else the numpy scalars uint8/int16/int32/int64 become int, float16/32/64 float, bool_
  bool, an ndarray a list. Then, when the types differ, an expected bool compares as strings,
  anything else is cast to the expected type (`int(7.9) == 7`, `list(dataframe)` is its
  column names). str/int/set/list/bool/tuple compare with `==`, floats by `abs(a - b) < 1e-6`,
  ndarrays by `np.allclose`; any other type (None, dict) is unsupported: a failure, as is any
  exception in the comparison.

Where the reference is arguably wrong, `Corrections` offers the fix (all off by default, so the
scores are the reference's): `lenient_none` (an expected None never passes there),
`lenient_dict` (an expected dict never passes there: problem 89) and `strict_int` (a float
that is not whole does not pass for an expected int).
"""

from __future__ import annotations

import ast
import dataclasses
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHECKER = "codegen_repl.evals.mtpb.rules:check_in_sandbox"
REFERENCE = "salesforce/CodeGen benchmark/mtpb_exec.py"
FLOAT_TOLERANCE = 1e-6  # check_equivalence: `abs(o1 - o2) < 1e-6`
TIME_LIMIT_S = 20.0  # eval_problem: `with time_limit(20):`
_SHOWN_CHARS = 300
_NUMPY_INTS = ("uint8", "int16", "int32", "int64")  # check_equivalence's lists, exactly
_NUMPY_FLOATS = ("float16", "float32", "float64")
# check_equivalence tests `str(type(o1)) == "<class 'pandas.core.series.Series'>"`, the name
# in the pandas of its time; pandas 3 names the class `pandas.Series`: both are a Series.
_SERIES_MODULES = ("pandas.core.series", "pandas")


@dataclasses.dataclass(frozen=True)
class Corrections:
    """Departures from the reference scorer where it is arguably wrong (all off: its scores).

    Args:
        lenient_none: an expected None passes when the last printed value is None (or prints
            as "None"); the reference casts to NoneType, which always fails.
        lenient_dict: an expected dict passes when the printed mapping has the same keys (as
            strings, as JSON has them) and matching values; the reference never passes one.
        strict_int: a float that is not whole fails for an expected int; the reference casts
            with `int()`, so 7.9 passes for 7.
    """

    lenient_none: bool = False
    lenient_dict: bool = False
    strict_int: bool = False

    def to_json(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


class ProgramTimeout(Exception):
    """The reference's TimeoutException: an Exception, so the program's run swallows it."""


def with_last_value_printed(program: str) -> str:
    """The program as the reference runs it: its last statement's value printed (see above)."""
    try:
        tree = ast.parse(program)
        if _ends_with_print(tree):
            return program
        last = tree.body[-1]  # IndexError for an empty program: left as it is
        last.value = ast.Call(ast.Name("print", ast.Load()), [last.value], [])  # type: ignore[attr-defined]
        ast.fix_missing_locations(last)
        return ast.unparse(tree)
    except Exception:  # try_rewrite_ast_with_print: any failure leaves the program unchanged
        return program


def _ends_with_print(tree: ast.Module) -> bool:
    try:
        return bool(tree.body[-1].value.func.id.startswith("print"))  # type: ignore[attr-defined]
    except Exception:  # the reference's bare `except`
        return False


def run_recording_prints(program: str, time_limit_s: float) -> tuple[list[dict[str, Any]], str]:
    """Run the program as the reference does; (its print calls' args/kwargs, the error text or
    "" if it ran to its end). Exceptions are swallowed (`do_exec`); a SystemExit or
    KeyboardInterrupt, which would stop the reference harness itself, propagates."""
    import builtins

    scope: dict[str, Any] = {"print_stack": [], "__name__": "__main__", "builtins": builtins}

    def recording_print(*args: Any, **kwargs: Any) -> None:
        scope["print_stack"].append({"args": args, "kwargs": kwargs})
        return builtins.print(*args, **kwargs)

    scope["print"] = recording_print
    error = ""
    with _time_limit(time_limit_s):
        try:
            exec(program, scope)  # the program is the model's sample: we are sandboxed
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
    return list(scope["print_stack"]), error


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(_signum: int, _frame: object) -> None:
        raise ProgramTimeout("Timed out!")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def outputs_match(got: Any, expected: Any, corrections: Corrections | None = None) -> bool:
    """The reference's `check_equivalence(got, expected)`; an exception in it is a mismatch."""
    try:
        return _equivalent(got, expected, corrections or Corrections())
    except Exception:  # eval_problem: `except Exception` -> test_success = False
        return False


def _equivalent(got: Any, expected: Any, corrections: Corrections) -> bool:
    corrected = _corrected(got, expected, corrections)
    if corrected is not None:
        return corrected
    got, expected = _normalized(got, expected)
    if type(got) is not type(expected):
        if type(expected) is bool:  # bool("False") is True: compare as strings
            got, expected = str(got), str(expected)
        else:
            got = type(expected)(got)
    kind = type(got)
    if kind in (str, int, set, list, bool, tuple):
        return bool(got == expected)
    if kind is float:
        return bool(abs(got - expected) < FLOAT_TOLERANCE)
    if type(got).__name__ == "ndarray":
        import numpy as np

        return bool(np.allclose(got, expected))
    raise ValueError(f"Unsupported type {kind}")


def _normalized(got: Any, expected: Any) -> tuple[Any, Any]:
    """check_equivalence's steps (1)-(3): one of them at most, as its elif chain has it."""
    kind = type(got)
    if kind.__name__ == "Series" and kind.__module__ in _SERIES_MODULES:
        import numpy as np

        return got.to_numpy(), np.array(expected)
    if kind is list:
        if len(got) > 0 and type(got[0]) is tuple:
            got = [list(item) for item in got]
        return got, expected
    if kind.__module__ == "numpy":
        if kind.__name__ in _NUMPY_INTS:
            return int(got), expected
        if kind.__name__ in _NUMPY_FLOATS:
            return float(got), expected
        if kind.__name__ == "bool_" or kind.__name__ == "bool":  # numpy 2 renamed bool_
            return bool(got), expected
        if kind.__name__ == "ndarray":
            return got.tolist(), expected
    return got, expected


def _corrected(got: Any, expected: Any, corrections: Corrections) -> bool | None:
    """The verdict of an enabled correction, or None where the reference's rule applies."""
    if expected is None and corrections.lenient_none:
        return got is None or str(got) == "None"
    if isinstance(expected, dict) and corrections.lenient_dict:
        mapping = {str(key): value for key, value in dict(got).items()}
        return mapping.keys() == expected.keys() and all(
            outputs_match(mapping[key], expected[key], corrections) for key in expected
        )
    if corrections.strict_int and type(expected) is int and isinstance(got, float):
        return got.is_integer() and int(got) == expected
    return None


def check_in_sandbox(program: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The sandbox checker (`eval_problem`): payload holds "expected", "corrections" (a
    `Corrections` as a dict) and "time_limit_s" (the reference's 20 s by default)."""
    expected = payload["expected"]
    corrections = Corrections(**payload.get("corrections", {}))
    time_limit_s = float(payload.get("time_limit_s", TIME_LIMIT_S))
    printed, error = run_recording_prints(with_last_value_printed(program), time_limit_s)
    after = f" (after {error})" if error else ""
    if not printed or not printed[-1]["args"]:
        reason = "printed nothing" if not printed else "ended on a print() without arguments"
        return {"passed": False, "detail": f"failed: the program {reason}{after}", "got": None}
    got = printed[-1]["args"][0]
    passed = outputs_match(got, expected, corrections)
    shown = _shown(got)
    detail = "passed" if passed else f"wrong output: {shown}"
    return {"passed": passed, "detail": detail + after, "got": shown}


def _shown(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as error:
        text = f"<unprintable {type(value).__name__}: {error}>"
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."
