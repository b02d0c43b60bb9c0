"""The commands that change which notebook the session is: save, load, reset, mtpb.

Split out of `commands.py` (one command layer, in two files by what a command touches): the
`Commands` class mixes this in, so each front end still sees one table and one set of messages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from codegen_repl.core.context import MTPB_PREFIX
from codegen_repl.core.frontend import Frontend, LiveCode, parse_mtpb
from codegen_repl.core.notebook import new_session_path, written_here
from codegen_repl.core.session import RunChoice, Session, Turn, count_of
from codegen_repl.errors import ConfigError


class NotebookCommands:
    """save, load, reset and mtpb over `self.session` and `self.frontend` (set by `Commands`)."""

    frontend: Frontend
    folder: Path
    mtpb_problems: Path | None
    session: Session

    if TYPE_CHECKING:  # provided by Commands

        def _progress(self, text: str) -> None: ...
        def _answer(self, question: str, otherwise: str) -> str: ...
        def _decide(self, code: str) -> tuple[RunChoice, str]: ...
        def show_turns(self, turns: list[Turn], first: int, compact: bool = False) -> None: ...

    def _save(self, argument: str) -> None:
        if not argument and self.session.path is None:
            raise ConfigError(f"this session has no file; use {self.frontend.prefix}save "
                              "PATH.ipynb or PATH.py")  # fmt: skip
        path = self._path(argument) if argument else None
        saved = self.session.save(path)
        if self.session.autosave_failed and saved is not None and saved.suffix == ".ipynb":
            self.session.path, self.session.autosave_failed = saved, False  # as the warning said
            self.session.save_error = ""  # an untold failure of the old file is moot now
            self.frontend.show_text(f"saved to {saved}; the session autosaves there from now on")
            return
        if saved is not None and saved == self.session.path:  # the autosave's file is written
            self.session.save_error, self.session.autosave_failed = "", False
        self.frontend.show_text(f"saved to {saved}")

    def _load(self, argument: str) -> None:
        if not argument:
            raise ConfigError(f"use {self.frontend.prefix}load PATH.ipynb")
        path, old = self._path(argument), self.session
        new_path = None
        if path.exists() and not written_here(path):
            new_path = new_session_path(path.parent)
            self._confirm_foreign(path, new_path)
        old.stop_kernel_work()  # its replay behind the prompt, if one runs, is moot
        self._switch(Session.open(path, old.decoder, old.executor, self._progress, new_path))
        as_new = f", as a new session {new_path}" if new_path else ""
        self.frontend.show_text(
            f"loaded {path}: {count_of(len(self.session.turns), 'turn')}{as_new}"
        )
        self.show_turns(self.session.turns, 1, compact=True)
        self._show_notice()

    def _confirm_foreign(self, path: Path, new_path: Path) -> None:
        """A notebook this tool did not write is opened as the first turns of a new session
        file (it is never rewritten), where the user agrees (a kernel cannot ask: it does)."""
        question = (f"{path.name} was not written by codegen-repl: open its code cells as the "
                    f"first turns of a new session {new_path.name} (they run now)? [Enter] yes "
                    "· n no: ")  # fmt: skip
        if self._answer(question, "y") in ("n", "no"):
            raise ConfigError(f"{path} not opened")

    def _reset(self, _: str) -> None:
        old = self.session
        old.stop_kernel_work()
        old.executor.restart()
        path = None if old.path is None else new_session_path(old.path.parent)
        self._switch(Session(old.decoder, old.executor, path, old.settings))
        self.session.save()
        self.frontend.show_text(f"new session: {path or '(no file)'}")

    def _mtpb(self, argument: str) -> None:
        """Play an MTPB problem turn by turn in a fresh session (restarted kernel, no earlier
        turns, so the score is the problem's alone), then show MTPB's verdict."""
        from codegen_repl.evals import mtpb

        request = parse_mtpb(argument, self.frontend.prefix)
        given = Path(request.problems).expanduser() if request.problems else None
        problem = mtpb.find_problem(mtpb.load_problems(given or self.mtpb_problems),
                                    request.problem)  # fmt: skip
        session = self._fresh_session(f"mtpb-{problem.id}-{request.index}")
        saved = f", saved in {session.path}" if session.path else ""
        self.frontend.show_text(f"MTPB problem {problem.id} ({problem.name}), input "
                                f"{request.index}: a fresh session{saved}", "title")  # fmt: skip
        live: list[LiveCode] = []
        streamed: list[str] = []

        def on_turn(number: int, prompt: str) -> None:
            self.frontend.show_text(f"[{number}] {prompt}", "title")
            streamed.clear()
            live.append(self.frontend.live_code())

        def on_text(piece: str) -> None:
            streamed.append(piece)
            live[-1].add(piece)

        def confirm(code: str) -> bool:
            live.pop().finish(code)
            choice = self._decide(code)[0]
            self.frontend.begin_turn(len(session.turns) + 1)
            return choice == "run"

        try:
            result = mtpb.replay(session, problem, request.index, on_turn, on_text,
                                 self.frontend.output, confirm)  # fmt: skip
        finally:
            while live:  # Ctrl-C or an error while a turn streamed
                live.pop().finish("".join(streamed))
        verdict = "PASS" if result.passed else "FAIL"
        self.frontend.show_text(f"{verdict}: MTPB problem {problem.id}; got {result.got}, "
                                f"expected {result.expected!r}", "title")  # fmt: skip
        if not result.passed and result.detail:
            self.frontend.show_text(result.detail, "note")

    def _fresh_session(self, name: str) -> Session:
        """A new session beside the current one (`<stem>.<name>.ipynb`), with the current model
        and settings (MTPB's prefix) in a restarted kernel."""
        old = self.session
        old.stop_kernel_work()
        old.executor.restart()
        path = old.path
        if path is not None:
            path = path.with_name(f"{path.name.split('.')[0]}.{name}.ipynb")
        settings = dataclasses.replace(old.settings, prefix=MTPB_PREFIX)
        self._switch(Session(old.decoder, old.executor, path, settings))
        self.session.on_input = None  # a benchmark's code gets no typed input
        return self.session

    def _switch(self, session: Session) -> None:
        self.session = session
        self.frontend.session_opened(session)

    def _show_notice(self) -> None:
        if self.session.notice:
            self.frontend.show_text(missing_text(self.session, self.frontend.prefix), "warning")

    def _path(self, argument: str) -> Path:
        path = Path(argument).expanduser()
        return path if path.is_absolute() else self.folder / path


def missing_text(session: Session, prefix: str = "/") -> str:
    """The session's notice, with how to give the kernel the state it lacks."""
    if not session.missing:
        return session.notice
    runs = " then ".join(f"{prefix}run {number}" for number in session.missing)
    them = "it" if len(session.missing) == 1 else "them"
    return f"{session.notice}; to replay {them}: {runs}"
