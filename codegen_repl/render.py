"""Showing code and its outputs in the terminal, through an injected `rich.Console`.

Outputs are nbformat v4 dicts as the executor produces them. Images cannot be trusted to
display in every terminal, so each PNG is saved beside the session
(`<session stem>_images/turn<N>_<k>.png`) and its path is printed.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text

THEME = "monokai"
_TAG = re.compile(r"<[^>]+>")
_BLOCK_END = re.compile(r"</(tr|p|div|h\d|li|table|thead|tbody)>|<br\s*/?>", re.IGNORECASE)
_CELL_END = re.compile(r"</t[dh]>", re.IGNORECASE)


def code_view(code: str) -> Syntax:
    """Python source, highlighted."""
    return Syntax(code, "python", theme=THEME, background_color="default", word_wrap=True)


def html_to_text(markup: str) -> str:
    """A readable plain-text view of simple HTML (pandas tables, short messages)."""
    text = _CELL_END.sub("\t", markup)
    text = _BLOCK_END.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def images_folder(session_path: Path | None) -> Path | None:
    """Where a session's images go: `<stem>_images` beside the notebook (None: no file)."""
    if session_path is None:
        return None
    return session_path.parent / f"{session_path.stem}_images"


class Renderer:
    """Prints code and outputs; saves PNG outputs under `images` (None: not saved).

    Call `begin_turn(n)` before a turn's outputs arrive, so images get their turn number.
    """

    def __init__(self, console: Console, images: Path | None = None) -> None:
        self.console = console
        self.images = images
        self.turn_number = 0
        self._image_count = 0
        self._open_line = False  # a stream chunk left the cursor mid-line

    def begin_turn(self, number: int) -> None:
        self.turn_number, self._image_count = number, 0

    def code(self, code: str) -> None:
        self.console.print(code_view(code))

    def outputs(self, outputs: list[dict]) -> None:
        for output in outputs:
            self.output(output)
        self.finish()

    def finish(self) -> None:
        """End a run's output on a fresh line."""
        if self._open_line:
            self.console.print()
            self._open_line = False

    def output(self, output: dict) -> None:
        """One nbformat output dict (stream chunks may arrive unmerged)."""
        kind = output.get("output_type")
        if kind == "stream":
            self._stream(output.get("name", "stdout"), _joined(output.get("text", "")))
            return
        self.finish()
        if kind == "error":
            self._error(output)
        elif kind in ("execute_result", "display_data"):
            self._data(output.get("data", {}))

    def _stream(self, name: str, text: str) -> None:
        if not text:
            return
        style = "red" if name == "stderr" else ""
        self.console.print(Text.from_ansi(text, style=style, end=""), end="")
        self._open_line = not text.endswith("\n")

    def _error(self, output: dict) -> None:
        lines = output.get("traceback") or [f"{output.get('ename')}: {output.get('evalue')}"]
        for line in lines:
            self.console.print(Text.from_ansi(line))

    def _data(self, data: dict) -> None:
        if "image/png" in data:
            self._image(_joined(data["image/png"]))
        if "text/html" in data and "image/png" not in data:
            self.console.print(Text(html_to_text(_joined(data["text/html"]))))
        elif "text/plain" in data and "image/png" not in data:
            self.console.print(Text.from_ansi(_joined(data["text/plain"])))

    def _image(self, encoded: str) -> None:
        self._image_count += 1
        if self.images is None:
            self.console.print("[image/png: not saved, this session has no file]", markup=False)
            return
        self.images.mkdir(parents=True, exist_ok=True)
        path = self.images / f"turn{self.turn_number}_{self._image_count}.png"
        path.write_bytes(base64.b64decode(encoded))
        self.console.print(Text(f"[image saved: {path}]", style="cyan"))


def _joined(value: str | list[str]) -> str:
    """nbformat allows multi-line strings as lists of lines."""
    return "".join(value) if isinstance(value, list) else value
