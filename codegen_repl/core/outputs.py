"""A cell's outputs as nbformat v4 dicts, built from the kernel's iopub messages as Jupyter
builds them: runs of same-stream chunks merged, `clear_output` (also with wait=True) and
`update_display_data` applied; a kernel's refused input request (no one can answer it) is one
traceback line. And how a terminal shows stream text (`\r` overwrites, `\r\n` ends a line), and
long outputs cut to their head and tail, for every front end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Output = dict[str, Any]  # one nbformat v4 output: stream, execute_result, display_data, error
OutputCallback = Callable[[Output], None]
# Answers the kernel's input requests: (prompt, password) -> the line typed (without newline).
InputCallback = Callable[[str, bool], str]
NO_INPUT = "StdinNotImplementedError"
NO_INPUT_LINE = (
    "StdinNotImplementedError: input() cannot be answered here (a replay, MTPB, the codegen "
    "kernel); put the value in the code"
)


class Cell:
    """The outputs of one execute_request, built up from its iopub messages."""

    def __init__(self, msg_id: str, on_output: OutputCallback | None) -> None:
        self.msg_id = msg_id
        self.outputs: list[Output] = []
        self.execution_count: int | None = None
        self.idle = False
        self.has_error = False
        self._on_output = on_output
        self._clear_on_next = False
        self._displays: dict[str, list[int]] = {}  # display_id -> indices into outputs

    def handle(self, msg: dict[str, Any]) -> None:
        if msg["parent_header"].get("msg_id") != self.msg_id:
            return  # left over from an earlier, interrupted cell
        kind, content = msg["msg_type"], msg["content"]
        if kind == "status":
            self.idle = content.get("execution_state") == "idle"
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count")
        elif kind == "clear_output":
            self._clear_on_next = True
            if not content.get("wait", False):
                self._clear()
        elif kind == "update_display_data":
            self._update_display(content)
        elif kind in ("stream", "display_data", "execute_result", "error"):
            self._add(to_output(kind, content), content)

    def _add(self, output: Output, content: dict[str, Any]) -> None:
        if self._clear_on_next:
            self._clear()
        self.has_error = self.has_error or output["output_type"] == "error"
        last = self.outputs[-1] if self.outputs else None
        if output["output_type"] == "stream" and last and last.get("name") == output["name"]:
            last["text"] += output["text"]  # one output per run of same-stream chunks, as Jupyter
        else:
            display_id = (content.get("transient") or {}).get("display_id")
            if display_id:
                self._displays.setdefault(display_id, []).append(len(self.outputs))
            self.outputs.append(dict(output))
        if self._on_output is not None:
            self._on_output(output)

    def _update_display(self, content: dict[str, Any]) -> None:
        display_id = (content.get("transient") or {}).get("display_id", "")
        for index in self._displays.get(display_id, []):
            self.outputs[index]["data"] = dict(content.get("data", {}))
            self.outputs[index]["metadata"] = dict(content.get("metadata", {}))

    def _clear(self) -> None:
        self.outputs.clear()
        self._displays.clear()
        self._clear_on_next = False


def to_output(kind: str, content: dict[str, Any]) -> Output:
    """An iopub message's content as an nbformat v4 output dict."""
    if kind == "stream":
        return {"output_type": "stream", "name": content["name"], "text": content["text"]}
    if kind == "error":
        ename = content.get("ename", "")
        traceback = [NO_INPUT_LINE] if ename == NO_INPUT else list(content.get("traceback", []))
        return {
            "output_type": "error",
            "ename": ename,
            "evalue": content.get("evalue", ""),
            "traceback": traceback,
        }
    output: Output = {
        "output_type": kind,
        "data": dict(content.get("data", {})),
        "metadata": dict(content.get("metadata", {})),
    }
    if kind == "execute_result":
        output["execution_count"] = content.get("execution_count")
    return output


# ----------------------------------------------------------------------------- as a terminal shows


def terminal_line(raw: str) -> str:
    """The last state of one line as a terminal draws it: each `\\r` returns to the line's
    start and what follows overwrites the characters it covers (a progress bar's updates)."""
    if "\r" not in raw:
        return raw
    shown: list[str] = []
    for part in raw.split("\r"):
        shown[: len(part)] = part
    return "".join(shown)


def terminal_text(text: str) -> str:
    """Stream text as a terminal would show it: `\\r\\n` ends a line, a lone `\\r` overwrites
    (see `terminal_line`). An unfinished last line is kept without a newline."""
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(terminal_line(line) for line in lines)


def elide(lines: list[str], head: int, tail: int) -> list[str]:
    """`lines` when there are at most head + tail + 1 of them; otherwise the first `head`, one
    line saying how many were left out, and the last `tail`."""
    if len(lines) <= head + tail + 1:
        return lines
    left_out = len(lines) - head - tail
    return [*lines[:head], left_out_line(left_out), *lines[len(lines) - tail :]]


def left_out_line(count: int) -> str:
    return f"... {count} lines left out ..." if count != 1 else "... 1 line left out ..."


def compact_outputs(outputs: list[Output], head: int = 4, tail: int = 3) -> list[Output]:
    """A recorded turn's outputs as shown again on resume: streams as a terminal shows them and
    elided to head and tail lines, long text results elided the same way, a traceback cut to
    its last line. The recorded outputs are not changed."""
    shown: list[Output] = []
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream":
            lines = terminal_text(_joined(output.get("text", ""))).split("\n")
            end = lines.pop() if lines and lines[-1] == "" else None
            text = "\n".join(elide(lines, head, tail)) + ("\n" if end is not None else "")
            shown.append(output | {"text": text})
        elif kind == "error":
            shown.append(output | {"traceback": [f"{output.get('ename')}: {output.get('evalue')}"]})
        elif kind in ("execute_result", "display_data") and "text/plain" in output.get("data", {}):
            lines = _joined(output["data"]["text/plain"]).split("\n")
            data = output["data"] | {"text/plain": "\n".join(elide(lines, head, tail))}
            shown.append(output | {"data": data})
        else:
            shown.append(output)
    return shown


def _joined(value: str | list[str]) -> str:
    """nbformat allows multi-line strings as lists of lines."""
    return "".join(value) if isinstance(value, list) else value
