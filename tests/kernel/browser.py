"""JupyterLab on 127.0.0.1, driven in headless Chromium through selenium.

`jupyter_lab` starts a real JupyterLab server in a temporary world (its own config, data,
runtime and settings folders, so nothing of the developer's is read or written, and nothing
reaches the network: announcements, update checks and the extension manager are off);
`chromium` starts Debian's chromium through its chromedriver; `LabPage` does in the page what a
user does (open a notebook, run a cell, switch the theme, press the stop button) and waits for
what the page shows, never for a fixed time. `contrast_ratio` is WCAG 2.x's.

Used by tests/kernel/test_browser.py and by docs/jupyterlab_screenshot.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # a test extra: without it this module still imports, and missing() says what to install
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pass

CHROMIUM = Path("/usr/bin/chromium")  # Debian's `chromium` package
CHROMEDRIVER = Path("/usr/bin/chromedriver")  # Debian's `chromium-driver` package
# Without these, headless Chromium keeps trying the (closed) network: updates, sync, QUIC.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
)  # fmt: skip
SERVER_START_S = 90.0  # a loaded 2-core machine: JupyterLab imports and scans its extensions
STEP_S = 120.0  # one cell: the model loads and JAX compiles on the first step
UI_S = 30.0  # the page: JupyterLab's bundle loads, a menu opens, a kernel becomes idle
# Lab plugins that would reach the network or ask the user something on start.
DISABLED_PLUGINS = {
    "@jupyterlab/extensionmanager-extension": True,
    "@jupyterlab/apputils-extension:announcements": True,
}


def missing() -> str | None:
    """Why a browser test cannot run here (None: it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.is_file():
            return f"{path} is missing (Debian: apt-get install chromium chromium-driver)"
    for module in ("selenium", "jupyterlab"):
        if importlib.util.find_spec(module) is None:
            return f"python package {module} is missing (pip install -e '.[test]')"
    return None


# ---------------------------------------------------------------------------- the server


@dataclasses.dataclass(frozen=True)
class Lab:
    """A running JupyterLab: its base URL (with the trailing slash) and its token."""

    url: str
    token: str
    root: Path
    log: Path

    def page(self, path: str) -> str:
        """The URL of `path` under /lab, with the token (the page then stores its cookie)."""
        return f"{self.url}lab/tree/{path}?token={self.token}"


def _write_config(config: Path) -> None:
    """Server and page settings that keep JupyterLab off the network and quiet."""
    config.mkdir(parents=True, exist_ok=True)
    server = {
        "LabApp": {
            "news_url": None,
            "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
            "extension_manager": "readonly",
        },
        "ServerApp": {"jpserver_extensions": {"jupyter_lsp": False}},
    }
    (config / "jupyter_server_config.json").write_text(json.dumps(server))
    (config / "labconfig").mkdir(exist_ok=True)
    page = {"disabledExtensions": DISABLED_PLUGINS}
    (config / "labconfig" / "page_config.json").write_text(json.dumps(page))


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path, env: dict[str, str]) -> Iterator[Lab]:
    """JupyterLab serving `root` on 127.0.0.1 at a port the OS picks, with a fresh token.

    Args:
        root: the folder the file browser shows (notebooks go here).
        home: an empty folder for JupyterLab's config, data, runtime and settings.
        env: variables for the server and the kernels it starts (JUPYTER_PATH to find a
            kernelspec, CODEGEN_REPL_CONFIG), over this process's environment.

    Raises:
        RuntimeError: the server exited or did not say where it listens within
            SERVER_START_S seconds (the message holds the end of its log).
    """
    config, runtime = home / "config", home / "runtime"
    _write_config(config)
    token = secrets.token_hex(16)
    variables = os.environ | env | {
        "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_DATA_DIR": str(home / "data"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }  # fmt: skip
    argv = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        "--ServerApp.port=0", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", "--allow-root",  # CI runs as root
    ]  # fmt: skip
    log = home / "jupyterlab.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=variables, stdout=sink, stderr=subprocess.STDOUT)
    try:
        url = _server_url(process, runtime, log)
        yield Lab(url, token, root, log)
    finally:
        process.terminate()  # jupyter_server shuts its kernels down on SIGTERM
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _server_url(process: subprocess.Popen[bytes], runtime: Path, log: Path) -> str:
    """The URL from the server's runtime file (jpserver-PID.json), once it is written."""
    deadline = time.monotonic() + SERVER_START_S
    info = runtime / f"jpserver-{process.pid}.json"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{_tail(log)}")
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return str(json.loads(info.read_text())["url"])
        time.sleep(0.2)  # polling a file that appears once; nothing to wait on instead
    raise RuntimeError(f"JupyterLab did not start in {SERVER_START_S:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------------------- the browser


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile in `profile`; always quit."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile) + ".log")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------------------- the page

# Each piece of text under `arguments[0]`, in document order: the text, its element's computed
# colour, and the background colours from that element up to the document (nearest first).
_COLOURS_JS = """
const walker = document.createTreeWalker(arguments[0], NodeFilter.SHOW_TEXT);
const found = [];
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const backgrounds = [];
  for (let e = node.parentElement; e; e = e.parentElement) {
    backgrounds.push(getComputedStyle(e).backgroundColor);
  }
  found.push([node.textContent, getComputedStyle(node.parentElement).color, backgrounds]);
}
return found;
"""


@dataclasses.dataclass(frozen=True)
class Colours:
    """A piece of text as shown: its colour over the backgrounds behind it (CSS colours)."""

    text: str
    colour: str
    backgrounds: tuple[str, ...]  # nearest first, up to the document's root

    def contrast(self) -> float:
        """WCAG 2.x contrast ratio of the text against what is behind it (1..21)."""
        behind = (1.0, 1.0, 1.0)  # the canvas under a transparent page is white
        for background in reversed(self.backgrounds):
            behind = _over(parse_css_colour(background), behind)
        return contrast_ratio(_over(parse_css_colour(self.colour), behind), behind)


_NUMBER = re.compile(r"[0-9.]+")


def parse_css_colour(value: str) -> tuple[float, float, float, float]:
    """`rgb(r, g, b)` or `rgba(r, g, b, a)` (what getComputedStyle returns for sRGB colours)
    as (r, g, b, alpha) in 0..1.

    Raises:
        ValueError: another notation (a `color(...)` space this check does not convert).
    """
    head, _, rest = value.partition("(")
    if head not in ("rgb", "rgba") or not rest.endswith(")"):
        raise ValueError(f"not an sRGB computed colour: {value!r}")
    parts = [float(number) for number in _NUMBER.findall(rest)]
    red, green, blue = (channel / 255 for channel in parts[:3])
    return red, green, blue, parts[3] if len(parts) == 4 else 1.0


def _over(
    top: tuple[float, float, float, float], below: tuple[float, float, float]
) -> tuple[float, float, float]:
    """`top` composited over an opaque colour (source-over, in sRGB as browsers do)."""
    red, green, blue, alpha = top
    return (
        alpha * red + (1 - alpha) * below[0],
        alpha * green + (1 - alpha) * below[1],
        alpha * blue + (1 - alpha) * below[2],
    )


def relative_luminance(rgb: tuple[float, float, float]) -> float:
    """WCAG 2.x relative luminance of an sRGB colour (channels 0..1),
    https://www.w3.org/TR/WCAG21/#dfn-relative-luminance."""
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast_ratio(first: tuple[float, float, float], second: tuple[float, float, float]) -> float:
    """WCAG 2.x contrast ratio (L1 + 0.05) / (L2 + 0.05), 1..21; 4.5 is level AA for body
    text, https://www.w3.org/TR/WCAG21/#dfn-contrast-ratio."""
    lighter, darker = sorted((relative_luminance(first), relative_luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


class LabPage:
    """A notebook open in JupyterLab, used through its toolbar, menus and keys."""

    def __init__(self, driver: WebDriver, lab: Lab) -> None:
        self.driver, self.lab = driver, lab

    def open(self, notebook: str) -> None:
        """Open `notebook` (under the lab's root) and wait for its kernel to be idle."""
        self.driver.get(self.lab.page(notebook))
        self._wait(lambda _: len(self.cells()) > 0, UI_S, "the notebook's cells to show")
        self.wait_idle(STEP_S)

    def cells(self) -> list[WebElement]:

        return self.driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook .jp-Cell")

    def prompt(self, index: int) -> str:
        """The cell's input prompt: `[ ]:`, `[*]:` while it runs, `[7]:` when done."""

        return self.cells()[index].find_element(By.CSS_SELECTOR, ".jp-InputPrompt").text.strip()

    def kernel_status(self) -> str:
        """The status bar's kernel state (`Idle`, `Busy`, `Starting`, ...)."""

        items = self.driver.find_elements(By.CSS_SELECTOR, ".jp-StatusBar-TextItem")
        for item in items:
            name, bar, state = item.text.rpartition(" | ")
            if bar and name:
                return state
        return ""

    def wait_idle(self, timeout: float) -> None:
        self._wait(lambda _: self.kernel_status() == "Idle", timeout, "the kernel to be idle")

    def select(self, index: int) -> None:
        """Select the cell in command mode (a click on its prompt, as a user does)."""

        cell = self.cells()[index]
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
        cell.find_element(By.CSS_SELECTOR, ".jp-InputPrompt").click()

        def selected(_):
            return "jp-mod-selected" in (self.cells()[index].get_attribute("class") or "")

        self._wait(selected, UI_S, f"cell {index} to be selected")

    def start(self, index: int) -> None:
        """Run the cell in place (Ctrl+Enter) and wait until its prompt changes (`[*]:`, or
        already the next count for a quick cell)."""

        self.select(index)
        before = self.prompt(index)
        ActionChains(self.driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(
            Keys.CONTROL
        ).perform()
        self._wait(lambda _: self.prompt(index) != before, UI_S, f"cell {index} to start")

    def run(self, index: int, timeout: float = STEP_S) -> None:
        """Run the cell and wait for its reply (its prompt shows a count again)."""
        self.start(index)
        self.wait_done(index, timeout)

    def wait_done(self, index: int, timeout: float) -> None:
        running = ("[*]:", "[ ]:")
        self._wait(lambda _: self.prompt(index) not in running, timeout, f"cell {index} to end")

    def outputs(self, index: int) -> list[WebElement]:
        """The cell's rendered outputs, in order (each has `data-mime-type`)."""

        return self.cells()[index].find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")

    def output_text(self, index: int) -> str:
        return "\n".join(output.text for output in self.outputs(index))

    def wait_output(self, index: int, text: str, timeout: float) -> None:
        self._wait(lambda _: text in self.output_text(index), timeout, f"{text!r} in cell {index}")

    def interrupt(self) -> None:
        """The toolbar's stop button (Interrupt the kernel)."""
        self._click("jp-button[data-command='notebook:interrupt-kernel']")

    def use_theme(self, theme: str) -> None:
        """Settings > Theme > `theme` from the menu bar; waits until the page shows it."""

        def menu_item(container: str, label: str) -> WebElement:
            return next(item for item in self._all(container) if item.text.strip() == label)

        menu_item(".lm-MenuBar-item", "Settings").click()
        menu_item(".lm-Menu-item", "Theme").click()
        self._wait(
            lambda _: theme in [item.text.strip() for item in self._all(".lm-Menu-item")],
            UI_S,
            f"{theme} in the theme menu",
        )
        background = (
            "return getComputedStyle(document.querySelector('.jp-Notebook')).backgroundColor"
        )
        before = self.driver.execute_script(background)
        menu_item(".lm-Menu-item", theme).click()
        name = "return document.body.dataset.jpThemeName"

        # The name is set when the theme is chosen; the colours change once its CSS has loaded.
        def shown(d):
            return d.execute_script(name) == theme and d.execute_script(background) != before

        self._wait(shown, UI_S, f"the {theme} theme")

    def save(self) -> None:
        """The toolbar's save button; waits until the tab no longer shows unsaved changes."""
        self._click("jp-button[data-command='docmanager:save']")
        dirty = ".lm-TabBar-tab.jp-mod-dirty"
        self._wait(lambda d: not d.find_elements(By.CSS_SELECTOR, dirty), UI_S, "the save")

    def close_sidebar(self) -> None:
        """Collapse the left sidebar (a click on its open tab), so the notebook is wider."""
        self._click(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        shown = "#jp-left-stack:not(.lm-mod-hidden)"
        self._wait(
            lambda d: not d.find_elements(By.CSS_SELECTOR, shown), UI_S, "the sidebar to close"
        )

    def colours(self, element: WebElement) -> list[Colours]:
        """Every piece of text in `element` with the colours it is shown in."""
        found = self.driver.execute_script(_COLOURS_JS, element)
        return [Colours(text, colour, tuple(backgrounds)) for text, colour, backgrounds in found]

    def _all(self, selector: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def _click(self, selector: str) -> None:

        self.driver.find_element(By.CSS_SELECTOR, selector).click()

    def _wait(self, condition: Any, timeout: float, what: str) -> None:
        """Wait for `condition(driver)`; a timeout names what did not happen."""

        waiting = WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.1,
            ignored_exceptions=[StaleElementReferenceException],
        )
        waiting.until(condition, f"waited {timeout:.0f} s for {what}")
