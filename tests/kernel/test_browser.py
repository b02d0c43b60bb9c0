"""The `codegen` kernel in JupyterLab, driven in headless Chromium as a user drives it.

A real JupyterLab server on 127.0.0.1 (a temporary root, config and kernelspec), Debian's
chromium through selenium, and the tiny trained model, so the steps get real code: run three
steps, re-run the first, switch to JupyterLab Dark and run one, stop a loop with the toolbar's
stop button, and check what the page shows: the code, its outputs, one copy of the re-run step
in the program, and code colours readable against the theme's background (WCAG contrast).
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

from tests.kernel import browser
from tests.kernel.conftest import install
from tests.trained import PAIRS

NAME = "codegen-browser-test"
CELLS = ["define add", "use add", "make squares", "count to three", "loop forever", "%code"]
# Only Dark is held to AA: JupyterLab Light's own editor colours miss it (brackets #997 on
# white, 2.9:1), and code that follows the theme takes those.
DARK = "JupyterLab Dark"
WCAG_AA = 4.5  # the contrast body text needs (WCAG 2.x, success criterion 1.4.3)
STDOUT = "application/vnd.jupyter.stdout"
STREAMS = (STDOUT, "application/vnd.jupyter.stderr")


def test_contrast_ratio_follows_wcag() -> None:
    """The formula's published anchors: black on white is 21:1, a colour against itself 1:1,
    #777777 on white just misses AA (4.48:1), and a translucent colour is blended first."""
    assert browser.contrast_ratio((0, 0, 0), (1, 1, 1)) == pytest.approx(21.0)
    assert browser.contrast_ratio((0.2, 0.4, 0.6), (0.2, 0.4, 0.6)) == pytest.approx(1.0)
    grey = browser.parse_css_colour("rgb(119, 119, 119)")[:3]
    assert browser.contrast_ratio(grey, (1, 1, 1)) == pytest.approx(4.48, abs=0.005)
    faint = browser.Colours("x", "rgba(0, 0, 0, 0.5)", ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)"))
    assert faint.contrast() == pytest.approx(browser.contrast_ratio((0.5,) * 3, (1, 1, 1)))
    with pytest.raises(ValueError, match="not an sRGB computed colour"):
        browser.parse_css_colour("color(display-p3 1 0 0)")


def code_display(page: browser.LabPage, index: int):
    """The one output of cell `index` that shows the code written for its step."""
    first_line = PAIRS[CELLS[index]].splitlines()[0]
    outputs = page.outputs(index)
    kinds = [out.get_attribute("data-mime-type") for out in outputs]
    shown = [out for out, kind in zip(outputs, kinds, strict=True)
             if kind not in STREAMS and first_line in out.text]  # fmt: skip
    assert len(shown) == 1, [out.text for out in page.outputs(index)]
    return shown[0]


def assert_readable(page: browser.LabPage, index: int, theme: str = DARK) -> None:
    """Cell `index` shows its step's code, every piece of it at AA contrast or better."""
    colours = page.colours(code_display(page, index))
    assert PAIRS[CELLS[index]] in "".join(piece.text for piece in colours)
    unreadable = [(c.text, c.colour, c.backgrounds[:3], round(c.contrast(), 2))
                  for c in colours if c.text.strip() and c.contrast() < WCAG_AA]  # fmt: skip
    assert not unreadable, f"code of cell {index} in {theme} below {WCAG_AA}:1: {unreadable}"


def stdout(page: browser.LabPage, index: int) -> str:
    return "".join(out.text for out in page.outputs(index)
                   if out.get_attribute("data-mime-type") == STDOUT)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))
def test_jupyterlab_runs_steps_reruns_a_cell_reads_in_dark_and_stops_a_loop(
    trained_checkpoint: Path, tmp_path: Path
) -> None:
    data = install(tmp_path / "jupyter", NAME, trained_checkpoint)
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "config.toml"
    config.write_text("temperature = 0\nmax_new_tokens = 48\n")  # greedy: the trained code
    kernelspec = {"name": NAME, "display_name": "CodeGen", "language": "codegen"}
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(step) for step in CELLS],
        metadata={"kernelspec": kernelspec},
    )
    nbformat.write(notebook, root / "steps.ipynb")
    env = {"JUPYTER_PATH": str(data), "CODEGEN_REPL_CONFIG": str(config)}

    with (
        browser.jupyter_lab(root, tmp_path / "lab", env) as lab,
        browser.chromium(tmp_path / "chromium") as driver,
    ):
        page = browser.LabPage(driver, lab)
        page.open("steps.ipynb")
        for index in range(3):
            page.run(index)
            assert PAIRS[CELLS[index]] in code_display(page, index).text  # the code is shown
        assert stdout(page, 1).strip() == "5"
        assert stdout(page, 2).strip() == "[0, 1, 4, 9, 16]"

        page.run(0)  # re-run: the cell's turn is replaced, not appended
        assert PAIRS["define add"] in code_display(page, 0).text

        page.use_theme(DARK)
        page.run(3)
        assert stdout(page, 3).strip() == "0\n1\n2"
        for index in range(4):  # every step's code, the ones shown before the switch too
            assert_readable(page, index, DARK)

        page.start(4)
        page.wait_output(4, "looping", browser.STEP_S)
        pressed = time.monotonic()
        page.interrupt()
        page.wait_done(4, browser.UI_S)
        print(f"the stop button ended the loop in {time.monotonic() - pressed:.2f} s")
        page.wait_output(4, "KeyboardInterrupt", browser.UI_S)

        page.run(5)  # %code: the program holds the re-run step once
        program = page.output_text(5)
        assert program.count("def add(a, b):") == 1, program
        assert PAIRS["make squares"] in program
