"""Showing code and its outputs in the terminal, through an injected `rich.Console`.

Outputs are nbformat v4 dicts as the executor produces them. Each PNG is saved beside the
session (`<session stem>_images/turn<N>_<k>.png`) and its path is printed; it is also drawn in
the terminal (textual-image: Kitty's graphics protocol or Sixel where the terminal answers that it
has them, coloured half blocks elsewhere), unless `images="off"`.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax
from rich.text import Text

THEME = "monokai"
IMAGE_WIDTH = 60  # terminal cells; the saved file keeps the full resolution
_TAG = re.compile(r"<[^>]+>")
_BLOCK_END = re.compile(r"</(tr|p|div|h\d|li|table|thead|tbody)>|<br\s*/?>", re.IGNORECASE)
_CELL_END = re.compile(r"</t[dh]>", re.IGNORECASE)


def code_view(code: str, theme: str = THEME) -> Syntax:
    """Python source, highlighted with a pygments style."""
    return Syntax(code, "python", theme=theme, background_color="default", word_wrap=True)


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
    `show_images`: "auto" (draw in the terminal when the console is one), "kitty", "sixel",
    "halfcell" (draw that way even into a file), or "off".
    """

    def __init__(
        self,
        console: Console,
        images: Path | None = None,
        theme: str = THEME,
        show_images: str = "auto",
    ) -> None:
        self.console = console
        self.images = images
        self.theme, self.show_images = theme, show_images
        self.turn_number = 0
        self._image_count = 0
        self._open_line = False  # a stream chunk left the cursor mid-line

    def begin_turn(self, number: int) -> None:
        self.turn_number, self._image_count = number, 0

    def code(self, code: str) -> None:
        self.console.print(self.code_view(code))

    def code_view(self, code: str) -> Syntax:
        return code_view(code, self.theme)

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
        png = base64.b64decode(encoded)
        self._draw(png)
        if self.images is None:
            self.console.print("[image/png: not saved, this session has no file]", markup=False)
            return
        self.images.mkdir(parents=True, exist_ok=True)
        path = self.images / f"turn{self.turn_number}_{self._image_count}.png"
        path.write_bytes(png)
        self.console.print(Text(f"[image saved: {path}]", style="cyan"))

    def _draw(self, png: bytes) -> None:
        """The image itself, in the terminal; a picture that cannot be drawn is only saved."""
        if self.show_images == "off" or (
            self.show_images == "auto" and not self.console.is_terminal
        ):
            return
        try:
            image = terminal_image(self.show_images)(io.BytesIO(png), width=IMAGE_WIDTH)
            self.console.print(image)
        except Exception as error:  # a broken PNG or an odd terminal must not end the turn
            self.console.print(Text(f"[image not drawn: {error}]", style="dim"))


def terminal_image(mode: str) -> type:
    """textual-image's renderable for a mode. "auto" asks the terminal what it supports (once,
    on first use: the import sends the queries)."""
    from textual_image import renderable

    classes = {"kitty": renderable.TGPImage, "sixel": renderable.SixelImage,
               "halfcell": renderable.HalfcellImage}  # fmt: skip
    return classes.get(mode, renderable.Image)


def _joined(value: str | list[str]) -> str:
    """nbformat allows multi-line strings as lists of lines."""
    return "".join(value) if isinstance(value, list) else value
