"""Redo docs/jupyterlab.png: the `codegen` kernel in JupyterLab, as the README shows it.

    .venv/bin/python docs/jupyterlab_screenshot.py [--model CHECKPOINT] [--out docs/jupyterlab.png]

Starts JupyterLab on 127.0.0.1 with the kernelspec in a temporary folder, runs a few steps in
headless Chromium (the same code as tests/kernel/test_browser.py: tests/kernel/browser.py) and
saves a screenshot of the page. Without --model it trains the tests' tiny model first (a few
minutes on a CPU; it writes real code for the steps below). Needs the test extra and Debian's
chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not installed: import it from the checkout

import nbformat  # noqa: E402

from tests.kernel import browser  # noqa: E402
from tests.kernel.conftest import install  # noqa: E402

STEPS = ["define add", "use add", "make squares", "plot a line"]
NAME = "codegen"
WINDOW = (1280, 1350)  # pixels: the four steps and the plot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="checkpoint folder (default: train the tiny one)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "jupyterlab.png")
    args = parser.parse_args()
    if browser.missing():
        sys.exit(f"cannot take the screenshot: {browser.missing()}")
    with tempfile.TemporaryDirectory(prefix="codegen-screenshot-") as folder:
        work = Path(folder)
        model = args.model or tiny_model(work / "tiny-trained-codegen")
        shoot(model.resolve(), work, args.out)
    print(args.out)


def tiny_model(folder: Path) -> Path:
    """The tests' tiny trained CodeGen (tests/trained.py), in `folder`/checkpoint."""
    from tests.trained import build_trained_checkpoint

    print("training the tiny model (a few minutes on a CPU) ...", file=sys.stderr)
    return build_trained_checkpoint(folder)


def shoot(model: Path, work: Path, out: Path) -> None:
    """Run STEPS in a fresh notebook and save the page as a PNG at `out`."""
    data = install(work / "jupyter", NAME, model)
    root = work / "notebooks"
    root.mkdir()
    config = work / "config.toml"
    config.write_text("temperature = 0\nmax_new_tokens = 48\n")
    kernelspec = {"name": NAME, "display_name": "CodeGen", "language": "codegen"}
    cells = [nbformat.v4.new_code_cell(step) for step in STEPS]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": kernelspec}),
                   root / "steps.ipynb")  # fmt: skip
    env = {"JUPYTER_PATH": str(data), "CODEGEN_REPL_CONFIG": str(config)}
    with (
        browser.jupyter_lab(root, work / "lab", env) as lab,
        browser.chromium(work / "chromium") as driver,
    ):
        driver.set_window_size(*WINDOW)
        page = browser.LabPage(driver, lab)
        page.open("steps.ipynb")
        page.close_sidebar()
        for index in range(len(STEPS)):
            page.run(index)
        page.save()  # no unsaved-changes dot on the tab
        page.select(0)  # the first step at the top, nothing in edit mode
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))


if __name__ == "__main__":
    main()
