"""Stream text as a terminal shows it, and long outputs cut to their head and tail."""

from __future__ import annotations

from codegen_repl.core.outputs import (
    NO_INPUT_LINE,
    compact_outputs,
    elide,
    terminal_line,
    terminal_text,
    to_output,
)


def test_carriage_returns_show_the_last_state_of_each_line() -> None:
    assert terminal_text("a\r\nb\r\n") == "a\nb\n"  # Windows line ends are not blank lines
    assert terminal_text(" 10%|#    |\r 50%|###  |\r100%|#####|\n") == "100%|#####|\n"
    assert terminal_line("abcdef\rXY") == "XYcdef"  # a shorter redraw covers only its start
    assert terminal_text("no newline at the end\rN") == "No newline at the end"


def test_long_outputs_keep_head_and_tail_with_a_count() -> None:
    lines = [f"line {n}" for n in range(100_000)]
    shown = elide(lines, 3, 2)
    assert shown == ["line 0", "line 1", "line 2", "... 99995 lines left out ...",
                     "line 99998", "line 99999"]  # fmt: skip
    assert elide(lines[:6], 3, 2) == lines[:6]  # one line left out would say no less


def test_compact_outputs_on_resume() -> None:
    text = "".join(f"{n}\r\n" for n in range(1000))
    outputs = [
        {"output_type": "stream", "name": "stdout", "text": text},
        {"output_type": "error", "ename": "ValueError", "evalue": "bad",
         "traceback": ["Traceback", "  frame", "ValueError: bad"]},
    ]  # fmt: skip
    stream, error = compact_outputs(outputs, head=2, tail=1)
    assert stream["text"] == "0\n1\n... 997 lines left out ...\n999\n"
    assert error["traceback"] == ["ValueError: bad"]
    assert outputs[0]["text"] == text  # the record is not changed


def test_a_refused_input_request_is_one_line() -> None:
    content = {"ename": "StdinNotImplementedError", "evalue": "raw_input was called",
               "traceback": ["-" * 70, "frame"] * 7}  # fmt: skip
    assert to_output("error", content)["traceback"] == [NO_INPUT_LINE]
