"""A session file that cannot be written loses nothing: the turns stay in memory, the user is
told once per failed autosave, `/save` writes them elsewhere, and the REPL's exit saves them to
the data folder instead."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import nbformat
import pytest
from rich.console import Console

from codegen_repl.core.commands import Commands
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.session import Session
from codegen_repl.errors import ConfigError
from codegen_repl.repl.loop import Repl
from tests.core.test_interrupts import Shown
from tests.core.test_session import ScriptedDecoder


def break_folder(folder: Path) -> None:
    """The session's folder becomes a plain file: every write there fails (as on a read-only
    or full disk; tests run as root, which file modes would not stop)."""
    shutil.rmtree(folder)
    folder.write_text("not a folder")


def test_a_failed_autosave_is_told_once_and_loses_no_turn(tmp_path: Path) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = Session(ScriptedDecoder(), executor, folder / "s.ipynb")
        shown = Shown()
        commands = Commands(session, shown, run_mode="auto")
        commands.handle("!x = 1")
        break_folder(folder)
        commands.handle("!y = x + 1")
        commands.handle("/help")
        warnings = [text for text in shown.texts if "cannot write" in text]
        assert len(warnings) == 1, shown.texts
        assert str(folder / "s.ipynb") in warnings[0] and "/save PATH.ipynb" in warnings[0]
        assert [turn.code for turn in session.turns] == ["x = 1", "y = x + 1"]
        with pytest.raises(ConfigError, match="cannot write"):
            session.save()
        elsewhere = tmp_path / "elsewhere.ipynb"
        commands.handle(f"/save {elsewhere}")  # as the warning says: the session moves there
        assert shown.texts[-1] == f"saved to {elsewhere}; the session autosaves there from now on"
        commands.handle("!w = y * 2")
        saved = nbformat.read(elsewhere, as_version=4)
        assert [cell.source for cell in saved.cells] == ["x = 1", "y = x + 1", "w = y * 2"]
        assert len([text for text in shown.texts if "cannot write" in text]) == 1


def test_the_repl_saves_to_the_data_folder_when_the_session_file_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEGEN_REPL_DATA", str(tmp_path / "data"))
    folder = tmp_path / "work"
    folder.mkdir()
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = Session(ScriptedDecoder(), executor, folder / "s.ipynb")
        out = io.StringIO()
        repl = Repl(session, Console(file=out, width=200), "auto")
        lines = iter(["!z = 3"])

        def read_line() -> str:
            line = next(lines, None)
            if line is None:
                break_folder(folder)
                raise EOFError
            return line

        repl.loop(read_line)
    kept = list((tmp_path / "data" / "unsaved").glob("*.ipynb"))
    assert len(kept) == 1, out.getvalue()
    assert [cell.source for cell in nbformat.read(kept[0], as_version=4).cells] == ["z = 3"]
    assert f"saving to {kept[0]} instead" in out.getvalue().replace("\n", "")


def test_when_nothing_can_be_saved_the_prompt_comes_back_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").write_text("not a folder either")  # the data folder is unwritable too
    monkeypatch.setenv("CODEGEN_REPL_DATA", str(tmp_path / "data"))
    folder = tmp_path / "work"
    folder.mkdir()
    rescue = tmp_path / "rescue.ipynb"
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        session = Session(ScriptedDecoder(), executor, folder / "s.ipynb")
        out = io.StringIO()
        repl = Repl(session, Console(file=out, width=300), "auto")
        lines = iter(["!z = 3", None, f"/save {rescue}", None])

        def read_line() -> str:
            line = next(lines)
            if line is None:  # Ctrl-D
                if folder.is_dir():
                    break_folder(folder)
                raise EOFError
            return line

        repl.loop(read_line)
    shown = out.getvalue().replace("\n", "")
    assert "nothing was saved: free some space or /save PATH.ipynb elsewhere" in shown
    assert [cell.source for cell in nbformat.read(rescue, as_version=4).cells] == ["z = 3"]
    assert f"saved {rescue}" in shown  # the second Ctrl-D saved to where the session moved
