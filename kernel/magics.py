"""The IPython extension: `%load_ext codegen_repl`, then `%%codegen` cells in any notebook.

The notebook itself is the session: the context of a step is the steps written so far with
their code, plus the user's own cells that ran successfully since the extension was loaded, in
CodeGen's multi-turn format. A cell is one entry: run again (JupyterLab sends its cell id), it
replaces its entry in place. A step whose code failed stays out of the context unless
`%codegen_config keep` keeps it; `%codegen_config undo` drops the last entry. Generated code is
streamed into one display (updated in place), then runs in this kernel as if it were the cell
(its last expression is shown, its errors fail the cell), or with `--insert` goes into a new
cell below instead. Options come from IPython's config
system (`c.CodeGenMagics.model = ...`) and `%codegen_config key=value`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import re
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import (
    Magics,
    line_cell_magic,
    line_magic,
    magics_class,
    no_var_expand,
)
from IPython.display import display
from traitlets import Bool, Integer, TraitError

from codegen_repl.core.context import TurnText, fit_context, step_line
from codegen_repl.core.settings import Settings
from codegen_repl.errors import CodeGenError
from codegen_repl.kernel.display import CODE_METADATA, PLACEHOLDER, code_bundle
from codegen_repl.kernel.options import ModelOptions

if TYPE_CHECKING:
    from codegen_repl.core.decoding import Decoder
    from codegen_repl.model.sample_params import SampleParams

_SHOW_EVERY_S = 0.1
_RESOLVED = {field.name for field in dataclasses.fields(Settings)}  # the rest: this class's own
# Where `--insert` put the code. Jupyter's `set_next_input` payload (replace=False) makes a new
# cell directly below the running one; JupyterLab and Notebook 7 neither select it nor let a
# kernel select it (nor remove a cell: `replace=True` would overwrite the %%codegen cell itself),
# so the display says what is left to the user.
INSERTED = "inserted below: select it and run it"
INSERTED_AGAIN = ("inserted below, above the copy an earlier run of this cell inserted (delete "
                  "that one): select the new cell and run it")  # fmt: skip
LEFT_OUT = ("(this step failed: it is left out of the model's context; %codegen_config keep "
            "keeps it there)")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What one `%%codegen` line asks for (None: the configured value)."""

    insert: bool = False
    model: str | None = None
    temperature: float | None = None


