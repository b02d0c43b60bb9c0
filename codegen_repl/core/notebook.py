"""A session's notebook: its turns and settings, and the .ipynb file they are saved in (nbformat
v4; our metadata under the "codegen" key), written atomically, never half-written.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import nbformat

from codegen_repl.core.context import TurnText
from codegen_repl.core.settings import DEFAULT_PREFIX, DEFAULT_SAMPLE, DEFAULT_TIMEOUT_S
from codegen_repl.errors import CodeGenError, ConfigError
from codegen_repl.model.sample_params import SampleParams

if TYPE_CHECKING:
    from codegen_repl.core.executor import RunResult

NOTEBOOK_KEY = "codegen"  # our key in notebook and cell metadata

# What became of a turn's code: the executor's statuses ("ok" ... "died"), "skipped" (shown only,
# run=never: still part of the program), "declined" (the user said no: not part of the program),
# "pending" (not decided yet).
TurnStatus = Literal[
    "ok", "error", "interrupted", "timeout", "died", "skipped", "declined", "pending"
]
TURN_STATUSES: tuple[TurnStatus, ...] = get_args(TurnStatus)
NOT_RUN: tuple[TurnStatus, ...] = ("skipped", "declined", "pending")
# A turn whose code raised or did not finish: it stays (in the notebook, in `/code`), but it is
# left out of the model's context unless the user keeps it (`/keep N`): a failed attempt must not
# steer the next steps.
FAILED: tuple[TurnStatus, ...] = ("error", "interrupted", "timeout", "died")
# A later turn that ran to the end (with or without an error) is run again after an earlier turn
# is edited, replaced or dropped; one that did not run or did not finish is left as it is.
RUNS_AGAIN: tuple[TurnStatus, ...] = ("ok", "error")
# The message of a skipped turn whose code was to run and did not (Ctrl-C while the kernel
# started, a kernel that lacked earlier state, a kernel that ended first) starts so: unlike a
# turn shown only (run=never), the kernel lacks its state, and a replay stops there.
NOT_RUN_MESSAGE = "not run: "
STOPPED_FIRST = f"{NOT_RUN_MESSAGE}the kernel ended before it ran (a restart, a crash)"
DECLINED_TAG = "codegen-declined"  # the notebook tag of a declined turn's code cell
DECLINED_NOTE = "(declined: this code was not run and is not part of the program)"
SAVE_SUFFIXES = (".ipynb", ".py")
# the types of a code cell's metadata fields, as `notebook_of` writes them
_CELL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": (str, type(None)),
    "sample": dict,
    "timings": dict,
    "message": str,
    "kept": bool,
    "cell_id": str,
}  # a session as a notebook, or its program


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """How a session samples and runs code.

    Args:
        prefix: text before the first turn (MTPB's imports by default; "" for none).
        sample: sampling settings; CodeGen's truncation rules are always applied to steps.
        timeout: seconds a turn's code may run before it is interrupted (None: no limit).
    """

    prefix: str = DEFAULT_PREFIX
    sample: SampleParams = dataclasses.field(default_factory=lambda: DEFAULT_SAMPLE)
    timeout: float | None = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        timeout = self.timeout
        if timeout is not None and not (
            isinstance(timeout, int | float)
            and not isinstance(timeout, bool)
            and math.isfinite(timeout)
            and timeout > 0
        ):
            raise ConfigError(
                f"timeout must be a positive number of seconds or None, got {timeout!r}"
            )
        if not isinstance(self.prefix, str):
            raise ConfigError(f"prefix must be a string, got {self.prefix!r}")

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "sample": dataclasses.asdict(self.sample),
                "timeout": self.timeout}  # fmt: skip

    @classmethod
    def from_json(cls, data: object) -> SessionSettings:
        """Settings as `to_json` wrote them (a missing key takes its default).

        Raises:
            ConfigError: `data` is not that shape (a hand-edited or damaged notebook).
        """
        if not isinstance(data, dict):
            raise ConfigError(f"the settings are {data!r}, not an object")
        sample = data.get("sample", {})
        known = {field.name for field in dataclasses.fields(SampleParams)}
        if not isinstance(sample, dict) or not set(sample) <= known:
            raise ConfigError(
                f"the sample settings {sample!r} are not an object with keys among "
                f"{', '.join(sorted(known))}"
            )
        stop = sample.get("stop", [])
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a list of strings, got {stop!r}")
        try:
            return cls(
                prefix=data.get("prefix", DEFAULT_PREFIX),
                sample=SampleParams(**(sample | {"stop": tuple(stop)})),
                timeout=data.get("timeout", DEFAULT_TIMEOUT_S),
            )
        except TypeError as wrong:  # a value of the wrong type inside SampleParams' checks
            raise ConfigError(f"the sample settings {sample!r} are not valid ({wrong})") from None


@dataclasses.dataclass
class Turn:
    """One step and its code, or (step None) code the user wrote."""

    step: str | None
    code: str
    outputs: list[dict] = dataclasses.field(default_factory=list)
    status: TurnStatus = "pending"
    execution_count: int | None = None
    sample: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    message: str = ""  # what the executor had to say (a restart, a replay)
    kept: bool = False  # a failed turn the user keeps in the model's context (`/keep N`)
    # The notebook cell that made the turn (JupyterLab's `metadata.cellId`; "" for none): saved,
    # so the cell run again replaces its turn after a `load` too.
    cell_id: str = ""

    @property
    def text(self) -> TurnText:
        return TurnText(self.step, self.code)

    @property
    def in_program(self) -> bool:
        """Whether the turn is part of the program (every turn but a declined one)."""
        return self.status != "declined"

    @property
    def in_context(self) -> bool:
        """Whether the model sees the turn: part of the program, and neither failed (FAILED)
        nor left unrun by a fault (`never_ran`), unless the user kept it."""
        return self.in_program and (self.kept or not (self.status in FAILED or self.never_ran))

    @property
    def never_ran(self) -> bool:
        """Whether the code was to run and did not (see NOT_RUN_MESSAGE)."""
        return self.status == "skipped" and self.message.startswith(NOT_RUN_MESSAGE)

    @property
    def title(self) -> str:
        return self.step if self.step is not None else "your code"

    def record(self, result: RunResult) -> None:
        self.outputs = list(result.outputs)
        self.status = _turn_status(result.status)
        self.execution_count = result.execution_count
        self.timings["run_s"] = round(result.duration_s, 4)
        self.message = result.message


def notebook_of(
    turns: list[Turn], settings: SessionSettings, kernel_id: str = ""
) -> nbformat.NotebookNode:
    """The session as a notebook: a markdown cell per step, a code cell per turn (with its
    outputs and our metadata), settings in the notebook metadata (and `kernel_id`, the Jupyter
    kernel that writes it, where one does: see `Session.kernel_id`)."""
    cells = []
    for turn in turns:
        if turn.step is not None:
            cells.append(nbformat.v4.new_markdown_cell(_step_markdown(turn)))
        meta: dict[str, Any] = {"step": turn.step, "status": turn.status, "sample": turn.sample,
                "timings": turn.timings, "message": turn.message}  # fmt: skip
        if turn.kept:
            meta["kept"] = True
        if turn.cell_id:
            meta["cell_id"] = turn.cell_id
        metadata: dict[str, Any] = {NOTEBOOK_KEY: meta}
        if not turn.in_program:
            metadata["tags"] = [DECLINED_TAG]
        cell = nbformat.v4.new_code_cell(turn.code, metadata=metadata)
        cell.outputs = [nbformat.from_dict(output) for output in turn.outputs]
        cell.execution_count = turn.execution_count
        cells.append(cell)
    ours: dict[str, Any] = {"settings": settings.to_json()}
    if kernel_id:
        ours["kernel_id"] = kernel_id
    metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        NOTEBOOK_KEY: ours,
    }
    return nbformat.v4.new_notebook(cells=cells, metadata=metadata)


def written_here(path: Path) -> bool:
    """Whether `path` is a session notebook this tool wrote (our metadata key); a missing or
    unreadable file counts as ours (opening it says what is wrong)."""
    try:
        notebook = nbformat.read(str(path), as_version=4)
    except Exception:
        return True
    return NOTEBOOK_KEY in notebook.metadata


def new_session_path(folder: Path, now: Callable[[], datetime] = datetime.now) -> Path:
    """A fresh `session-<date>-<time>.ipynb` in `folder` (never an existing file)."""
    stem = now().strftime("session-%Y%m%d-%H%M%S")
    path, number = folder / f"{stem}.ipynb", 1
    while path.exists():
        number += 1
        path = folder / f"{stem}-{number}.ipynb"
    return path


def _step_markdown(turn: Turn) -> str:
    """A step's markdown cell; a declined step says so (the code cell below it is not run)."""
    assert turn.step is not None
    if turn.in_program:
        return turn.step
    return f"{turn.step}\n\n*{DECLINED_NOTE}*"


def _turn_status(value: str) -> TurnStatus:
    if value not in TURN_STATUSES:
        raise CodeGenError(f"unknown turn status {value!r}; expected one of {TURN_STATUSES}")
    return cast(TurnStatus, value)


def turns_from_cells(cells: list[Any]) -> Iterator[Turn]:
    """The turns of a session notebook's code cells (our metadata under NOTEBOOK_KEY).

    Raises:
        ConfigError: a cell's metadata is not what `notebook_of` writes.
    """
    for number, cell in enumerate(cells, 1):
        if cell.cell_type != "code":
            continue
        meta = cell.metadata.get(NOTEBOOK_KEY, {})
        if not isinstance(meta, dict) or any(
            key in meta and not isinstance(meta[key], kind) for key, kind in _CELL_FIELDS.items()
        ):
            raise ConfigError(f"cell {number}'s metadata {meta!r} is not readable")
        status, message = _turn_status(meta.get("status", "ok")), meta.get("message", "")
        if status == "pending":  # saved before it ran (a replaced turn is), then the kernel ended
            status, message = "skipped", STOPPED_FIRST
        yield Turn(
            step=meta.get("step"),
            code=cell.source,
            outputs=[dict(output) for output in cell.outputs],
            status=status,
            execution_count=cell.execution_count,
            sample=dict(meta.get("sample", {})),
            timings=dict(meta.get("timings", {})),
            message=message,
            kept=meta.get("kept", False),
            cell_id=meta.get("cell_id", ""),
        )


def remove_stale_temps(path: Path) -> None:
    """Remove the temp files of `write_atomically` (`.<name>.XXXXXXXX`) that a writer killed
    mid-save left beside `path`."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}")  # as tempfile names
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if pattern.fullmatch(temp.name):
            temp.unlink(missing_ok=True)


def file_mode(path: Path) -> int:
    """The permission bits for writing `path`: an existing file's own, else what `open` would
    give a new file (0666 less the umask), as for any other file the user writes."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        pass
    umask = os.umask(0o022)  # read it (it can only be read by setting it) ...
    os.umask(umask)  # ... and put it back
    return 0o666 & ~umask


def write_atomically(path: Path, text: str) -> None:
    """Temp file in the same folder (with the mode of `file_mode`), fsync, rename over the
    target, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(handle, file_mode(path))  # mkstemp's 0600 would ignore the umask
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
