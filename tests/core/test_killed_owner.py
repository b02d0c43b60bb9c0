"""What a killed owner leaves behind: a save killed between writing its temp file and renaming
it leaves `.<name>.ipynb.XXXXXXXX`, which the next open of that session removes. (The kernel and
its processes going with a killed owner: tests/core/test_executor.py.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session
from tests.core.test_session import ScriptedDecoder

# Saves once, then is killed by SIGKILL inside its second save, after the temp file is written.
KILLED_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import nbformat
    from codegen_repl.core import notebook

    path = Path(sys.argv[1])
    notebook.write_atomically(path, nbformat.writes(nbformat.v4.new_notebook()))
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    notebook.write_atomically(path, "a second save, never finished")
    """
)


def test_a_save_killed_midway_leaves_a_temp_file_that_the_next_open_removes(tmp_path) -> None:
    path = tmp_path / "crash.ipynb"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WHILE_SAVING, str(path)], capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == -9, done.stderr
    [temp] = [p for p in tmp_path.iterdir() if p.name.startswith(".crash.ipynb.")]
    others = [tmp_path / ".other.ipynb.abcd1234", tmp_path / ".crash.ipynb.notes"]
    for other in others:  # another session's temp file, and a name tempfile never makes
        other.write_text("kept")
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = Session.open(path, ScriptedDecoder(), executor)
    assert session.turns == [] and not temp.exists()
    assert all(other.exists() for other in others)