class _Parser(argparse.ArgumentParser):
    """argparse whose every complaint is one UsageError line (never a SystemExit)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"%%codegen: {message} (options: --insert, --model M, -t T)")


def _temperature(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-t takes a number (0 = greedy), got {text!r}") from None


_PARSER = _Parser(prog="%%codegen", add_help=False, allow_abbrev=False)
_PARSER.add_argument("--insert", action="store_true")
_PARSER.add_argument("--model", "-m")
_PARSER.add_argument("--temperature", "-t", type=_temperature)
_TAKES_VALUE = {"--model", "-m", "--temperature", "-t"}
_WORD = re.compile(r"\S+")


def parse_options(line: str, cell_form: bool = False) -> tuple[StepOptions, str]:
    """Leading `--insert`, `--model M` (`-m M`) and `-t T` (`--temperature T`); the rest of the
    line is returned verbatim (for `%codegen STEP` it is the step; `--` ends the options).

    Raises:
        UsageError: an unknown option, an option without its value, a temperature that is not
            a number, or (`cell_form`: the step is the cell's body) anything after the options.
    """
    words: list[str] = []
    rest = len(line)
    matches = _WORD.finditer(line)
    for match in matches:
        word = match.group()
        if word == "--":
            rest = match.end()
            break
        if not word.startswith("-") or _is_number(word):
            rest = match.start()
            break
        words.append(word)
        if word in _TAKES_VALUE:
            value = next(matches, None)
            if value is not None:
                words.append(value.group())
    parsed = _PARSER.parse_args(words)
    step = line[rest:].strip()
    if cell_form and step:
        raise UsageError(f"%%codegen: unexpected {step!r}; the step goes in the cell below")
    return StepOptions(parsed.insert, parsed.model, parsed.temperature), step


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class Entry:
    """One cell's part of the context: a step and its code, or the user's own code."""

    text: TurnText
    failed: bool = False  # its code raised: left out of the context unless kept
    kept: bool = False
    cell_id: str | None = None

    @property
    def in_context(self) -> bool:
        return self.kept or not self.failed


class NotebookHistory:
    """The entries of the notebook-level session, in the order their cells first ran."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    @property
    def turns(self) -> list[TurnText]:
        """What the model sees, in order (failed steps not kept are left out)."""
        return [entry.text for entry in self.entries if entry.in_context]

    def before(self, cell_id: str | None) -> list[TurnText]:
        """The context for cell `cell_id`: what comes before its entry (all: a new cell)."""
        ids = [entry.cell_id for entry in self.entries]
        end = ids.index(cell_id) if cell_id and cell_id in ids else len(ids)
        return [entry.text for entry in self.entries[:end] if entry.in_context]

    def add(self, entry: Entry) -> None:
        """Append `entry`, or put it in place of the entry of the same cell (a re-run)."""
        for at, old in enumerate(self.entries):
            if entry.cell_id and old.cell_id == entry.cell_id:
                self.entries[at] = entry
                return
        self.entries.append(entry)

    def add_step(
        self, step: str, code: str, failed: bool = False, cell_id: str | None = None
    ) -> None:
        self.add(Entry(TurnText(step, code), failed, cell_id=cell_id))

    def add_cell(self, raw_cell: str, cell_id: str | None = None, failed: bool = False) -> None:
        """A cell the user ran: its Python, without IPython's `%magic` and `!shell` lines."""
        if raw_cell.lstrip().startswith("%%"):
            return  # a cell magic (ours included): not Python
        lines = [line for line in raw_cell.splitlines() if not line.lstrip().startswith(("%", "!"))]
        code = "\n".join(lines).strip("\n")
        if code.strip():
            self.add(Entry(TurnText(None, code), failed, cell_id=cell_id))


@magics_class
class CodeGenMagics(Magics, ModelOptions):
    """`%%codegen`, `%codegen` and `%codegen_config`; configurable as `c.CodeGenMagics.*`."""

    # model, server, api_key and the sampling options (None: config.toml, else the default):
    # see ModelOptions
    top_k = Integer(0, help="Keep the k likeliest tokens (0 = off).").tag(config=True)
    seed = Integer(0, help="Sampling seed.").tag(config=True)
    insert = Bool(False, help="Put code in the next cell instead of running it.").tag(config=True)

    def __init__(self, shell: Any, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.history = NotebookHistory()
        self._decoders: dict[tuple[str, str, str, str], Decoder] = {}
        self.ipython = shell  # Magics.shell is typed Optional; ours always has one
        self._cell_id: str | None = None  # the running cell's (JupyterLab sends it)
        self._inserted: set[str] = set()  # the cells whose `--insert` made a cell below
        shell.events.register("pre_run_cell", self._before_cell)
        shell.events.register("post_run_cell", self._after_cell)

    def close(self) -> None:
        self.ipython.events.unregister("pre_run_cell", self._before_cell)
        self.ipython.events.unregister("post_run_cell", self._after_cell)

    # ------------------------------------------------------------------------- magics

    @line_cell_magic
    @no_var_expand  # the step is text for the model: `{d}` and `$cost` reach it as written
    def codegen(self, line: str, cell: str | None = None) -> None:
        """Write code for a step and run it here.

        %%codegen [--insert] [--model M] [-t T]   then the step in the cell body
        %codegen [--insert] [--model M] [-t T] STEP

        --insert puts the code into the next cell instead of running it; --model (-m) uses
        another checkpoint folder or hub id for this step; -t sets the temperature (0 greedy).
        """
        options, rest = parse_options(line, cell_form=cell is not None)
        step = (cell if cell is not None else rest).strip()
        if not step:
            raise UsageError("write the step: %codegen STEP, or %%codegen with the step below")
        insert = options.insert or self.insert
        inserted = None
        if insert:
            again = self._cell_id is not None and self._cell_id in self._inserted
            inserted = INSERTED_AGAIN if again else INSERTED
        # Trailing blank lines (CodeGen's cut keeps them) would pile up between turns.
        code = self._generate(step, options, inserted).rstrip("\n")
        if not code.strip():
            print("(the model wrote no code)", file=sys.stderr)
        if insert:  # a new cell right below this one (see INSERTED)
            self.ipython.set_next_input(step_line(step) + code, replace=False)
            if self._cell_id is not None:
                self._inserted.add(self._cell_id)
            return
        failed = not run_in_shell(self.ipython, code)
        self.history.add_step(step, code, failed, self._cell_id)
        if failed:
            print(LEFT_OUT, file=sys.stderr)

    @line_magic
    def codegen_config(self, line: str) -> None:
        """Show the options, or set them: %codegen_config key=value [key=value ...].

        %codegen_config context   shows what the model sees so far
        %codegen_config undo      drops the last step or cell from it
        %codegen_config keep      keeps the last failed step in it
        %codegen_config reset     forgets the steps and cells so far
        """
        words = line.split()
        if not words:
            resolved = self.resolved()
            for name in sorted(self.trait_names(config=True)):
                value = getattr(resolved if name in _RESOLVED else self, name)
                shown = "(set)" if name == "api_key" and value else repr(value)
                print(f"{name} = {shown}")
            return
        if words == ["context"]:
            print(self.context_text() or "(nothing yet)")
            return
        if words == ["reset"]:
            self.history.entries.clear()
            print("the steps and cells so far are forgotten")
            return
        if words in (["undo"], ["keep"]):
            print(self._undo() if words == ["undo"] else self._keep())
            return
        for word in words:
            self._set(word)

    # ------------------------------------------------------------------------- helpers

    def option(self, name: str) -> Any:
        """An option's value: IPython's config or %codegen_config, else config.toml, else the
        default (codegen_repl.core.settings)."""
        return getattr(self.resolved(), name) if name in _RESOLVED else getattr(self, name)

    def resolved(self) -> Settings:
        """The model and sampling options, resolved; a bad value is one UsageError line."""
        try:
            return self.settings(can_ask=False)
        except CodeGenError as error:
            raise UsageError(str(error)) from None

    def context_text(self) -> str:
        """The prefix and the turns so far, as the model sees them before the next step."""
        prefix = self.resolved().prefix
        return prefix + "".join(turn.render() for turn in self.history.turns)

    def _undo(self) -> str:
        if not self.history.entries:
            return "nothing to undo"
        entry = self.history.entries.pop()
        title = entry.text.step if entry.text.step is not None else "your code"
        if not entry.in_context:
            return (f"dropped: {title} (it failed, so it was already left out of the context; "
                    "what its code set stays in this kernel)")  # fmt: skip
        return (f"dropped from the context: {title} (the variables its code set stay in this "
                "kernel)")  # fmt: skip

    def _keep(self) -> str:
        for entry in reversed(self.history.entries):
            if entry.failed and not entry.kept:
                entry.kept = True
                return f"kept in the context: {entry.text.step or 'your code'}"
        raise UsageError("no failed step is left out of the context")

    def _set(self, assignment: str) -> None:
        key, equals, value = assignment.partition("=")
        names = sorted(self.trait_names(config=True))
        if not equals or key not in names:
            raise UsageError(f"use key=value with key one of {', '.join(names)}")
        trait = self.traits()[key]
        before = getattr(self, key)
        try:
            setattr(self, key, trait.from_string(value))
            self._check_sample()
        except (TraitError, ValueError, CodeGenError, UsageError) as error:
            setattr(self, key, before)  # a refused value is not kept
            said = str(error)  # a check's own message may already begin with the key
            raise UsageError(said if said.startswith(key) else f"{key}: {said}") from None
        print(f"{key} = {self.option(key)!r}")

    def _check_sample(self) -> None:
        """Every option as a step would use it (a bad value raises now, not at the next step)."""
        resolved = self.resolved()
        dataclasses.replace(resolved.sample, top_k=self.top_k, seed=self.seed)

    def _generate(self, step: str, options: StepOptions, inserted: str | None) -> str:
        """Stream the step's code into a display; the code, truncated by CodeGen's rules."""
        resolved = self.resolved()
        decoder = self._decoder(options.model or resolved.model, resolved)
        chosen = {} if options.temperature is None else {"temperature": options.temperature}
        try:
            sample = dataclasses.replace(
                resolved.sample, top_k=self.top_k, seed=self.seed, codegen_rules=True, **chosen
            )
            budget = decoder.max_context - sample.max_new_tokens
            turns = self.history.before(self._cell_id)
            fitted = fit_context(resolved.prefix, turns, step, budget, decoder.count_tokens)
        except CodeGenError as error:
            raise UsageError(str(error)) from None
        if fitted.warning:
            print(fitted.warning, file=sys.stderr)
        return stream_code(decoder, fitted.text, sample, inserted)

    def _decoder(self, model: str, resolved: Settings) -> Decoder:
        key = (model, resolved.server or "", resolved.dtype or "", str(resolved.context_window))
        if key not in self._decoders:
            from codegen_repl.core.decoding import open_decoder

            try:
                self._decoders[key] = open_decoder(
                    model, server=resolved.server, api_key=resolved.api_key,
                    dtype=resolved.dtype, context_window=resolved.context_window,
                )  # fmt: skip
            except CodeGenError as error:
                raise UsageError(f"{error} (set another with %codegen_config model=NAME)") from None
        return self._decoders[key]

    def _before_cell(self, info: Any) -> None:
        self._cell_id = getattr(info, "cell_id", None) or None

    def _after_cell(self, result: Any) -> None:
        info = getattr(result, "info", None)
        if info is None or not getattr(info, "store_history", True) or info.silent:
            return
        cell_id = getattr(info, "cell_id", None) or None
        if info.raw_cell and (result.success or cell_id):  # a re-run that failed: marked so
            self.history.add_cell(info.raw_cell, cell_id, failed=not result.success)


def stream_code(
    decoder: Decoder, prompt: str, sample: SampleParams, inserted: str | None = None
) -> str:
    """Generate into a display that is updated as pieces arrive; Ctrl-C stops it (and stops
    the cell). The final display is the code and a rule before its outputs, or (`inserted`,
    for `--insert`) that line, which says where the code went instead."""
    handle = display(PLACEHOLDER, raw=True, metadata=CODE_METADATA, display_id=True)
    pieces: list[str] = []
    shown_at = time.monotonic()
    try:
        with contextlib.closing(decoder.generate(prompt, sample)) as stream:  # type: ignore[type-var]
            for piece in stream:
                pieces.append(piece)
                if time.monotonic() - shown_at >= _SHOW_EVERY_S:
                    handle.update(code_bundle("".join(pieces)), raw=True, metadata=CODE_METADATA)
                    shown_at = time.monotonic()
    except CodeGenError as error:
        raise UsageError(str(error)) from None
    except BaseException:
        handle.update(code_bundle("".join(pieces)), raw=True, metadata=CODE_METADATA)
        raise
    final = (
        {"text/markdown": f"*{inserted}*", "text/plain": inserted}
        if inserted
        else code_bundle("".join(pieces), rule=True)
    )
    handle.update(final, raw=True, metadata=CODE_METADATA)
    return "".join(pieces)


def run_in_shell(shell: Any, code: str) -> bool:
    """Run code as the body of the current cell: shown in tracebacks like a cell, its last
    expression displayed. Its exception fails the cell with a traceback of the generated code's
    frames only (raised on, it would also show the `%%codegen` call and IPython's magic frames).
    Returns whether it ran without an exception.
    """
    filename = shell.compile.cache(code, shell.execution_count)
    namespace = (shell.user_global_ns, shell.user_ns)
    try:
        tree = ast.parse(code, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        # the generated code is this cell's own code: running it is the magic's job, as IPython's
        # run_cell does (calling run_cell here would nest a second cell inside this one)
        exec(compile(tree, filename, "exec"), *namespace)
        value = None
        if isinstance(last, ast.Expr):
            value = eval(compile(ast.Expression(last.value), filename, "eval"), *namespace)
    except (Exception, KeyboardInterrupt) as error:
        _fail_cell(shell, error)
        return False
    if value is not None:
        shell.displayhook(value)
    return True


def _fail_cell(shell: Any, error: BaseException) -> None:
    """Show `error` as IPython shows a cell's own exception, from the generated code's first
    frame on, and mark the running cell as failed."""
    traceback = error.__traceback__
    own = traceback.tb_next if traceback is not None else None  # skip run_in_shell's frame
    shell.showtraceback((type(error), error, own or traceback), tb_offset=0)
    result = getattr(shell.displayhook, "exec_result", None)  # the running cell's result
    if result is not None:
        result.error_in_exec = error


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(CodeGenMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("CodeGenMagics")
    if magics is not None:
        magics.close()
