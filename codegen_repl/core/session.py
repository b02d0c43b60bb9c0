"""The multi-turn session: steps in, code out, run in a live kernel, saved as a notebook.

A session IS a notebook (nbformat v4): a markdown cell per natural-language step, a code cell
per snippet with its outputs, settings in the notebook metadata. It is written atomically
(temp file, fsync, rename) after every turn, before the next one begins, so a crash or a
`kill -9` loses nothing that finished. `Session.open` resumes: the turns come back and the
kernel state is rebuilt by replaying the turns that ran without error.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat

from codegen_repl.core.context import MTPB_PREFIX, TurnText, fit_context
from codegen_repl.core.decoding import Decoder
from codegen_repl.core.executor import Executor, RunResult
from codegen_repl.errors import CodeGenError, ConfigError
from codegen_repl.model.sample_params import SampleParams

TextCallback = Callable[[str], None]
OutputCallback = Callable[[dict], None]
NOTEBOOK_KEY = "codegen"  # our key in notebook and cell metadata
DEFAULT_SAMPLE = SampleParams(max_new_tokens=128, temperature=0.2, top_p=0.95)


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """How a session samples and runs code.

    Args:
        prefix: text before the first turn (MTPB's imports by default; "" for none).
        sample: sampling settings; CodeGen's truncation rules are always applied to steps.
        timeout: seconds a turn's code may run before it is interrupted (None: no limit).
    """

    prefix: str = MTPB_PREFIX
    sample: SampleParams = dataclasses.field(default_factory=lambda: DEFAULT_SAMPLE)
    timeout: float | None = 60.0

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(
                f"timeout must be a positive number of seconds or None, got {self.timeout}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "sample": dataclasses.asdict(self.sample),
                "timeout": self.timeout}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionSettings:
        sample = dict(data.get("sample", {}))
        sample["stop"] = tuple(sample.get("stop", ()))
        return cls(
            prefix=data.get("prefix", MTPB_PREFIX),
            sample=SampleParams(**sample),
            timeout=data.get("timeout", 60.0),
        )


@dataclasses.dataclass
class Turn:
    """One step and its code, or (step None) code the user wrote."""

    step: str | None
    code: str
    outputs: list[dict] = dataclasses.field(default_factory=list)
    status: str = "pending"  # ok | error | interrupted | timeout | died | skipped | pending
    execution_count: int | None = None
    sample: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    message: str = ""  # what the executor had to say (a restart, a replay)

    @property
    def text(self) -> TurnText:
        return TurnText(self.step, self.code)

    def record(self, result: RunResult) -> None:
        self.outputs = list(result.outputs)
        self.status = result.status
        self.execution_count = result.execution_count
        self.timings["run_s"] = round(result.duration_s, 4)
        self.message = result.message


class Session:
    """Turns, the decoder that writes their code, and the executor that runs it."""

    def __init__(
        self,
        decoder: Decoder,
        executor: Executor,
        path: Path | None = None,
        settings: SessionSettings | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.decoder, self.executor, self.path = decoder, executor, path
        self.settings = settings or SessionSettings()
        self.turns: list[Turn] = []
        self.warning: str | None = None  # set when the context had to drop turns
        self._clock = clock

    # ------------------------------------------------------------------------- the model's view

    def context(self, step: str) -> str:
        """The prompt for `step`: prefix, every turn so far, then the step's comment line."""
        budget = self.decoder.max_context - self.settings.sample.max_new_tokens
        fitted = fit_context(
            self.settings.prefix, [t.text for t in self.turns], step, budget,
            self.decoder.count_tokens,
        )  # fmt: skip
        self.warning = fitted.warning
        return fitted.text

    def program(self) -> str:
        """The whole program as the model sees it (also the `.py` export)."""
        return self.settings.prefix + "".join(turn.text.render() for turn in self.turns)

    # ------------------------------------------------------------------------- turns

    def generate(self, step: str, on_text: TextCallback | None = None) -> tuple[str, float]:
        """The code for `step` (truncated by CodeGen's rules, without the blank lines the cut
        leaves: the context adds its own) and the seconds it took."""
        sample = dataclasses.replace(self.settings.sample, codegen_rules=True, n=1)
        start = self._clock()
        pieces = []
        for piece in self.decoder.generate(self.context(step), sample):
            pieces.append(piece)
            if on_text:
                on_text(piece)
        return "".join(pieces).rstrip(), self._clock() - start

    def step(
        self,
        text: str,
        on_text: TextCallback | None = None,
        on_output: OutputCallback | None = None,
        run: bool = True,
    ) -> Turn:
        """Generate the code of a natural-language step, run it (unless `run` is False), record
        and save the turn."""
        step = text.strip()
        if not step:
            raise ConfigError("the step is empty; describe what the next code should do")
        code, seconds = self.generate(step, on_text)
        return self.add_step(step, code, seconds, on_output, run)

    def add_step(
        self,
        step: str,
        code: str,
        seconds: float,
        on_output: OutputCallback | None = None,
        run: bool = True,
    ) -> Turn:
        """Record a step whose code was generated (and maybe edited) in `seconds`: run it
        (unless `run` is False), record and save the turn."""
        turn = Turn(step, code, sample=dataclasses.asdict(self.settings.sample))
        turn.timings["generate_s"] = round(seconds, 4)
        return self.keep(turn, on_output, run)

    def run_code(self, code: str, on_output: OutputCallback | None = None) -> Turn:
        """A turn of code the user wrote: it runs and enters the context as code."""
        return self.keep(Turn(None, code), on_output, run=True)

    def undo(self) -> Turn | None:
        """Drop the last turn; the kernel is restored to the state before it."""
        if not self.turns:
            return None
        dropped = self.turns.pop()
        self._rebuild_kernel()
        self.save()
        return dropped

    def retry(
        self, on_text: TextCallback | None = None, on_output: OutputCallback | None = None
    ) -> Turn:
        """Resample the last step from the state before it (a new seed each time)."""
        return self.step(self.prepare_retry(), on_text, on_output)

    def prepare_retry(self) -> str:
        """Undo the last step and move to the next seed; returns the step to sample again."""
        last = self._last_step()
        self.undo()
        seed = int(last.sample.get("seed", self.settings.sample.seed)) + 1
        self.settings = dataclasses.replace(
            self.settings, sample=dataclasses.replace(self.settings.sample, seed=seed)
        )
        assert last.step is not None
        return last.step

    def edit(self, index: int, code: str, on_output: OutputCallback | None = None) -> list[Turn]:
        """Replace turn `index`'s code, then re-run it and every turn after it."""
        if not 0 <= index < len(self.turns):
            raise ConfigError(f"there is no turn {index}; turns are 0..{len(self.turns) - 1}")
        self.turns[index].code = code
        later = self.turns[index:]
        self.turns = self.turns[:index]
        self._rebuild_kernel()
        for turn in later:
            self.keep(turn, on_output, run=True)
        return later

    def rerun_last(self, on_output: OutputCallback | None = None) -> Turn:
        last = self.turns[-1] if self.turns else None
        if last is None:
            raise ConfigError("there is no turn to run yet")
        return self.edit(len(self.turns) - 1, last.code, on_output)[0]

    def fix_step(self) -> str:
        """A step that asks for a fix of the last error, quoting its last traceback line."""
        for turn in reversed(self.turns):
            errors = [o for o in turn.outputs if o.get("output_type") == "error"]
            if errors:
                error = errors[-1]
                return f"Fix the error: {error.get('ename', 'Error')}: {error.get('evalue', '')}"
        raise ConfigError("no turn has an error to fix")

    def _last_step(self) -> Turn:
        for turn in reversed(self.turns):
            if turn.step is not None:
                if turn is not self.turns[-1]:
                    raise ConfigError("the last turn is your own code; /retry resamples a step")
                return turn
        raise ConfigError("there is no step to retry yet")

    def keep(self, turn: Turn, on_output: OutputCallback | None = None, run: bool = True) -> Turn:
        """Run (or, with `run` False, skip) a turn whose code is known, record it and save."""
        if run:
            turn.record(self.executor.run(turn.code, self.settings.timeout, on_output))
        else:
            turn.status = "skipped"
        self.turns.append(turn)
        self.save()
        return turn

    def _rebuild_kernel(self) -> None:
        """A fresh kernel with the successful turns replayed, in order."""
        self.executor.restart(replay=[t.code for t in self.turns if t.status == "ok"])

    # ------------------------------------------------------------------------- persistence

    def to_notebook(self) -> nbformat.NotebookNode:
        cells = []
        for turn in self.turns:
            if turn.step is not None:
                cells.append(nbformat.v4.new_markdown_cell(turn.step))
            meta = {"step": turn.step, "status": turn.status, "sample": turn.sample,
                    "timings": turn.timings, "message": turn.message}  # fmt: skip
            cell = nbformat.v4.new_code_cell(turn.code, metadata={NOTEBOOK_KEY: meta})
            cell.outputs = [nbformat.from_dict(output) for output in turn.outputs]
            cell.execution_count = turn.execution_count
            cells.append(cell)
        metadata = {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            NOTEBOOK_KEY: {"settings": self.settings.to_json()},
        }
        return nbformat.v4.new_notebook(cells=cells, metadata=metadata)

    def save(self, path: Path | None = None) -> Path | None:
        """Write the notebook atomically; `.py` paths get the program instead."""
        path = path or self.path
        if path is None:
            return None
        if path.suffix == ".py":
            write_atomically(path, self.program())
        else:
            notebook = self.to_notebook()
            nbformat.validate(notebook)
            write_atomically(path, nbformat.writes(notebook))
        return path

    @classmethod
    def open(cls, path: Path, decoder: Decoder, executor: Executor) -> Session:
        """Resume a saved session: turns back, kernel state rebuilt by replay."""
        try:
            notebook = nbformat.read(str(path), as_version=4)
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist; start a new session with that name"
            ) from None
        except Exception as bad:  # nbformat raises several kinds for a broken file
            raise CodeGenError(f"{path} is not a readable notebook ({bad})") from None
        meta = notebook.metadata.get(NOTEBOOK_KEY, {})
        session = cls(decoder, executor, path, SessionSettings.from_json(meta.get("settings", {})))
        session.turns = list(turns_from_cells(notebook.cells))
        session._rebuild_kernel()
        return session


def turns_from_cells(cells: list[Any]) -> Iterator[Turn]:
    for cell in cells:
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get(NOTEBOOK_KEY, {})
        yield Turn(
            step=meta.get("step"),
            code=cell.source,
            outputs=[dict(output) for output in cell.outputs],
            status=meta.get("status", "ok"),
            execution_count=cell.execution_count,
            sample=dict(meta.get("sample", {})),
            timings=dict(meta.get("timings", {})),
            message=meta.get("message", ""),
        )


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename over the target, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
