"""The one command layer: every command, typed into the REPL and into a cell of the `codegen`
kernel, gives the same result (the session's turns and settings) and the same messages (spelled
with `/` in the one and `%` in the other). Both front ends drive real kernels; a scripted decoder
writes the code."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from codegen_repl.core.commands import lines_changed
from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.frontend import COMMAND_NAMES, help_text, parse_edit, parse_turn_number
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.errors import ConfigError
from codegen_repl.kernel.runner import KernelRunner, RunnerOptions
from codegen_repl.repl.loop import Repl
from tests.core.test_session import ScriptedDecoder
from tests.kernel.test_runner import Collected

PROBLEM = {"id": 7, "name": "add two numbers", "category": "math", "description": "",
           "prompts": ["define add", "use add"], "inputs": [{}], "outputs": [5]}  # fmt: skip
ADD = ("def add(a, b):\n    return a + b", "print(add(2, 3))")
# (case id, inputs typed first, the command, the decoder's script); {tmp} is a shared folder
CASES = [
    ("help", [], "/help", []),
    ("step", [], "Set x.", ["x = 1\nprint(x)"]),
    ("user code", [], "!y = 2\n!print(y)", []),
    ("undo", ["Set x.", "!y = 2"], "/undo", ["x = 1"]),
    ("undo nothing", [], "/undo", []),
    ("retry", ["Set x."], "/retry", ["x = 1", "x = 2\nprint(x)"]),
    ("edit", ["Set x.", "Print x."], "/edit 1\nx = 5", ["x = 1", "print(x)"]),
    ("edit a missing turn", ["Set x."], "/edit 9\nx = 1", ["x = 1"]),
    ("edit turn 0", ["Set x."], "/edit 0\nx = 1", ["x = 1"]),
    ("run the last turn", ["!n = 1", "!n += 1\n!print(n)"], "/run", []),
    ("run turn N", ["!n = 1", "!n += 1\n!print(n)"], "/run 1", []),
    ("run a bad number", ["!n = 1"], "/run one", []),
    ("fix", ["Divide."], "/fix", ["1 / 0", "x = 0"]),
    ("fix without an error", [], "/fix", []),
    ("code", ["Set x.", "!y = 2"], "/code", ["x = 1"]),
    ("context", ["Set x."], "/context", ["x = 1"]),
    ("model", [], "/model other/model", []),
    ("model without a name", [], "/model", []),
    ("set", [], "/set temperature=0.5", []),
    ("set run", [], "/set run=never", []),
    ("set without arguments", [], "/set", []),
    ("set a bad key", [], "/set colour=red", []),
    ("save", ["Set x."], "/save {tmp}/program.py", ["x = 1"]),
    ("load", ["Set x.", "/save {tmp}/saved.ipynb", "/undo"], "/load {tmp}/saved.ipynb", ["x = 1"]),
    ("reset", ["Set x."], "/reset", ["x = 1"]),
    ("mtpb", [], "/mtpb 7 --problems {tmp}/mtpb.jsonl", list(ADD)),
    ("mtpb usage", [], "/mtpb seven", []),
    ("unknown", [], "/frobnicate", []),
]  # fmt: skip
NAMES = "|".join(COMMAND_NAMES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("commands")
    (path / "mtpb.jsonl").write_text(json.dumps(PROBLEM) + "\n")
    return path


@pytest.fixture(scope="module")
def repl(folder: Path) -> Iterator[Repl]:
    with Executor(ExecutorConfig(cwd=folder, inline_matplotlib=False)) as executor:
        session = Session(ScriptedDecoder(), executor, folder / "s.ipynb")
        console = Console(file=io.StringIO(), width=120, force_terminal=False)
        yield Repl(session, console, "auto", ask=_no_answer, model_name="scripted")


@pytest.fixture(scope="module")
def runner(folder: Path) -> Iterator[KernelRunner]:
    options = RunnerOptions(model="scripted", cwd=folder, session_path=folder / "s.ipynb")
    running = KernelRunner(options, load_decoder=lambda name: ScriptedDecoder())
    running.start()
    try:
        yield running
    finally:
        running.shutdown()


def _no_answer(question: str, default: str) -> str:
    raise AssertionError(f"nothing should be asked in run=auto: {question!r}")


def fresh(session: Session, codes: list[str]) -> Session:
    """A new empty session in `s.ipynb`, in a restarted kernel, with its own script."""
    session.executor.restart()
    assert session.path is not None
    path, settings = session.path.with_name("s.ipynb"), SessionSettings(prefix="")
    return Session(ScriptedDecoder(*codes), session.executor, path, settings)


def through_repl(repl: Repl, setup: list[str], command: str, codes: list[str]) -> dict[str, Any]:
    repl.commands.session = fresh(repl.session, codes)
    repl.commands.run_mode, repl.commands.model_name = "auto", "scripted"
    repl.load_decoder = lambda name: ScriptedDecoder()
    for line in setup:
        assert repl.handle(line)
    shown: list[tuple[str, str]] = []
    frontend = repl.frontend
    frontend.show_text = _recorded(shown, "text", frontend.show_text)  # type: ignore[method-assign]
    frontend.show_code = _recorded(shown, "code", frontend.show_code)  # type: ignore[method-assign]
    frontend.progress = _recorded(shown, "text", frontend.progress)  # type: ignore[method-assign]
    show_help = frontend.show_help

    def record_help() -> None:  # the terminal lays help_rows out as a table (tests/repl/
        shown.append(("text", help_text("/")))  # test_help.py): recorded as the kernel's text
        show_help()  # of the same rows

    frontend.show_help = record_help  # type: ignore[method-assign]
    frontend.output = lambda output: (shown.append(_output(output)), repl.renderer.output(output))  # type: ignore[method-assign]
    try:
        assert repl.handle(command)
    finally:
        for name in ("show_text", "show_code", "output", "progress", "show_help"):
            del frontend.__dict__[name]
    return _result(repl.session, repl.run_mode, shown)


def _recorded(shown: list[tuple[str, str]], kind: str, show: Any) -> Any:
    def record(text: str, *style: Any) -> None:
        shown.append((kind, text))
        show(text, *style)

    return record


def through_kernel(
    runner: KernelRunner, setup: list[str], command: str, codes: list[str]
) -> dict[str, Any]:
    commands = runner.commands
    assert commands is not None
    commands.session = fresh(commands.session, codes)
    commands.run_mode, commands.model_name = "auto", "scripted"
    commands.load_decoder = lambda name: ScriptedDecoder()
    for line in setup:
        runner.run_cell(as_cell(line), Collected())
    sink = Collected()
    runner.run_cell(as_cell(command), sink)
    shown: list[tuple[str, str]] = []
    for kind, value in sink.events:
        if kind == "stream":
            shown.append(("text", value[1].removesuffix("\n")))
        elif kind == "display":
            shown.append(("code", value["text/plain"]))
        elif kind == "output":
            shown.append(_output(value))
        elif kind == "error":
            shown.append(("text", f"error: {value[1]}"))
    assert runner.session is not None
    return _result(runner.session, runner.run_mode, shown)


def as_cell(line: str) -> str:
    """What the REPL's `/name` is in a kernel cell: `%name`."""
    return "%" + line[1:] if line.startswith("/") else line


