"""Showing code and its outputs in the terminal, through an injected `rich.Console`: the
`Renderer` (code, nbformat outputs, images), `CodeStream` (code drawn live while it streams) and
`help_view` (the commands' help as a table that wraps in its columns).

Outputs are nbformat v4 dicts as the executor produces them. Stream text is shown as a
terminal shows it (`\r\n` ends a line, a lone `\r` redraws it: the last state of each line), and
a run's output is cut to its first `head` and last `tail` lines with the count of the lines left
out between them (the notebook keeps them all). Each PNG is saved beside the session
(`<session stem>_images/turn<N>_<k>.png`) and its path is printed; it is also drawn in the
terminal across its width, keeping the aspect ratio (textual-image: Kitty's graphics protocol or
Sixel where the terminal answers that it has them, coloured half blocks elsewhere), unless
`images="off"`.
"""

from __future__ import annotations

import base64
import collections
import html
import io
import re
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.padding import Padding
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from codegen_repl.core.frontend import HELP_STEPS, help_rows
from codegen_repl.core.outputs import left_out_line, terminal_line
from codegen_repl.core.settings import DEFAULT_THEME

HEAD_LINES, TAIL_LINES = 40, 20  # of a run's output shown in the terminal
_TAG = re.compile(r"<[^>]+>")
_BLOCK_END = re.compile(r"</(tr|p|div|h\d|li|table|thead|tbody)>|<br\s*/?>", re.IGNORECASE)
_CELL_END = re.compile(r"</t[dh]>", re.IGNORECASE)


def code_view(code: str, theme: str = DEFAULT_THEME) -> Syntax:
    """Python source, highlighted with a pygments style."""
    return Syntax(code, "python", theme=theme, background_color="default", word_wrap=True)


