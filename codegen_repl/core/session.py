"""The multi-turn session: steps in, code out, run in a live kernel, saved as a notebook.

A session IS a notebook (nbformat v4): a markdown cell per natural-language step, a code cell
per snippet with its outputs, settings in the notebook metadata. It is written atomically
(temp file, fsync, rename) after every turn, before the next one begins, so a crash or a
`kill -9` loses nothing that finished. `Session.open` resumes: the turns come back and the
kernel state is rebuilt by replaying the turns that ran without error.

Turns are numbered from 1 wherever a person sees or names them (`/undo`, `/edit N`, `/run N`,
`/code`). Code that did not run is never run behind the user's back: every replay (undo, edit,
resume) runs only turns whose status is "ok", each under the session's timeout. A declined
turn (the user answered "no") is also left out of the program (context, `/code`, `.py`
export); it stays in the notebook, marked, and `run_turn(N)` runs it on request. A turn whose code
failed (raised, was interrupted, timed out, killed its kernel) stays in the notebook but leaves the
model's context, so a failed attempt does not steer the next steps, unless the user keeps it
(`keep(N)`, `/keep N`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import nbformat

from codegen_repl.core.context import fit_context, step_line
from codegen_repl.core.decoding import Decoder, prepare_decoder
from codegen_repl.core.executor import Executor, RunResult
from codegen_repl.core.interrupts import held_interrupts, interrupts_call
from codegen_repl.core.notebook import (
    FAILED,
    NOT_RUN,
    NOTEBOOK_KEY,
    RUNS_AGAIN,
    SAVE_SUFFIXES,
    SessionSettings,
    Turn,
    TurnStatus,
    notebook_of,
    remove_stale_temps,
    turns_from_cells,
    write_atomically,
)
from codegen_repl.core.outputs import InputCallback
from codegen_repl.errors import CodeGenError, ConfigError, KernelError

TextCallback = Callable[[str], None]
ProgressCallback = Callable[[str], None]  # "replaying 3/11: turn 4", as long work goes on
OutputCallback = Callable[[dict], None]
# What to do with a new turn's code: run it, keep it without running it, or decline it.
# (True and False, as older callers pass them, mean "run" and "skip".)
RunChoice = Literal["run", "skip", "decline"]
_POLL_S = 0.1  # how often a wait for the kernel's background work redraws its status


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
        self.notice = ""  # set when a replay could not rebuild the whole kernel state
        self.missing: tuple[int, ...] = ()  # the turns whose state the kernel lacks (notice)
        self.on_progress: ProgressCallback | None = None  # told of replays as they go
        self.on_input: InputCallback | None = None  # answers input() in turns (None: no one)
        self._clock = clock
        self._stop = threading.Event()  # an interrupt asked a replay to stop
        self._replaying = False
        # The kernel's start or resume replay, behind the prompt (start_kernel, open):
        self._kernel_job: threading.Thread | None = None
        self._kernel_done = threading.Event()  # waited on, not the thread (see wait_kernel)
        self._kernel_error: BaseException | None = None
        self._kernel_status = ""
        self.new_notice = False  # set when a background replay ended with a `notice`
        self.save_error = ""  # why the last autosave failed, until told ("": it did not)
        self._fitted: tuple[object, tuple[str, int]] | None = None  # fitted_context's last
        self.autosave_failed = False  # whether the last autosave failed
        # The notebook cell whose input runs now (a kernel sets it per cell; "": none): new
        # turns record it (`Turn.cell_id`), so that cell run again finds its turn.
        self.cell_id = ""
        # The Jupyter kernel that autosaves the session (its connection file's name, which a
        # restart keeps), saved in the notebook's metadata: the kernel restarted under a renamed
        # notebook finds its previous file by it. "" outside Jupyter.
        self.kernel_id = ""

    # ------------------------------------------------------------------------- the model's view

    def context(self, step: str, before: int | None = None) -> str:
        """The prompt for `step`: prefix, the turns so far in the model's context (or those
        before index `before`, for a turn that replaces another), then the step's comment
        line."""
        budget = self.decoder.max_context - self.settings.sample.max_new_tokens
        turns = [turn.text for turn in self.turns[:before] if turn.in_context]
        fitted = fit_context(self.settings.prefix, turns, step, budget, self.decoder.count_tokens)
        self.warning = fitted.warning
        return fitted.text

    def program(self) -> str:
        """The whole program as the model sees it (also the `.py` export); declined turns and
        failed ones not kept are left out."""
        turns = "".join(turn.text.render() for turn in self.turns if turn.in_context)
        return self.settings.prefix + turns

    def turn(self, number: int) -> Turn:
        """Turn `number`, counted from 1; a ConfigError names the turns there are."""
        if not self.turns:
            raise ConfigError("there is no turn yet")
        if not 1 <= number <= len(self.turns):
            raise ConfigError(f"there is no turn {number}; turns are 1..{len(self.turns)}")
        return self.turns[number - 1]

    # ------------------------------------------------------------------------- turns

    def generate(
        self, step: str, on_text: TextCallback | None = None, before: int | None = None
    ) -> tuple[str, float]:
        """The code for `step` (truncated by CodeGen's rules, without the blank lines the cut
        leaves: the context adds its own) and the seconds it took; `before`: see `context`."""
        sample = dataclasses.replace(self.settings.sample, codegen_rules=True, n=1)
        start = self._clock()
        pieces = []
        for piece in self.decoder.generate(self.context(step, before), sample):
            pieces.append(piece)
            if on_text:
                on_text(piece)
        return "".join(pieces).rstrip(), self._clock() - start

    def step(
        self,
        text: str,
        on_text: TextCallback | None = None,
        on_output: OutputCallback | None = None,
        run: bool | RunChoice = True,
    ) -> Turn:
        """Generate the code of a natural-language step, run it (unless `run` says otherwise),
        record and save the turn."""
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
        run: bool | RunChoice = True,
    ) -> Turn:
        """Record a step whose code was generated (and maybe edited) in `seconds`: run it,
        keep it unrun (`run` "skip" or False) or record it declined ("decline"); save."""
        return self.keep(self.step_turn(step, code, seconds), on_output, run)

    def step_turn(self, step: str, code: str, seconds: float) -> Turn:
        """A new, not yet run turn for a step whose code was generated in `seconds`."""
        turn = Turn(step, code, sample=dataclasses.asdict(self.settings.sample))
        turn.timings["generate_s"] = round(seconds, 4)
        return turn

    def run_code(self, code: str, on_output: OutputCallback | None = None) -> Turn:
        """A turn of code the user wrote: it runs and enters the context as code."""
        return self.keep(Turn(None, code), on_output, run=True)

    def undo(self) -> Turn | None:
        """Drop the last turn; the kernel is restored to the state before it (a turn whose code
        never ran needs no restart).

        Ctrl-C during an undo stops the replay, never the bookkeeping: the turn is dropped
        (and the file saved) whatever happens once the undo has begun, the kernel is always a
        live one, and `notice` and `missing` name the turns whose state it lacks."""
        if not self.turns:
            return None
        with interrupts_call(self.request_stop):
            dropped = self.turns[-1]
            notice, missing = "", tuple[int, ...]()
            if dropped.status not in NOT_RUN:
                notice, missing = self._rebuild_kernel(self.turns[:-1])
            with held_interrupts(reraise=False):
                self.turns.pop()
                self.notice, self.missing = notice, missing
                self._autosave()
        return dropped

    def retry(
        self, on_text: TextCallback | None = None, on_output: OutputCallback | None = None
    ) -> Turn:
        """Resample the last step from the state before it (the next seed), then put the new
        code in its place (`replace`: the kernel is rebuilt only then). Ctrl-C while the code
        is written changes nothing: the last turn and the seed stay as they were."""
        settings = self.settings
        number, step = self.retry_step()
        try:
            code, seconds = self.generate(step, on_text, before=number - 1)
        except BaseException:
            self.settings = settings  # the seed as it was
            raise
        turn = self.step_turn(step, code, seconds)
        self.replace(number, turn, on_output)
        return turn

    def retry_step(self) -> tuple[int, str]:
        """The number and step of the turn a retry resamples (the last turn, a step), after
        moving to the next seed (a caller that gives up restores `settings`).

        Raises:
            ConfigError: there is no step, or the last turn is the user's own code.
        """
        last = self._last_step()
        seed = int(last.sample.get("seed", self.settings.sample.seed)) + 1
        self.settings = dataclasses.replace(
            self.settings, sample=dataclasses.replace(self.settings.sample, seed=seed)
        )
        assert last.step is not None
        return len(self.turns), last.step

    def edit(self, number: int, code: str, on_output: OutputCallback | None = None) -> list[Turn]:
        """Replace turn `number`'s code (from 1), rebuild the kernel from the "ok" turns before
        it, then run it and the turns after it that ran to the end before ("ok" or "error").
        Turns that did not run (declined, skipped) or did not finish (interrupted, timeout,
        died) stay as they are; `run_turn` runs one on request. Returns the turns from
        `number` on."""
        index = self.turns.index(self.turn(number))
        self.turns[index].code = code
        self._autosave()
        self.notice, self.missing = self._rebuild_kernel(self.turns[:index])
        reruns = [(position == 0 and turn.status not in NOT_RUN) or turn.status in RUNS_AGAIN
                  for position, turn in enumerate(self.turns[index:])]  # fmt: skip
        self._run_again(index, reruns, on_output, on_output)
        return self.turns[index:]

    def replace(
        self,
        number: int,
        turn: Turn,
        on_output: OutputCallback | None = None,
        run: RunChoice = "run",
    ) -> list[Turn]:
        """Put `turn` (new, not run yet) in place of turn `number` (from 1), as a notebook
        cell run again replaces its step: when any turn from `number` on had run, the kernel
        is rebuilt from the "ok" turns before it; `turn` runs (or is recorded unrun, as `run`
        says; its outputs go to `on_output`), then the later turns that ran to the end before
        ("ok" or "error") run again, as after `edit`. Returns the turns from `number` on."""
        index = self.turns.index(self.turn(number))
        ran = any(later.status not in NOT_RUN for later in self.turns[index:])
        turn.cell_id = turn.cell_id or self.turns[index].cell_id  # still that cell's turn
        self.turns[index] = turn
        self._autosave()
        self.notice, self.missing = self._rebuild_kernel(self.turns[:index]) if ran else ("", ())
        if run != "run":
            turn.status = "declined" if run == "decline" else "skipped"
        reruns = [run == "run"] + [later.status in RUNS_AGAIN
                                   for later in self.turns[index + 1 :]]  # fmt: skip
        self._run_again(index, reruns, on_output, None)
        return self.turns[index:]

    def drop(self, number: int) -> tuple[Turn, list[Turn]]:
        """Delete turn `number` (from 1): the kernel is rebuilt from the "ok" turns before it
        when it or a later turn had run, and the later turns that ran to the end before run
        again (as after `edit`). Returns the dropped turn and the turns after it."""
        index = self.turns.index(self.turn(number))
        if index == len(self.turns) - 1:
            dropped = self.undo()
            assert dropped is not None
            return dropped, []
        ran = any(later.status not in NOT_RUN for later in self.turns[index:])
        dropped = self.turns.pop(index)
        self._autosave()
        if not ran:
            return dropped, self.turns[index:]
        self.notice, self.missing = self._rebuild_kernel(self.turns[:index])
        reruns = [later.status in RUNS_AGAIN for later in self.turns[index:]]
        self._run_again(index, reruns, None, None)
        return dropped, self.turns[index:]

    def keep_in_context(self, number: int, kept: bool = True) -> Turn:
        """Put failed turn `number` back into the model's context (`kept` False: leave it out
        again); saved. A ConfigError when the turn did not fail (it is in the context)."""
        turn = self.turn(number)
        if turn.status not in FAILED and not turn.never_ran:
            raise ConfigError(f"turn {number} did not fail ({turn.status}); only a failed turn "
                              "(or one that was to run and did not) is left out of the model's "
                              "context")  # fmt: skip
        turn.kept = kept
        self._autosave()
        return turn

    def _run_again(
        self,
        index: int,
        reruns: list[bool],
        first_output: OutputCallback | None,
        later_output: OutputCallback | None,
    ) -> None:
        """Run the turns from `index` on whose `reruns` entry is True (the first one's outputs
        to `first_output`, the others' to `later_output`), saving after each; where the kernel
        lacks earlier state (`notice`), run none: they are named in `missing` instead."""
        if self.notice:  # the kernel lacks earlier state: running later turns would mislead
            wanted = [index + 1 + at for at, rerun in enumerate(reruns) if rerun]
            for turn in self.turns[index : index + len(reruns)]:
                if turn.status == "pending":  # new code that was to run: kept, unrun
                    turn.status = "skipped"
                    turn.message = "not run: the kernel lacks the state of earlier turns"
            self.missing = (*self.missing, *wanted)
            were = "was" if len(wanted) == 1 else "were"
            self.notice = f"{self.notice}; {turns_named(wanted)} {were} not run again"
            self._autosave()  # the new turn is saved as not run, no longer as pending
            return
        for position, (turn, rerun) in enumerate(zip(self.turns[index:], reruns, strict=True)):
            if rerun:
                output = first_output if position == 0 else later_output
                turn.record(self._run(turn.code, output))
                self._autosave()

    def run_turn(self, number: int, on_output: OutputCallback | None = None) -> Turn:
        """Run turn `number`'s code again, now, in the live kernel (no restart, no replay):
        its outputs and status are replaced. A declined or skipped turn runs on this request
        and becomes part of the program."""
        turn = self.turn(number)
        turn.record(self._run(turn.code, on_output))
        self.missing = tuple(missing for missing in self.missing if missing != number)
        self._autosave()
        return turn

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
                    raise ConfigError(
                        "the last turn is your own code; a retry resamples only a step"
                    )
                return turn
        raise ConfigError("there is no step to retry yet")

    def keep(
        self,
        turn: Turn,
        on_output: OutputCallback | None = None,
        run: bool | RunChoice = True,
        status: TurnStatus = "skipped",
    ) -> Turn:
        """Run a turn whose code is known (`run` True or "run"), or record it unrun: declined
        ("decline"), or with `status` (False or "skip"); append it and save."""
        choice = ("run" if run else "skip") if isinstance(run, bool) else run
        turn.cell_id = turn.cell_id or self.cell_id
        if choice == "run":
            try:
                self.wait_kernel()
                if self.new_notice:  # a replay behind the prompt fell short, untold so far
                    raise KernelError(f"the kernel lacks the state of {turns_named(self.missing)}"
                                      ", which this code may need (see the warning)")  # fmt: skip
                turn.record(self._run(turn.code, on_output))
            except (KeyboardInterrupt, CodeGenError) as stopped:  # no kernel to run it in (Ctrl-C
                # while waiting for it, a failed start): the turn stays, unrun
                why = stopped if isinstance(stopped, CodeGenError) else "Ctrl-C"
                turn.status, turn.message = "skipped", f"not run: {why}"
                self.turns.append(turn)
                if self.notice:  # what the kernel lacks: this turn too (`/run N` lists it)
                    self.missing = (*self.missing, len(self.turns))
                    self.notice = f"{self.notice}; turn {len(self.turns)} was not run"
                self._autosave()
                raise
        else:
            turn.status = "declined" if choice == "decline" else status
        self.turns.append(turn)
        self._autosave()
        self.prepare_next()
        return turn

    def prepare_next(self, typed: str = "") -> None:
        """Let the decoder get ready for the next step while the user types: a local decoder
        prefills the context so far and compiles what a step after it runs (decoders/local.py);
        a loading one does it once loaded. Returns at once.

        `typed`: the step as typed so far (the REPL calls again as it grows), prefilled too,
        as its comment line without the line's end: a step then has only its last few tokens
        left to prefill after Enter (a partial last word tokenizes apart from the whole one;
        the decoder reuses the common prefix of its cache)."""
        sample = dataclasses.replace(self.settings.sample, codegen_rules=True, n=1)

        def context() -> str:
            so_far = self.fitted_context()[0]
            return so_far + step_line(typed).removesuffix("\n") if typed.strip() else so_far

        prepare_decoder(self.decoder, context, sample)

    def fitted_context(self) -> tuple[str, int]:
        """What the model gets before the next step's comment line, and how many of the
        oldest turns in the context are left out of it: `context`'s fit (within max_context
        minus max_new_tokens tokens). When not even the prefix fits, the prefix and every
        turn left out (the step will say so). Fitting tokenizes the context once per turn
        left out, so the answer is kept until the turns, prefix, budget or decoder change
        (the REPL asks at every pause in typing, in its prompt's thread)."""
        budget = self.decoder.max_context - self.settings.sample.max_new_tokens
        turns = tuple(turn.text for turn in self.turns if turn.in_context)
        key = (self.settings.prefix, turns, budget, id(self.decoder))
        if self._fitted is not None and self._fitted[0] == key:
            return self._fitted[1]
        try:
            fitted = fit_context(self.settings.prefix, turns, "", budget, self.decoder.count_tokens)
            result = fitted.text.removesuffix(step_line("")), fitted.dropped
        except CodeGenError:
            result = self.settings.prefix, len(turns)
        self._fitted = (key, result)
        return result

    def _run(self, code: str, on_output: OutputCallback | None) -> RunResult:
        self.wait_kernel()
        return self.executor.run(code, self.settings.timeout, on_output, self.on_input)

    # ------------------------------------------------------------------------- the kernel

    def start_kernel(self, background: bool = False) -> None:
        """Start the executor's kernel; with `background`, in a thread, so the prompt comes
        at once (the first code to run waits for it: `wait_kernel`). Raises KernelError (not
        in the background: the first `wait_kernel` raises it)."""
        if background:
            self._behind("starting", self.executor.start)
        else:
            self.executor.start()

    @property
    def kernel_status(self) -> str:
        """What the kernel is busy with behind the prompt ("starting", "replaying 3/11: turn
        4"); "" when nothing."""
        job = self._kernel_job
        return self._kernel_status if job is not None and not self._kernel_done.is_set() else ""

    def wait_kernel(self) -> None:
        """Block until the kernel's background start or replay has ended, telling
        `on_progress` what it waits for as that changes. Ctrl-C stops a replay (`notice`
        names the turns whose state the kernel then lacks) and raises KeyboardInterrupt.

        Raises:
            KernelError: the background start failed (the error says why).
            KeyboardInterrupt: the user stopped waiting.
        """
        job = self._kernel_job
        if job is None or job is threading.current_thread():
            return
        shown = ""
        try:
            # An Event, not Thread.join: a Ctrl-C inside join() marks the thread stopped
            # while it still runs (CPython 3.11, the bpo-45274 handling in threading.py).
            while not self._kernel_done.wait(_POLL_S):
                status = self._kernel_status
                if status != shown:
                    self.progress(f"waiting for the kernel: {status}")
                    shown = status
        except KeyboardInterrupt:
            self.stop_kernel_work()
            raise
        self._end_kernel_job()

    def stop_kernel_work(self) -> None:
        """Stop a background replay (the turn it replays is interrupted; `notice` says which
        turns' state the kernel lacks) or wait out a background start; returns when neither
        runs. Ctrl-C is held meanwhile: this is never long."""
        job = self._kernel_job
        if job is None or job is threading.current_thread():
            return
        with held_interrupts():
            self.request_stop()
            self._kernel_done.wait()
        self._end_kernel_job()

    def _behind(self, status: str, work: Callable[[], None]) -> None:
        """Run `work` (a kernel start or replay) in a daemon thread; see `wait_kernel`."""
        self._kernel_status, self._kernel_error = status, None
        self._kernel_done.clear()

        def job() -> None:
            try:
                work()
            except BaseException as error:  # raised where the kernel is next waited for
                self._kernel_error = error
            finally:
                self._kernel_done.set()

        self._kernel_job = threading.Thread(target=job, name="codegen-kernel", daemon=True)
        self._kernel_job.start()

    def _end_kernel_job(self) -> None:
        self._kernel_job, error, self._kernel_error = None, self._kernel_error, None
        if isinstance(error, CodeGenError):
            raise error
        if error is not None:
            raise KernelError(f"the kernel could not start: {type(error).__name__}: {error}")

    @property
    def replaying(self) -> bool:
        """Whether a replayed turn runs now (`request_stop` interrupts it)."""
        return self._replaying

    def request_stop(self) -> None:
        """Stop a replay (undo, edit, resume) after the turn it is replaying, which is
        interrupted; the kernel stays, without the state of the turns not replayed. Any
        thread; Ctrl-C during a replay in the main thread calls it."""
        self._stop.set()
        if self._replaying:
            self.executor.interrupt()

    def _rebuild_kernel(self, turns: list[Turn]) -> tuple[str, tuple[int, ...]]:
        """A fresh kernel with the "ok" turns of `turns` (the first ones of the session)
        replayed in order, each under the session's timeout and without input. Returns ("",
        ()) or what went wrong and the numbers of the turns whose state the kernel lacks; an
        interrupt (`request_stop`, Ctrl-C) stops the replay that way, never leaving no kernel.
        The replay stops before a turn that was to run and never did (`Turn.never_ran`): the
        turns after it may need its state, so it and they are named instead."""
        wanted = [(number, turn) for number, turn in enumerate(turns, 1)
                  if turn.status == "ok" or turn.never_ran]  # fmt: skip
        unrun = next((at for at, (_, turn) in enumerate(wanted) if turn.never_ran), len(wanted))
        replay = wanted[:unrun]
        self.stop_kernel_work()  # a replay behind the prompt is moot: this one replaces it
        self._stop.clear()
        with interrupts_call(self.request_stop):
            what = f" to replay {count_of(len(replay), 'turn')}" if replay else ""
            self.progress(f"restarting the kernel{what}")
            try:
                self.executor.restart()
            except KeyboardInterrupt:  # held until the new kernel was up
                self._stop.set()
            for position, (number, turn) in enumerate(replay):
                self.progress(f"replaying {position + 1}/{len(replay)}: turn {number}")
                if self._stop.is_set():
                    return _lacking(wanted[position:], "the replay was interrupted")
                self._replaying = True
                try:
                    result = self.executor.run(turn.code, self.settings.timeout)
                finally:
                    self._replaying = False
                if result.status != "ok":
                    return _lacking(wanted[position:], _replay_failure(number, result))
        if unrun < len(wanted):
            return _lacking(wanted[unrun:], f"turn {wanted[unrun][0]} never ran")
        return "", ()

    def progress(self, text: str) -> None:
        """Tell `on_progress` of long work (a replay, a restart); from the kernel's work behind
        the prompt, it becomes `kernel_status` instead (no thread but the front end's prints).
        The executor's own progress goes here too (`Commands` routes it)."""
        if threading.current_thread() is self._kernel_job:  # behind the prompt: the status
            self._kernel_status = text  # line of whoever waits for it (`wait_kernel`)
        elif self.on_progress is not None:
            self.on_progress(text)

    # ------------------------------------------------------------------------- persistence

    def to_notebook(self) -> nbformat.NotebookNode:
        return notebook_of(self.turns, self.settings, self.kernel_id)

    def save(self, path: Path | None = None) -> Path | None:
        """Write the notebook atomically; `.py` paths get the program instead.

        Raises:
            ConfigError: any other suffix, or the file cannot be written (a read-only folder,
                a full disk: the error says which); nothing is written then.
        """
        path = path or self.path
        if path is None:
            return None
        if path.suffix not in SAVE_SUFFIXES:
            raise ConfigError(f"cannot save as {path.name}: use a .ipynb path (the session, "
                              "as a notebook) or a .py path (the program)")  # fmt: skip
        try:
            if path.suffix == ".py":
                write_atomically(path, self.program())
            else:
                notebook = self.to_notebook()
                nbformat.validate(notebook)
                write_atomically(path, nbformat.writes(notebook))
        except OSError as error:
            raise ConfigError(f"cannot write {path}: {error.strerror or error}") from None
        return path

    def _autosave(self) -> None:
        """`save` after a change; a file that cannot be written loses nothing: the turns stay
        here and `save_error` says what failed, for the front end to tell (once per failure).
        A session without a file is left as it is (a kernel whose autosave could not start
        marks it `autosave_failed`, so that a `save` command moves it to the file it writes)."""
        if self.path is None:
            return
        try:
            self.save()
        except ConfigError as error:
            self.save_error = f"{error}; the session is kept in memory: save it elsewhere"
            self.autosave_failed = True  # a `save` command elsewhere moves the session there
        else:
            self.save_error, self.autosave_failed = "", False

    @classmethod
    def open(
        cls,
        path: Path,
        decoder: Decoder,
        executor: Executor,
        on_progress: ProgressCallback | None = None,
        new_path: Path | None = None,
        background: bool = False,
    ) -> Session:
        """Resume a saved session: turns back, kernel state rebuilt by replay (told to
        `on_progress`; Ctrl-C stops it, see `notice`). With `new_path` the notebook's turns
        begin a new session saved there (`path` is only read: a notebook this tool did not
        write). With `background` the replay runs behind the prompt: the first code to run
        waits for it (`wait_kernel`), and `new_notice` is set if it fell short."""
        remove_stale_temps(path)
        try:
            notebook = nbformat.read(str(path), as_version=4)
        except FileNotFoundError:
            raise ConfigError(
                f"{path} does not exist; start a new session with that name"
            ) from None
        except Exception as bad:  # nbformat raises several kinds for a broken file
            why = (str(bad).strip().splitlines() or [type(bad).__name__])[0]  # one line
            raise ConfigError(f"{path} is not a readable notebook ({why}); check the path, "
                              "or open another session") from None  # fmt: skip
        try:
            meta = notebook.metadata.get(NOTEBOOK_KEY, {})
            if not isinstance(meta, dict):
                raise ConfigError(f"its {NOTEBOOK_KEY!r} metadata is {meta!r}, not an object")
            settings = SessionSettings.from_json(meta.get("settings", {}))
            turns = list(turns_from_cells(notebook.cells))
        except CodeGenError as bad:
            raise ConfigError(
                f"{path} holds session data this tool cannot read ({bad}); fix or delete its "
                f'"{NOTEBOOK_KEY}" metadata, or start a new session'
            ) from None
        session = cls(decoder, executor, new_path or path, settings)
        session.turns = turns
        session.on_progress = on_progress
        session.prepare_next()  # the decoder prefills the context while the kernel replays
        if background:
            session._behind("restarting", session._replay_behind)
        else:
            session.notice, session.missing = session._rebuild_kernel(session.turns)
        if new_path is not None:
            session._autosave()
        return session

    def _replay_behind(self) -> None:
        self.notice, self.missing = self._rebuild_kernel(self.turns)
        self.new_notice = bool(self.notice)


def _lacking(replay: list[tuple[int, Turn]], why: str) -> tuple[str, tuple[int, ...]]:
    numbers = tuple(number for number, _ in replay)
    return f"{why}: the kernel lacks the state of {turns_named(numbers)}", numbers


def _replay_failure(number: int, result: RunResult) -> str:
    """`turn 4 raised AssertionError: ... when replayed` (and the other statuses)."""
    errors = [out for out in result.outputs if out.get("output_type") == "error"]
    if result.status == "error" and errors:
        evalue = str(errors[-1].get("evalue", "")).strip().rstrip(".")
        what = f"raised {errors[-1].get('ename', 'an error')}"
        if evalue:
            return f"turn {number} {what} when replayed ({evalue})"
    else:
        endings = {"interrupted": "was interrupted", "timeout": "ran past the session's timeout",
                   "died": "killed the kernel"}  # fmt: skip
        what = endings.get(result.status, f"ended {result.status}")
    return f"turn {number} {what} when replayed"


def turns_named(numbers: Sequence[int]) -> str:
    """`turn 2`, `turns 2, 3`."""
    listed = ", ".join(str(number) for number in numbers)
    return f"turn {listed}" if len(numbers) == 1 else f"turns {listed}"


def count_of(number: int, noun: str) -> str:
    """`1 turn`, `3 turns`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
