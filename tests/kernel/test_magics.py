"""`%load_ext codegen_repl` in a real IPython kernel, driven through jupyter_client, with the
tiny trained model (so the generated code is known)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking import BlockingKernelClient

from tests.kernel.conftest import kernel_env
from tests.kernel.helpers import kernel, run_cell
from tests.trained import PAIRS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ipython(
    trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BlockingKernelClient]:
    """One python3 kernel, configured through IPython's config system on its command line and
    through the user's config.toml."""
    config = ["--CodeGenMagics.temperature=0", f"--CodeGenMagics.model={trained_checkpoint}"]
    folder = tmp_path_factory.mktemp("magics")
    user_config = folder / "config.toml"
    user_config.write_text("top_p = 0.5\nmax_new_tokens = 100\n")
    with kernel_env(folder, user_config), kernel("python3", folder, config) as (_, client):
        assert run_cell(client, "%load_ext codegen_repl").status == "ok"
        yield client


def test_config_from_ipython_and_from_the_magic(ipython, trained_checkpoint) -> None:
    shown = run_cell(ipython, "%codegen_config").stdout()
    assert f"model = '{trained_checkpoint}'" in shown and "temperature = 0.0" in shown
    assert "top_p = 0.5" in shown and "max_new_tokens = 100" in shown  # from config.toml
    assert "api_key = None" in shown
    ran = run_cell(ipython, "%codegen_config max_new_tokens=64 top_k=bad")
    assert ran.status == "error" and "top_k" in ran.stderr()
    assert "max_new_tokens = 64" in run_cell(ipython, "%codegen_config").stdout()


def test_steps_run_here_with_history_across_cells(ipython) -> None:
    defined = run_cell(ipython, "%%codegen\ndefine add")
    assert defined.status == "ok", defined.reply
    [first, *updates] = defined.of("display_data", "update_display_data")
    assert first["metadata"]["codegen"]["generated_code"] is True
    assert updates[-1]["data"]["text/plain"].rstrip("\n") == PAIRS["define add"]
    assert run_cell(ipython, "y = add(1, 1)").status == "ok"
    used = run_cell(ipython, "%codegen use add")
    assert used.status == "ok" and used.stdout() == "5\n"
    context = run_cell(ipython, "%codegen_config context").stdout()
    expected = (
        f"# define add\n{PAIRS['define add']}\n\ny = add(1, 1)\n\n# use add\n{PAIRS['use add']}\n"
    )
    assert expected in context
    assert run_cell(ipython, "y").results() == ["2"]  # the generated code ran in this kernel


def test_insert_puts_the_code_into_the_next_cell_instead_of_running_it(ipython) -> None:
    said = []
    for _ in range(2):  # the same cell run again inserts another cell, and says so
        ran = run_cell(ipython, "%%codegen --insert\nsay hello", cell_id="insert-cell")
        assert ran.status == "ok" and ran.stdout() == ""
        [payload] = ran.reply["payload"]
        # a new cell below (replace=True would overwrite this cell; no payload selects a cell)
        assert (payload["source"], payload["replace"]) == ("set_next_input", False)
        assert payload["text"] == f"# say hello\n{PAIRS['say hello']}"
        final = ran.of("update_display_data")[-1]["data"]  # where the code went, not the code
        assert final["text/markdown"] == f"*{final['text/plain']}*"
        said.append(final["text/plain"])
    assert said[0] == "inserted below: select it and run it"  # the front end does not select it
    assert said[1] == ("inserted below, above the copy an earlier run of this cell inserted "
                       "(delete that one): select the new cell and run it")  # fmt: skip


def test_errors_of_generated_code_fail_the_cell_with_its_own_traceback(ipython) -> None:
    ran = run_cell(ipython, "%%codegen\ndivide by zero")
    assert (ran.status, ran.reply["ename"]) == ("error", "ZeroDivisionError")
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(ran.reply["traceback"]))
    assert "1 / 0" in traceback and "magics.py" not in traceback
    # only the generated code's frames: not the `%%codegen` call, nor IPython's magic frames
    assert "run_cell_magic" not in traceback and "hidden" not in traceback
    assert [c["traceback"] for c in ran.of("error")] == [ran.reply["traceback"]]
    assert run_cell(ipython, "1 + 1").results() == ["2"]


def test_a_failed_step_leaves_the_context_unless_kept_and_undo_drops(ipython) -> None:
    assert run_cell(ipython, "%codegen_config reset").status == "ok"  # other tests' steps
    failed = run_cell(ipython, "%%codegen\ndivide by zero")
    assert failed.status == "error"
    assert failed.stderr() == ("(this step failed: it is left out of the model's context; "
                               "%codegen_config keep keeps it there)\n")  # fmt: skip
    context = "%codegen_config context"
    assert "# divide by zero" not in run_cell(ipython, context).stdout()
    assert (
        "kept in the context: divide by zero" in run_cell(ipython, "%codegen_config keep").stdout()
    )
    assert "# divide by zero\n1 / 0\n" in run_cell(ipython, context).stdout()
    undone = run_cell(ipython, "%codegen_config undo").stdout()
    assert undone.startswith("dropped from the context: divide by zero")
    assert "# divide by zero" not in run_cell(ipython, context).stdout()
    none = run_cell(ipython, "%codegen_config keep")
    assert none.reply["ename"] == "UsageError" and "no failed step" in none.stderr()
    assert run_cell(ipython, "%%codegen\ndivide by zero").status == "error"
    undone = run_cell(ipython, "%codegen_config undo").stdout()  # it was not in the context
    assert undone.startswith("dropped: divide by zero (it failed, so it was already left out")


