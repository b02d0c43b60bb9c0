"""The REPL driven line by line over a real kernel, with a scripted decoder; rendering into an
io.StringIO console; and `codegen-repl chat` as a subprocess with scripted stdin."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from rich.console import Console
from textual_image._terminal import get_cell_size

from codegen_repl.core.executor import Executor, ExecutorConfig
from codegen_repl.core.frontend import MtpbRequest, parse, parse_edit, parse_mtpb
from codegen_repl.core.outputs import NO_INPUT_LINE
from codegen_repl.core.session import Session, SessionSettings
from codegen_repl.errors import ConfigError
from codegen_repl.repl.chat import ChatOptions
from codegen_repl.repl.input import SlashCompleter
from codegen_repl.repl.loop import Repl
from codegen_repl.repl.render import Renderer, html_to_text
from tests.conftest import MTPB_DATA, needs_mtpb
from tests.core.test_session import ScriptedDecoder

SCRIPT = Path(sys.executable).with_name("codegen-repl")
# a 1x1 PNG
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
).decode()


@pytest.fixture
def executor(tmp_path: Path) -> Iterator[Executor]:
    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as running:
        yield running


def make_repl(
    tmp_path: Path, executor: Executor, *codes: str, run_mode: str = "auto",
    answers: tuple[str, ...] = (),
) -> tuple[Repl, io.StringIO]:  # fmt: skip
    out = io.StringIO()
    # Wide enough for the temporary paths messages name (pytest-xdist's are longer) on one line
    console = Console(file=out, width=200, force_terminal=False)
    settings = SessionSettings(prefix="")
    session = Session(ScriptedDecoder(*codes), executor, tmp_path / "s.ipynb", settings)
    replies = list(answers)
    repl = Repl(session, console, run_mode, ask=lambda question, default: replies.pop(0))
    return repl, out


def test_steps_run_and_render(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "x = 40\nprint('hello', x)", "x + 2")
    assert repl.handle("Print hello.")
    assert repl.handle("Add two.")
    text = out.getvalue()
    assert "print('hello', x)" in text and "hello 40\n" in text and "42" in text
    assert [t.status for t in repl.session.turns] == ["ok", "ok"]
    assert repl.handle("!y = x * 2") and repl.session.turns[-1].step is None
    assert repl.handle("!print(y)") and "80" in out.getvalue()


def test_undo_retry_code_context(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "items = [1]", "items.append(2)", "items.append(3)")
    repl.handle("Make a list.")
    repl.handle("Append.")
    repl.handle("/retry")
    assert repl.session.turns[-1].code == "items.append(3)"
    assert repl.session.turns[-1].sample["seed"] == 1
    repl.handle("/undo")
    assert len(repl.session.turns) == 1 and "undone: turn 2 (Append.)" in out.getvalue()
    repl.handle("!print(items)")
    assert out.getvalue().endswith("[1]\n")
    repl.handle("/code")
    assert "# Make a list.\nitems = [1]" in out.getvalue()
    repl.handle("/context")
    assert "tokens of 2048" in out.getvalue()


def test_set_changes_the_settings(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)
    repl.handle("/set temperature=0.5")
    repl.handle("/set max_new_tokens = 64")
    repl.handle("/set run=never")
    repl.handle("/set timeout=none")
    sample = repl.session.settings.sample
    assert (sample.temperature, sample.max_new_tokens) == (0.5, 64)
    assert repl.run_mode == "never" and repl.session.settings.timeout is None
    repl.handle("/set top_p=2")
    repl.handle("/set colour=red")
    text = out.getvalue()
    assert "temperature = 0.5" in text and "top_p must be in (0, 1]" in text
    assert "key one of temperature, top_p" in text


def test_save_to_python_and_unknown_command(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "a = 1")
    repl.handle("Set a.")
    repl.handle(f"/save {tmp_path / 'program.py'}")
    assert (tmp_path / "program.py").read_text() == "# Set a.\na = 1\n\n"
    repl.handle("/frobnicate")
    assert "unknown command /frobnicate; the commands are: /help /undo" in out.getvalue()
    repl.handle("/help")
    assert "/set [key=value]" in out.getvalue()
    assert repl.handle("/exit") is False


def test_run_modes(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "print('never')", run_mode="never")
    repl.handle("Print.")
    turn = repl.session.turns[-1]
    assert turn.status == "skipped" and turn.outputs == []
    assert "(not run: run=never; /set run=auto runs the next steps" in out.getvalue()

    codes = ("print('run')", "print('skip')", "print('draft')")
    repl, out = make_repl(
        tmp_path, executor, *codes, run_mode="ask", answers=("", "n", "e", "print('edited')")
    )
    for step in ("One.", "Two.", "Three."):
        repl.handle(step)
    assert [t.status for t in repl.session.turns] == ["ok", "declined", "ok"]
    assert repl.session.turns[-1].code == "print('edited')"
    assert "run\n" in out.getvalue() and "edited\n" in out.getvalue()
    assert "skip\n" not in out.getvalue().replace("print('skip')", "")


def test_an_error_is_rendered_and_the_loop_goes_on(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "1 / 0", "print('after')")
    assert repl.handle("Divide.")
    assert "ZeroDivisionError" in out.getvalue() and "\x1b[" not in out.getvalue()
    assert repl.handle("/edit 9\nx = 1")  # a CodeGenError from a command
    assert "there is no turn 9; turns are 1..1" in out.getvalue()
    assert repl.handle("Go on.")
    assert out.getvalue().endswith("after\n")
    repl.handle("/edit 1\nz = 5\nprint(z)")
    assert repl.session.turns[0].status == "ok" and "5\n" in out.getvalue()


def test_an_exhausted_decoder_does_not_end_the_loop(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)  # no scripted code: generate raises IndexError
    assert repl.handle("Anything.")
    assert "internal error: IndexError" in out.getvalue()


def test_a_png_is_saved_beside_the_session(tmp_path, executor) -> None:
    code = (
        "from IPython.display import Image, display\n"
        f"display(Image(data=__import__('base64').b64decode('{PIXEL}')))"
    )
    repl, out = make_repl(tmp_path, executor, code)
    repl.handle("Show a pixel.")
    saved = tmp_path / "s_images" / "turn1_1.png"  # turns are numbered from 1
    assert saved.read_bytes() == base64.b64decode(PIXEL)
    assert f"[image saved: {saved}]" in out.getvalue().replace("\n", "")


def test_render_outputs_into_a_string() -> None:
    out = io.StringIO()
    renderer = Renderer(Console(file=out, width=100, force_terminal=False))
    result = {"text/html": "<b>x</b>", "text/plain": "X"}
    traceback = ["\x1b[31mE\x1b[0m: v"]
    error = {"output_type": "error", "ename": "E", "evalue": "v", "traceback": traceback}
    renderer.outputs(
        [
            {"output_type": "stream", "name": "stdout", "text": "par"},
            {"output_type": "stream", "name": "stdout", "text": "tial\n"},
            {"output_type": "stream", "name": "stderr", "text": "warn"},
            {"output_type": "execute_result", "data": result, "metadata": {}},
            error,
        ]
    )
    assert out.getvalue() == "partial\nwarn\nx\nE: v\n"
    table = "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>"
    assert html_to_text(table) == "a\tb\n1\t2"


def test_parse_and_complete() -> None:
    assert parse("!x = 1") == parse("  !x = 1 ")
    assert parse("!x = 1").name == "user_code" and parse("Do it.").name == "step"
    assert parse("/edit 2\nprint(1)").argument == "2\nprint(1)"
    assert parse("!for i in (1, 2):\n!    print(i)").argument == "for i in (1, 2):\n    print(i)"
    assert parse_edit("2\nprint(1)") == (2, "print(1)")
    assert parse_edit("") == (None, None) and parse_edit("x = 1") == (None, "x = 1")
    completer = SlashCompleter()

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert complete("/un") == ["/undo"]
    assert complete("/set te") == ["temperature="]
    assert complete("/set run=a") == ["ask", "auto"]
    assert complete("hello") == []
    assert parse_mtpb("12") == MtpbRequest("12", 0) and parse_mtpb(" 3 4 ") == MtpbRequest("3", 4)
    assert parse_mtpb("3 --problems p.jsonl") == MtpbRequest("3", 0, "p.jsonl")
    for bad in ("", "x", "1 2 3", "1 5"):
        with pytest.raises(ConfigError, match="/mtpb N"):
            parse_mtpb(bad)


def test_save_and_load_complete_paths(tmp_path: Path) -> None:
    (tmp_path / "session-one.ipynb").write_text("{}")
    completer = SlashCompleter()
    document = Document(f"/load {tmp_path}/sess")
    found = [c.text for c in completer.get_completions(document, CompleteEvent())]
    assert found == ["ion-one.ipynb"]


MTPB_1 = [  # problem 1 ("Sandwich string"), test input 0: "abcde"
    'my_string = "abcde"', "my_string = my_string.lower()", "chars = set(my_string)",
    "chars = sorted(chars)", "print(chars)",
]  # fmt: skip


@needs_mtpb
def test_mtpb_plays_a_problem_in_a_new_session(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, *MTPB_1, *MTPB_1[:4], "print(chars[:2])")
    repl.mtpb_problems = MTPB_DATA
    repl.handle("!leftover = 1")
    first = repl.session.path
    assert repl.handle("/mtpb 1")
    text = out.getvalue()
    assert "MTPB problem 1 (Sandwich string), input 0: a fresh session" in text
    assert "[5] Print the resulting list" in text
    assert "print(chars)\n['a', 'b', 'c', 'd', 'e']\nPASS" in text  # each on its own line
    assert repl.session.path != first and len(repl.session.turns) == 5
    assert repl.session.program().startswith("# Import libraries.")
    assert repl.handle("/mtpb 1 0")
    assert "FAIL" in out.getvalue() and "got ['a', 'b']" in out.getvalue()


def test_chat_command_with_scripted_stdin(tmp_path: Path, chat_checkpoint: Path) -> None:
    session = tmp_path / "chat.ipynb"
    stdin = "Print one.\n!print(40 + 1)\n/code\n/exit\n"
    args = ["chat", "--model", str(chat_checkpoint), "--session", str(session)]
    result = subprocess.run(
        [str(SCRIPT), *args, "--run", "never", "--max-new-tokens", "8", "--no-prefix"],
        input=stdin, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XDG_DATA_HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "41\n" in result.stdout and "# Print one." in result.stdout
    assert "session" in result.stdout and "Traceback" not in result.stderr
    resumed = subprocess.run(
        [str(SCRIPT), *args, "--run", "never"], input="!print(7 * 6)\n", capture_output=True,
        text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XDG_DATA_HOME": str(tmp_path)},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "[2] (your code)" in resumed.stdout and "42\n" in resumed.stdout


def test_chat_without_a_model_is_one_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(SCRIPT), "chat", "--model", str(tmp_path / "nothing")], capture_output=True,
        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "neither a folder nor a hub id" in result.stderr and "Traceback" not in result.stderr


def test_offline_default_model_and_bad_run_mode(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    bare = subprocess.run(
        [str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )  # no subcommand: chat with the default model
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert "not in the local HF cache" in bare.stderr and "--model PATH" in bare.stderr
    bad = subprocess.run(
        [str(SCRIPT), "chat", "--run", "maybe"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "run must be one of ask, auto, never" in bad.stderr


def test_an_unreachable_server_is_one_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [str(SCRIPT), "chat", "--server", f"http://127.0.0.1:{port}"], capture_output=True,
        text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"the decoder server at http://127.0.0.1:{port} is not available" in result.stderr
    assert "codegen-repl serve" in result.stderr and "codegen-repl ·" not in result.stdout


class InterruptedDecoder(ScriptedDecoder):
    """Streams part of a snippet, then the user presses Ctrl-C."""

    def generate(self, prompt, sample):  # type: ignore[no-untyped-def]
        yield "x = 1\n"
        yield "y = "
        raise KeyboardInterrupt


def test_ctrl_c_during_generation_drops_the_partial_code_by_default(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, answers=("",))
    repl.session.decoder = InterruptedDecoder()
    assert repl.handle("Assign x.")
    assert "generation stopped; the partial code is above" in out.getvalue()
    assert "dropped" in out.getvalue() and repl.session.turns == []


def test_ctrl_c_during_generation_can_keep_the_partial_code(tmp_path, executor) -> None:
    repl, _ = make_repl(tmp_path, executor, run_mode="ask", answers=("k", "e", "x = 1"))
    repl.session.decoder = InterruptedDecoder()
    assert repl.handle("Assign x.")  # kept, then edited before it runs
    assert [turn.code for turn in repl.session.turns] == ["x = 1"]
    assert repl.session.executor.run("print(x)").outputs[0]["text"] == "1\n"


def test_images_are_drawn_in_the_terminal_as_half_blocks(tmp_path) -> None:
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(4, 3))
    plt.plot([1, 2, 3])
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system="truecolor")
    renderer = Renderer(console, tmp_path / "images", show_images="halfcell")
    renderer.output({"output_type": "display_data", "data": {"image/png":
                     base64.b64encode(png.getvalue()).decode()}})  # fmt: skip
    drawn = out.getvalue()
    rows = [line for line in drawn.splitlines() if "\u2580" in line]
    assert all(line.count("\u2580") == 99 for line in rows)  # the terminal's width, less one
    cell_width, cell_height = get_cell_size()  # pixels; two pixel rows per row of half blocks
    assert abs(len(rows) - 99 * 3 / 4 * cell_width / cell_height) <= 1  # the picture's 4:3
    assert "38;2;" in drawn  # 24-bit colours
    assert (tmp_path / "images" / "turn0_1.png").read_bytes() == png.getvalue()
    quiet = io.StringIO()  # "auto" into a file (not a terminal): saved and named, not drawn
    Renderer(Console(file=quiet, width=100), tmp_path / "images").output(
        {"output_type": "display_data", "data": {"image/png": PIXEL}}
    )
    assert "\u2580" not in quiet.getvalue() and "image saved" in quiet.getvalue()


def test_run_reset_and_load(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "n = 1\nprint('ran', n)")
    repl.handle("Set n.")
    repl.handle("/run")
    assert out.getvalue().count("ran 1") == 2 and len(repl.session.turns) == 1
    first = repl.session.path
    repl.handle("/reset")
    assert repl.session.turns == [] and repl.session.path != first
    repl.handle("!print('n' in dir())")
    assert out.getvalue().endswith("False\n")
    repl.handle(f"/load {first}")
    assert [t.step for t in repl.session.turns] == ["Set n."]
    repl.handle("!print(n)")
    assert out.getvalue().endswith("1\n") and f"loaded {first}: 1 turn\n" in out.getvalue()


def test_fix_asks_for_a_fix_of_the_last_error(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "total = 1 / 0", "total = 1")
    repl.handle("/fix")
    assert "no turn has an error to fix" in out.getvalue()
    repl.handle("Divide.")
    repl.handle("/fix")
    prompt = repl.session.decoder.prompts[-1]
    assert prompt.endswith("# Fix the error: ZeroDivisionError: division by zero\n")
    assert repl.session.turns[-1].status == "ok"


def test_model_switches_the_decoder(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "a = 1")
    replacement = ScriptedDecoder("b = 2")
    repl.load_decoder = lambda model: replacement
    repl.handle("/model other/model")
    assert repl.session.decoder is replacement and repl.model_name == "other/model"
    repl.handle("Set b.")
    assert repl.session.turns[-1].code == "b = 2"
    repl.handle("/model")
    assert "/model needs a checkpoint folder or a hub id" in out.getvalue()


def test_a_declined_turn_never_runs_in_a_replay(tmp_path, executor) -> None:
    """Step "loop forever", answered `n`, then `/edit` of an earlier turn: the loop must not run
    (it used to, with no time limit). It is not part of the program; `/run 2` runs it."""
    codes = ("x = 1", "while True:\n    pass", "print('after', x)")
    repl, out = make_repl(tmp_path, executor, *codes, run_mode="ask", answers=("", "n", ""))
    repl.session.settings = SessionSettings(prefix="", timeout=3.0)
    repl.handle("Set x.")
    repl.handle("Loop\nforever.")  # a step of two lines: its /code header stays one comment
    assert "(declined: not run, and not part of the program; /run 2 runs it)" in out.getvalue()
    repl.handle("/edit 1\nx = 2")
    repl.handle("Print x.")
    assert [t.status for t in repl.session.turns] == ["ok", "declined", "ok"]
    assert "[timeout]" not in out.getvalue() and "after 2\n" in out.getvalue()
    assert "while True" not in repl.session.program()
    repl.handle("/code")
    assert "# --- turn 2: declined, not run: Loop forever. (/run 2 runs it) ---" in out.getvalue()
    repl.handle("/run 2")  # on request it runs (under the timeout)
    assert repl.session.turns[1].status == "timeout" and "[timeout]" in out.getvalue()


def test_turns_are_numbered_from_one_everywhere(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor, "a = 1", "b = 2")
    repl.handle("Set a.")
    repl.handle("Set b.")
    assert " · 2 turns " in repl.toolbar()
    repl.handle("/code")
    assert "# --- turn 1 ---\n# Set a.\na = 1\n\n# --- turn 2 ---\n# Set b." in out.getvalue()
    repl.handle("/edit 1\na = 10")
    assert [t.code for t in repl.session.turns] == ["a = 10", "b = 2"]
    assert "[1] Set a." in out.getvalue() and "[2] Set b." in out.getvalue()
    repl.handle("/undo")
    assert "undone: turn 2 (Set b.)" in out.getvalue() and " · 1 turn " in repl.toolbar()
    repl.handle("/edit 0\na = 0")
    assert "there is no turn 0; turns are 1..1" in out.getvalue()


def test_run_reruns_only_the_last_turn(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)
    repl.handle("!n = 1")
    repl.handle("!n += 1\n!print('n is', n)")  # every line's `!` is stripped
    repl.handle("/run")  # the last turn again, in the live kernel: no replay of turn 1
    assert out.getvalue().count("n is 2\n") == 1 and "n is 3\n" in out.getvalue()
    repl.handle("/run 1")
    repl.handle("/run")
    assert out.getvalue().endswith("n is 2\n")
    assert [t.code for t in repl.session.turns] == ["n = 1", "n += 1\nprint('n is', n)"]


def test_input_in_a_turn_is_answered_from_the_terminal(tmp_path, executor) -> None:
    asked: list[tuple[str, bool, str]] = []
    answers = {"name? ": "Ada", "pw: ": "s3cret"}
    repl, out = make_repl(tmp_path, executor)

    def ask_input(prompt: str, password: bool) -> str:
        asked.append((prompt, password, out.getvalue()))
        return answers[prompt]

    repl.frontend._ask_input = ask_input
    assert repl.handle("!print('before', flush=True)\nname = input('name? ')")
    assert repl.handle("!import getpass\npw = getpass.getpass('pw: ')")
    assert repl.handle("!print(name, len(pw))")
    assert [(prompt, password) for prompt, password, _ in asked] == [
        ("name? ", False),
        ("pw: ", True),
    ]
    assert asked[0][2].endswith("before\n")  # what the code printed first is on the screen
    assert out.getvalue().endswith("Ada 6\n") and "s3cret" not in out.getvalue()
    assert [turn.status for turn in repl.session.turns] == ["ok", "ok", "ok"]


def test_input_where_no_one_can_answer_is_one_line(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)
    repl.session.on_input = None  # as in a replay, MTPB, or the codegen kernel
    repl.session.run_code("value = input('value? ')", repl.frontend.output)
    repl.renderer.finish()
    error = repl.session.turns[-1].outputs[-1]
    assert error["ename"] == "StdinNotImplementedError" and len(error["traceback"]) == 1
    assert " ".join(out.getvalue().split()) == NO_INPUT_LINE  # one line (wrapped at 100)


def test_carriage_returns_and_long_output_in_the_terminal(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)
    repl.handle(
        '!print("a\\r\\nb")\nfor n in range(0, 101, 50): print(f"\\r{n}%", end="")\nprint()'
    )
    assert out.getvalue() == "a\nb\n100%\n"  # not blank lines, the bar's last state
    repl.handle("!for n in range(100_000): print('line', n)")
    shown = out.getvalue().splitlines()[3:]
    assert shown[:2] == ["line 0", "line 1"] and shown[-1] == "line 99999"
    assert "... 99940 lines left out ..." in shown and len(shown) == 40 + 1 + 20
    kept = repl.session.turns[-1].outputs[0]["text"]  # the notebook keeps what Jupyter would
    assert kept.count("\n") == 100_000


def test_resume_shows_progress_and_old_turns_compactly(tmp_path, executor) -> None:
    repl, _ = make_repl(tmp_path, executor)
    repl.handle("!for n in range(1000): print(n)")
    repl.handle("!x = 1 / 0")
    repl.handle("!y = 2")
    other, shown = make_repl(tmp_path, executor)
    other.handle(f"/load {tmp_path / 's.ipynb'}")
    text = shown.getvalue()
    assert (
        "restarting the kernel to replay 2 turns\nreplaying 1/2: turn 1\nreplaying 2/2: turn 3\n"
        in text
    )
    assert "0\n1\n2\n3\n... 993 lines left out ...\n997\n998\n999\n" in text
    assert "ZeroDivisionError: division by zero" in text and "Traceback" not in text


def test_ctrl_d_says_where_the_session_is_and_how_to_resume_it(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)

    def end_of_input() -> str:
        raise EOFError

    repl.loop(end_of_input)
    path = tmp_path / "s.ipynb"
    # the run mode, when not the default, goes on with the session (`never` above all: code
    # that must not run), as it is now: the command line's or the last /set run=
    assert out.getvalue() == (
        f"saved {path}\nresume it with: codegen-repl --run auto --session {path}\n"
    )
    never, out = make_repl(tmp_path, executor, run_mode="never")
    never.handle("/set run=ask")
    never.loop(end_of_input)
    assert out.getvalue().endswith(f"resume it with: codegen-repl --session {path}\n")
    never.handle("/set run=never")
    never.loop(end_of_input)
    assert out.getvalue().endswith(f"resume it with: codegen-repl --run never --session {path}\n")


def test_the_resume_command_names_the_model_or_server() -> None:
    local = ChatOptions(model="/models/my model")
    assert local.resume_options() == "--model '/models/my model'"
    remote = ChatOptions(model="", server="http://127.0.0.1:8000")
    assert remote.resume_options() == "--server http://127.0.0.1:8000"
    # a new user's finding: resumed without it, a bf16 session came back in fp32
    narrow = ChatOptions(model="/models/m", dtype="bfloat16")
    assert narrow.resume_options() == "--model /models/m --dtype bfloat16"


def test_save_chooses_by_suffix_and_refuses_others(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)
    repl.handle("!x = 1")
    repl.handle(f"/save {tmp_path / 'foo.txt'}")
    assert "error: cannot save as foo.txt: use a .ipynb path" in out.getvalue()
    assert not (tmp_path / "foo.txt").exists()
    repl.handle(f"/save {tmp_path / 'foo.py'}")
    assert (tmp_path / "foo.py").read_text().startswith("x = 1")


def test_a_notebook_this_tool_did_not_write_opens_as_a_new_session(tmp_path, executor) -> None:
    theirs = tmp_path / "theirs.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("z = 5")]), theirs)
    before = theirs.read_bytes()
    repl, out = make_repl(tmp_path, executor, answers=("n",))
    repl.handle(f"/load {theirs}")
    assert f"error: {theirs} not opened" in out.getvalue()
    repl, out = make_repl(tmp_path, executor, answers=("",))
    repl.handle(f"/load {theirs}")
    assert repl.session.path != theirs and repl.session.path.name.startswith("session-")
    assert repl.session.path.exists() and theirs.read_bytes() == before
    assert repl.session.executor.run("print(z)").outputs[0]["text"] == "5\n"


def test_chat_asks_before_opening_a_notebook_it_did_not_write(
    tmp_path: Path, chat_checkpoint: Path
) -> None:
    theirs = tmp_path / "theirs.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("z = 5")]), theirs)
    before = theirs.read_bytes()
    args = [str(SCRIPT), "--model", str(chat_checkpoint), "--session", str(theirs), "--yes"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XDG_DATA_HOME": str(tmp_path)}
    env["PATH"] = os.pathsep.join([str(Path(SCRIPT).parent), env.get("PATH", "")])  # activated

    def chat(stdin: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=env)  # fmt: skip

    refused = chat("n\n")
    assert refused.returncode == 1 and "not opened; nothing was run or written" in refused.stdout
    opened = chat("\n!print(z * 2)\n")
    assert opened.returncode == 0, opened.stderr
    assert "10\n" in opened.stdout and theirs.read_bytes() == before
    [new] = tmp_path.glob("session-*.ipynb")
    resume = f"resume it with: codegen-repl --model {chat_checkpoint} --run auto --session {new}"
    assert resume in opened.stdout
    assert [cell.source for cell in nbformat.read(new, 4).cells] == ["z = 5", "print(z * 2)"]


def test_ctrl_c_at_an_input_prompt_interrupts_the_code(tmp_path, executor) -> None:
    repl, out = make_repl(tmp_path, executor)

    def ctrl_c(prompt: str, password: bool) -> str:
        raise KeyboardInterrupt

    repl.frontend._ask_input = ctrl_c
    assert repl.handle("!x = 1\nname = input('name? ')")
    assert repl.session.turns[-1].status == "interrupted" and "[interrupted]" in out.getvalue()
    assert repl.handle("!print(x + 1)") and out.getvalue().endswith("2\n")


def test_a_missing_editor_is_a_user_error(monkeypatch) -> None:
    from codegen_repl.repl.input import editor_edit

    monkeypatch.setenv("EDITOR", "/nonexistent-editor")
    monkeypatch.setenv("VISUAL", "/nonexistent-editor")
    with pytest.raises(ConfigError, match=r"set \$EDITOR to an editor"):
        editor_edit("x = 1\n")