def _output(output: dict[str, Any]) -> tuple[str, str]:
    text = output.get("text") or output.get("data", {}).get("text/plain") or output.get("evalue")
    return (output["output_type"], str(text))


def _result(session: Session, run_mode: str, shown: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "turns": [(turn.step, turn.code, turn.status) for turn in session.turns],
        "program": session.program(),
        "settings": (session.settings.to_json(), run_mode),
        "path": session.path and session.path.name,
        "shown": shown,
    }


def spelled_with_slash(result: dict[str, Any]) -> dict[str, Any]:
    """The messages with the kernel's `%name` spelled `/name`, the terminal's own `/exit` left
    out of the list of commands, and session file names (they carry a time) masked."""
    shown = []
    for kind, text in result["shown"]:
        text = re.sub(rf"%({NAMES})\b", r"/\1", text).replace(" /exit (", " (")
        text = text.replace("unknown command %", "unknown command /")
        shown.append((kind, re.sub(r"session-[\d-]+\.ipynb", "session-*.ipynb", text)))
    path = re.sub(r"session-[\d-]+\.ipynb", "session-*.ipynb", result["path"] or "")
    return result | {"shown": shown, "path": path}


@pytest.mark.parametrize(("setup", "command", "codes"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_a_command_does_the_same_in_the_repl_and_in_the_kernel(
    repl: Repl, runner: KernelRunner, folder: Path, setup: list[str], command: str,
    codes: list[str],
) -> None:  # fmt: skip
    setup = [line.format(tmp=folder) for line in setup]
    command = command.format(tmp=folder)
    in_terminal = spelled_with_slash(through_repl(repl, setup, command, codes))
    in_kernel = spelled_with_slash(through_kernel(runner, setup, command, codes))
    if command == "/help":  # each front end's own line: /exit in the terminal, %%python cells
        for result in (in_terminal, in_kernel):
            lines = [line for _, text in result["shown"] for line in text.splitlines()]
            result["shown"] = [line for line in lines if not re.search("/exit|%%python", line)]
        assert len(in_kernel["shown"]) > 15
        # by design: the kernel cannot ask, and its %help says so (run=auto|never)
        assert any("run=auto|never," in line for line in in_kernel["shown"])
        in_kernel["shown"] = [line.replace("run=auto|never,", "run=ask|auto|never,")
                              for line in in_kernel["shown"]]  # fmt: skip
    assert in_kernel == in_terminal


def test_the_help_tables_are_one_table() -> None:
    terminal, kernel = help_text("/").splitlines(), help_text("%").splitlines()
    assert [line for line in terminal if "/exit" not in line] == [
        line.replace("%", "/", 1) for line in kernel if "%%python" not in line
    ]
    for name in COMMAND_NAMES:
        assert f"/{name}" in help_text("/")


def test_ask_is_refused_where_no_one_can_answer(repl: Repl, runner: KernelRunner) -> None:
    """The one difference by design: a kernel cannot ask before running a step."""
    assert repl.handle("/set run=ask") and repl.run_mode == "ask"
    repl.commands.run_mode = "auto"
    refused = runner.run_cell("%set run=ask", Collected())
    assert refused.ename == "UsageError" and "use run=auto or run=never" in refused.evalue
    assert runner.run_mode == "auto"


def test_commands_on_the_last_turn_refuse_an_argument(repl: Repl, runner: KernelRunner) -> None:
    """`undo 1` once undid the last turn whatever N said: an argument is refused, not ignored."""
    refused = runner.run_cell("%undo 1", Collected())
    assert refused.ename == "UsageError" and "%undo takes no argument" in refused.evalue
    with pytest.raises(ConfigError, match=r"/retry takes no argument"):
        repl.commands.handle("/retry again")


@pytest.mark.parametrize("word", ["²", "١", "1²"])
def test_turn_numbers_are_ascii_digits(word: str) -> None:
    """ "²" passed str.isdigit() and then crashed int(); "١" silently meant turn 1."""
    with pytest.raises(ConfigError, match="with N a turn number"):
        parse_turn_number(word, "%", "drop")
    assert parse_edit(f"{word}\nx = 1")[0] is None  # not a number: the whole text is code


def test_turn_numbers_are_parsed_from_one() -> None:
    assert parse_edit("1\nx = 1") == (1, "x = 1") and parse_edit("\nx = 1") == (None, "x = 1")
    assert parse_turn_number("", "/", "run") is None and parse_turn_number("3", "%", "run") == 3
    with pytest.raises(ConfigError, match=r"use %run \[N\] with N a turn number \(from 1\)"):
        parse_turn_number("-1", "%", "run")


def test_a_retry_counts_a_replaced_line_once() -> None:
    assert lines_changed("x = 1", "y = 2") == 1  # not one removed and one added
    assert lines_changed("a\nb\nc", "a\nB\nc\nd") == 2  # one replaced, one added
    assert lines_changed("a\nb", "a") == 1
    assert lines_changed("a", "a") == 0