def test_a_cell_run_again_replaces_its_entry(ipython) -> None:
    for _ in range(2):
        ran = run_cell(ipython, "%%codegen\nmake squares", cell_id="squares-cell")
        assert ran.status == "ok", ran.reply
        assert run_cell(ipython, "n = len(squares)", cell_id="len-cell").status == "ok"
    context = run_cell(ipython, "%codegen_config context").stdout()
    assert context.count("# make squares\n") == 1 and context.count("n = len(squares)") == 1
    code = [c for c in ran.of("update_display_data") if "text/markdown" in c["data"]][-1]
    assert code["data"]["text/markdown"] == f"```python\n{PAIRS['make squares']}\n```\n\n---"


def test_the_step_reaches_the_model_verbatim_in_both_forms(ipython) -> None:
    assert run_cell(ipython, "d = {'k': 5}\ncost = 3").status == "ok"
    for cell in (
        "%codegen --insert print {d} and $cost",
        "%%codegen --insert\nprint {d} and $cost",
    ):
        ran = run_cell(ipython, cell)
        assert ran.status == "ok", ran.reply
        [payload] = ran.reply["payload"]
        assert payload["text"].startswith("# print {d} and $cost\n"), payload["text"]


@pytest.mark.parametrize(
    "cell",
    [
        "%%codegen -t\nsay hello",
        "%%codegen --temprature 0\nsay hello",
        "%%codegen --bogus\nsay hello",
        "%%codegen -t warm\nsay hello",
        "%%codegen say\nhello",
        "%codegen --bogus say hello",
        "%codegen -t say hello",
        "%codegen",
    ],
)
def test_a_bad_option_is_one_usage_error_and_no_step_runs(ipython, cell: str) -> None:
    ran = run_cell(ipython, cell)
    assert (ran.status, ran.reply["ename"]) == ("error", "UsageError"), ran.reply
    assert ran.stderr().startswith("UsageError: ") and ran.stderr().count("\n") == 1
    assert "%codegen" in ran.stderr() and "`" not in ran.stderr()
    assert ran.of("display_data", "update_display_data", "execute_result") == []
    assert ran.stdout() == ""


def test_options_are_read_as_a_command_line_and_the_step_kept_as_written() -> None:
    from codegen_repl.kernel.magics import StepOptions, parse_options

    assert parse_options("-t0") == (StepOptions(temperature=0.0), "")
    assert parse_options("--insert -m=m --temperature 0.5  print {d}  -x") == (
        StepOptions(insert=True, model="m", temperature=0.5),
        "print {d}  -x",
    )
    assert parse_options("-- -t is a step") == (StepOptions(), "-t is a step")
    assert parse_options("-1 is a step") == (StepOptions(), "-1 is a step")


def test_a_bad_model_is_one_clear_error_and_the_kernel_lives_on(ipython) -> None:
    ran = run_cell(ipython, "%codegen --model /no/such/model say hello")
    assert ran.status == "error" and "/no/such/model" in ran.stderr()
    assert "Traceback" not in ran.stderr()
    assert run_cell(ipython, "%codegen say hello").stdout() == "hello\n"


def test_options_resolve_over_config_toml_then_the_defaults(tmp_path: Path, monkeypatch) -> None:
    """The traitlets the kernel and the magics share go through the one resolver."""
    from codegen_repl.kernel.options import ModelOptions

    config = tmp_path / "config.toml"
    config.write_text("model = '/models/mine'\ntop_p = 0.5\nrun = 'ask'\nprefix = 'x = 1\\n'\n")
    monkeypatch.setenv("CODEGEN_REPL_CONFIG", str(config))
    options = ModelOptions(temperature=0.0, dtype="", prefix="")
    settings = options.settings(can_ask=False)
    assert (settings.model, settings.dtype, settings.run) == ("/models/mine", None, "auto")
    assert (settings.temperature, settings.top_p, settings.max_new_tokens) == (0.0, 0.5, 128)
    assert settings.prefix == ""  # an empty prefix is no prefix, not "unset"
    assert ModelOptions(model="/other").settings(can_ask=True).run == "ask"


def test_a_refused_option_is_not_kept(ipython) -> None:
    before = run_cell(ipython, "%codegen_config").stdout()
    for assignment in ("top_p=2", "temperature=5", "seed=-1", "top_k=-4"):
        ran = run_cell(ipython, f"%codegen_config {assignment}")
        assert ran.status == "error", assignment
        key = assignment.split("=")[0]
        assert f"{key}: {key}" not in ran.reply["evalue"], ran.reply["evalue"]  # said once
    assert run_cell(ipython, "%codegen_config").stdout() == before  # still usable, unchanged
