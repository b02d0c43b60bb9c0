"""The installed `codegen-repl` in a real pseudo-terminal (pexpect): what a person types."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

from tests.terminal import styled

pexpect = pytest.importorskip("pexpect", reason="pexpect is in the test extra")
SCRIPT = str(Path(sys.executable).with_name("codegen-repl"))
WAIT = 120  # a cold start imports JAX and compiles the tiny model on a 2-core machine


def without_script_folder(path: str) -> str:
    """PATH without the venv's bin folder, as after the README's install (never activated)."""
    folder = Path(SCRIPT).parent.resolve()
    kept = [entry for entry in path.split(os.pathsep) if entry and Path(entry).resolve() != folder]
    return os.pathsep.join(kept)


def spawn(*args: str, cwd: Path) -> pexpect.spawn:
    env = {
        **os.environ,
        "PATH": without_script_folder(os.environ.get("PATH", "")),
        "JAX_PLATFORMS": "cpu",
        "TERM": "xterm",
        "HF_HUB_OFFLINE": "1",
        "CODEGEN_REPL_DATA": str(cwd / "data"),
        "CODEGEN_REPL_CACHE": str(cwd / "cache"),
    }
    child = pexpect.spawn(SCRIPT, list(args), cwd=str(cwd), env=env, encoding="utf-8",
                          dimensions=(40, 120), timeout=WAIT)  # fmt: skip
    child.expect("Ctrl-D leaves")
    return child


def test_styled_text_is_found_after_a_live_display_stops() -> None:
    """The bytes of a CI failure: rich's Live display ended with CR + erase line before the
    cell's output, and the pattern (colour codes only) missed text the terminal showed."""
    written = "print\x1b[0m(i)\x1b[0m\r\n\x1b[?25h\r\x1b[2K0\r\n1\r\n2\r\n\x1b[6n"
    assert re.search(styled("\n0\r\n1\r\n2\r\n"), written)
    assert not re.search(styled("\n0\r\n1\r\n3\r\n"), written)


# pexpect forks to open the pseudo-terminal and execs the command at once, so JAX's threads in
# this test process (loaded by other tests) cannot deadlock the child.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_a_session_in_a_terminal(tmp_path: Path, chat_checkpoint: Path) -> None:
    session = tmp_path / "s.ipynb"
    args = ["chat", "--model", str(chat_checkpoint), "--session", str(session), "--yes"]
    child = spawn(*args, cwd=tmp_path)
    child.sendline("!x = 41")
    child.sendline("!print(x + 1)")
    child.expect("42")
    child.sendline("!print('looping', flush=True); exec('while True: pass')")
    child.expect("looping\r\n")  # the cell is running: Ctrl-C now goes to the cell
    child.sendcontrol("c")
    child.expect(r"\[interrupted\]")
    child.sendline("!print('still', x)")
    child.expect("still 41")
    child.sendline("!name = input('name? ')")  # the code's input() asks at the terminal
    child.expect(r"\x1b\[0mname\?")  # the code's prompt, drawn (not the echo of the line)
    child.sendline("Ada")
    child.sendline("!import getpass; secret = getpass.getpass('pw: ')")
    child.expect(r"\x1b\[0mpw:")
    child.sendline("s3cret")
    child.sendline("!print('hi', name, len(secret))")
    child.expect("hi Ada 6")
    assert "s3cret" not in child.before  # a password is not echoed
    child.sendline("/undo")
    child.expect("undone")
    child.sendline(f"/save {tmp_path / 'program.py'}")
    child.expect("saved to")
    child.expect(">>>")  # Ctrl-D at the prompt (typed earlier, the terminal would drop it)
    child.sendcontrol("d")
    child.expect(f"saved {session}")
    resume = (  # codegen-repl is not on PATH here: the path it was started by
        f"resume it with: {SCRIPT} --model {chat_checkpoint} --run auto --session {session}"
    )
    child.expect(styled(resume))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "x = 41" in (tmp_path / "program.py").read_text()

    again = spawn(*args, cwd=tmp_path)  # resume: the turns are shown again
    shown = re.sub(r"\x1b\[[0-9;]*m", "", again.before)
    assert "x = 41" in shown and "looping" in shown
    # The replay behind the prompt falls short at turn 5 (its input() has no one to answer),
    # so code typed meanwhile is kept unrun, and said so, rather than run without that state.
    again.sendline("!print(x * 2)")
    again.expect(styled("error: the kernel lacks the state of turns 5, 6, which this code"))
    again.expect(">>>")
    again.sendline("/run 7")
    again.expect("82")
    again.expect(">>>")
    again.sendcontrol("d")
    again.expect(pexpect.EOF)
    again.close()
    assert again.exitstatus == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_steps_with_a_trained_model_in_a_terminal(tmp_path: Path, trained_checkpoint: Path) -> None:
    """Natural-language steps, the code the model writes for them, and what it prints."""
    session = tmp_path / "steps.ipynb"
    args = ["chat", "--model", str(trained_checkpoint), "--session", str(session), "--yes"]
    child = spawn(*args, cwd=tmp_path)
    try:
        drive_steps(child)
    finally:
        child.close(force=True)  # also when an expectation failed: no process is left behind
    assert child.exitstatus == 0
    notebook = nbformat.read(session, as_version=4)
    steps = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    assert steps == ["define add", "use add", "loop forever", "count to three"]


def drive_steps(child: pexpect.spawn) -> None:
    child.sendline("define add")
    child.expect(styled("return a + b"))
    child.sendline("use add")
    child.expect(styled("print(add(2, 3))"))
    child.expect(styled("\n5\r\n"))
    child.sendline("/context")
    child.expect(styled("# use add"))
    child.expect(r"\d+ tokens of 512")
    child.sendline("loop forever")
    child.expect(styled("while True:"))
    child.expect(styled("\nlooping\r\n"))  # printed by the loop's cell: it runs now
    child.sendcontrol("c")  # so Ctrl-C interrupts the kernel
    child.expect(r"\[interrupted\]")
    child.sendline("count to three")
    child.expect(styled("\n0\r\n1\r\n2\r\n"))
    child.expect(">>>")
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