def html_to_text(markup: str) -> str:
    """A readable plain-text view of simple HTML (pandas tables, short messages)."""
    text = _CELL_END.sub("\t", markup)
    text = _BLOCK_END.sub("\n", text)
    text = html.unescape(_TAG.sub("", text))
    lines = [line.rstrip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def help_view(prefix: str = "/") -> Group:
    """The help table (`help_rows`) in two columns at any width: a command is never broken
    across lines (it is typed as shown), its description wraps in its own column."""
    table = Table(box=None, show_header=False, padding=(0, 0, 0, 2), pad_edge=False)
    table.add_column(no_wrap=True, style="bold")
    table.add_column(overflow="fold")
    for head, about in help_rows(prefix):
        table.add_row(Text(head), Text(about))  # Text: `[key=value]` is no markup
    return Group(Text("commands:"), Padding(table, (0, 0, 0, 2)), Text(f"  {HELP_STEPS}"))


def images_folder(session_path: Path | None) -> Path | None:
    """Where a session's images go: `<stem>_images` beside the notebook (None: no file)."""
    if session_path is None:
        return None
    return session_path.parent / f"{session_path.stem}_images"


class Renderer:
    """Prints code and outputs; saves PNG outputs under `images` (None: not saved).

    Call `begin_turn(n)` before a turn's outputs arrive, so images get their turn number.
    `show_images`: "auto" (draw in the terminal when the console is one), "kitty", "sixel",
    "halfcell" (draw that way even into a file), or "off". `head` and `tail`: the lines of a
    turn's stream output shown before and after the ones left out.
    """

    def __init__(
        self,
        console: Console,
        images: Path | None = None,
        theme: str = DEFAULT_THEME,
        show_images: str = "auto",
        head: int = HEAD_LINES,
        tail: int = TAIL_LINES,
    ) -> None:
        self.console = console
        self.images = images
        self.theme, self.show_images = theme, show_images
        self.head, self.tail = head, tail
        self.turn_number = 0
        self._image_count = 0
        self._line = ""  # the open (unfinished) line of stream text, as received
        self._line_style = ""
        self._shown = ""  # what of the open line is on the screen
        self._lines = 0  # complete stream lines of this turn so far
        self._held: collections.deque[tuple[str, str]] = collections.deque(maxlen=tail)
        self._left_out = 0
        self._progress = False  # a progress line is on the screen (a terminal's, redrawn)

    def begin_turn(self, number: int) -> None:
        self.finish()
        self.turn_number, self._image_count = number, 0
        self._lines = 0

    def code(self, code: str) -> None:
        self.console.print(self.code_view(code))

    def code_view(self, code: str) -> Syntax:
        return code_view(code, self.theme)

    def outputs(self, outputs: list[dict]) -> None:
        for output in outputs:
            self.output(output)
        self.finish()

    def finish(self) -> None:
        """End a run's output on a fresh line: the open line, then the count of the lines left
        out and the last lines, if the output was long."""
        self._end_progress()
        if self._line:
            self._complete_line(self._line, self._line_style)
            self._line = ""
        if self._left_out:
            self.console.print(Text(left_out_line(self._left_out), style="dim"))
        for line, style in self._held:
            self.console.print(Text.from_ansi(line, style=style))
        self._held.clear()
        self._left_out = 0

    def progress(self, text: str) -> None:
        """Long work going on: on a terminal one line, redrawn by the next progress and erased
        by any other output; elsewhere (a file, a pipe) a line each."""
        self.finish()
        if not self.console.is_terminal:
            self.console.print(Text(text, style="dim"))
            return
        self._raw("\r\x1b[2K")
        self.console.print(Text(text[: max(self.console.width - 1, 1)], style="dim"), end="")
        self._progress = True

    def _end_progress(self) -> None:
        if self._progress:
            self._raw("\r\x1b[2K")
            self._progress = False

    def _raw(self, control: str) -> None:
        self.console.file.write(control)
        self.console.file.flush()

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
        """Stream text as a terminal shows it; lines past `head` are held (the last `tail`)."""
        if not text:
            return
        self._end_progress()
        style = "red" if name == "stderr" else ""
        if self._line and style != self._line_style:  # the other stream begins a new line
            self._complete_line(self._line, self._line_style)
            self._line = ""
        *complete, self._line = (self._line + text).replace("\r\n", "\n").split("\n")
        self._line_style = style
        for raw in complete:
            self._complete_line(raw, style)
        redraws = "\r" in self._line and not self.console.is_terminal  # wait for its end
        if self._lines < self.head and self._line and not redraws:
            self._show_open(terminal_line(self._line), style)

    def _complete_line(self, raw: str, style: str) -> None:
        state = terminal_line(raw)
        if self._lines < self.head:
            self._show_open(state, style, final=True)
            self.console.print()
        else:
            self._left_out += len(self._held) == self._held.maxlen
            self._held.append((state, style))
        self._lines += 1
        self._shown = ""

    def _show_open(self, state: str, style: str, final: bool = False) -> None:
        """Bring the screen's open line to `state`: the rest of it, or (it was drawn over by a
        `\r`) redrawn on a terminal; elsewhere a redraw waits for the line's end (`final`),
        where it goes on a line of its own."""
        if state.startswith(self._shown):
            rest = state[len(self._shown) :]
        elif self.console.is_terminal:
            self._raw("\r\x1b[2K")
            rest = state
        elif final:
            self.console.print()
            rest = state
        else:
            return
        if rest:
            self.console.print(Text.from_ansi(rest, style=style, end=""), end="")
        self._shown = state

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
            # the terminal's width; the height follows the picture's aspect ratio
            width = max(self.console.width - 1, 1)
            image = terminal_image(self.show_images)(io.BytesIO(png), width=width, height="auto")
            self.console.print(image)
        except Exception as error:  # a broken PNG or an odd terminal must not end the turn
            self.console.print(Text(f"[image not drawn: {error}]", style="dim"))


class CodeStream:
    """Generated code shown live and highlighted while it streams (a `LiveCode`); drawing
    starts at once and ends with `finish`."""

    def __init__(self, console: Console, renderer: Renderer) -> None:
        self.renderer, self.pieces = renderer, list[str]()
        self.live = Live(renderer.code_view(""), console=console, refresh_per_second=15,
                         vertical_overflow="visible")  # fmt: skip
        self.live.start()

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        self.live.update(self.renderer.code_view("".join(self.pieces)))

    def finish(self, code: str) -> None:
        """The final code (the cut may have removed a streamed tail); drawing stops."""
        if not self.live.is_started:
            return
        self.live.update(self.renderer.code_view(code))
        self.live.stop()
        if not self.live.console.is_terminal:  # rich ends the last line only on a terminal
            self.live.console.line()


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
