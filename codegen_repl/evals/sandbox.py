"""Run untrusted programs (model samples) in parallel, each in its own limited process.

`Sandbox(config).run(jobs)` returns one `Outcome` per `Job`, in order. Each of `config.workers`
workers is a fresh Python (never a fork of the caller, which may hold JAX threads) that
imports `config.preload` once and forks a child per job. The child gets a new process group,
an empty temporary folder, capped stdout/stderr, RLIMIT_AS/CPU/FSIZE/NPROC/CORE, its own
unprivileged user id when we run as root (the kernel does not apply RLIMIT_NPROC to root, and
that user cannot touch others' files), and the reference HumanEval harness's reliability guard;
then it calls the job's checker (`"module:function"`) and reports its dict over a private pipe.
After a wall timeout the worker kills the child and everything below it (the worker is a child
subreaper, so orphans come back to it), reaps them and deletes the folder. A worker that dies
is replaced; its job counts as failed. The README lists what this does not protect against.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib
import json
import math
import os
import queue
import resource
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
STATUSES = ("passed", "failed", "timeout", "crashed", "output_limit", "worker_died")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_UNPRIVILEGED_UID_BASE = 3_000_000  # + worker pid: ids that no real account uses
_RESULT_FD = 3
_MAX_RESULT_BYTES = 1 << 20
_KEPT_OUTPUT_CHARS = 2000
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_KEEPCAPS = 8
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_CAPABILITY_VERSION_3 = 0x20080522
_READ_CAPABILITIES = (2, 1)  # CAP_DAC_READ_SEARCH, else CAP_DAC_OVERRIDE
_WORKER_SLACK_S = 30.0  # how much longer than a job's timeout the caller waits for a worker


_WORKER_MAIN = "from codegen_repl.evals.sandbox import worker_main; worker_main()"


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of each program and how many run at once.

    Args:
        workers: programs run in parallel (default: the number of CPU cores).
        timeout_s: wall-clock seconds per program, from fork to exit.
        memory_mb: address-space limit (RLIMIT_AS); numpy alone reserves a few hundred MB.
        cpu_s: CPU-seconds limit (RLIMIT_CPU); default: the timeout rounded up, plus 1.
        max_processes: RLIMIT_NPROC of the sandbox user (processes and threads).
        max_file_mb: largest file a program may write (RLIMIT_FSIZE).
        max_output_bytes: stdout + stderr beyond this kills the program (status output_limit).
        preload: modules each worker imports once, so children start with them loaded.
        drop_privileges: run programs as an unprivileged user id (None: when running as root).
    """

    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    timeout_s: float = 3.0
    memory_mb: int = 4096
    cpu_s: int | None = None
    max_processes: int = 16
    max_file_mb: int = 16
    max_output_bytes: int = 1 << 20
    preload: tuple[str, ...] = ("numpy",)
    drop_privileges: bool | None = None

    def __post_init__(self) -> None:
        if sys.platform != "linux":
            raise ConfigError("the sandbox needs Linux (process limits, /proc, pidfd)")
        for name in ("workers", "memory_mb", "max_processes", "max_file_mb", "max_output_bytes"):
            value = getattr(self, name)
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
        return self.cpu_s or math.ceil(self.timeout_s) + 1

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


# ----------------------------------------------------------------------------- the caller's side


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


# ----------------------------------------------------------------------------- the worker


def worker_main() -> None:
    """Entry point of a worker process: jobs as JSON lines on stdin, outcomes on stdout."""
    config = json.loads(sys.argv[1])
    config["preload"] = tuple(config["preload"])
    settings = SandboxConfig(**config)
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
    for name in settings.preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    _become_subreaper()
    gc.freeze()  # children would otherwise copy every page the collector touches
    for line in sys.stdin.buffer:
        request = json.loads(line)
        outcome = _evaluate(settings, request, sys.argv[2])
        protocol.write(json.dumps(outcome.to_json()).encode() + b"\n")
        protocol.flush()


_LIBC = ctypes.CDLL(None, use_errno=True)


def _become_subreaper() -> None:
    """Orphaned descendants of our children are re-parented to us, so we can kill them."""
    _LIBC.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _evaluate(config: SandboxConfig, request: dict[str, Any], parent: str) -> Outcome:
    try:
        module, _, name = request["checker"].partition(":")
        checker = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        return Outcome(False, "failed", f"unknown checker {request['checker']!r}: {error}")
    uid = _UNPRIVILEGED_UID_BASE + os.getpid() if config.unprivileged else None
    folder = tempfile.mkdtemp(prefix="job-", dir=parent)
    try:
        if uid is not None:
            os.chown(folder, uid, uid)
        return _run_child(config, checker, request, folder, uid)
    finally:
        _kill_descendants()
        shutil.rmtree(folder, ignore_errors=True)


def _run_child(
    config: SandboxConfig,
    checker: Callable[[str, Any], dict[str, Any]],
    request: dict[str, Any],
    folder: str,
    uid: int | None,
) -> Outcome:
    output_read, output_write = os.pipe()
    result_read, result_write = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        os.close(output_read)
        os.close(result_read)
        _child(config, checker, request, folder, uid, output_write, result_write)
    os.close(output_write)
    os.close(result_write)
    try:
        watch = _watch(config, pid, output_read, result_read, start)
    finally:
        for kill in (os.killpg, os.kill):  # the child may have left its process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
        os.close(output_read)
        os.close(result_read)
    _, wait_status = os.waitpid(pid, 0) if watch.exit_status is None else (pid, watch.exit_status)
    return _outcome(watch, wait_status, time.monotonic() - start)


@dataclasses.dataclass
class _Watch:
    output: bytearray = dataclasses.field(default_factory=bytearray)
    result: bytearray = dataclasses.field(default_factory=bytearray)
    output_bytes: int = 0
    timed_out: bool = False
    too_much_output: bool = False
    exit_status: int | None = None


def _watch(config: SandboxConfig, pid: int, output_fd: int, result_fd: int, start: float) -> _Watch:
    """Collect output and the result until the child exits, times out or floods stdout."""
    watch = _Watch()
    pidfd = os.pidfd_open(pid)
    open_fds = [output_fd, result_fd, pidfd]
    try:
        while watch.exit_status is None:
            remaining = start + config.timeout_s - time.monotonic()
            if remaining <= 0:
                watch.timed_out = True
                return watch
            ready, _, _ = select.select(open_fds, [], [], remaining)
            if output_fd in ready and not _read_output(config, output_fd, watch, open_fds):
                return watch
            if result_fd in ready and not _read_into(result_fd, watch.result, _MAX_RESULT_BYTES):
                open_fds.remove(result_fd)  # end of file: stop watching it
            if pidfd in ready:
                watch.exit_status = os.waitpid(pid, 0)[1]
        _drain(result_fd, watch.result, _MAX_RESULT_BYTES)  # written just before the exit
        _drain(output_fd, watch.output, config.max_output_bytes)
        return watch
    finally:
        os.close(pidfd)


def _read_output(config: SandboxConfig, fd: int, watch: _Watch, open_fds: list[int]) -> bool:
    """Read what is there; False when the program wrote more than it may."""
    count = _read_into(fd, watch.output, config.max_output_bytes)
    if not count:
        open_fds.remove(fd)  # end of file
    watch.output_bytes += count
    if watch.output_bytes > config.max_output_bytes:
        watch.too_much_output = True
        return False
    return True


def _read_into(fd: int, buffer: bytearray, cap: int) -> int:
    try:
        chunk = os.read(fd, 1 << 16)
    except BlockingIOError:
        return 0
    if len(buffer) < cap:
        buffer += chunk[: cap - len(buffer)]
    return len(chunk)


def _drain(fd: int, buffer: bytearray, cap: int) -> None:
    """Read what is left without waiting: descendants may still hold the pipe open."""
    os.set_blocking(fd, False)
    while len(buffer) < cap and _read_into(fd, buffer, cap):
        pass


def _outcome(watch: _Watch, wait_status: int, duration: float) -> Outcome:
    output = watch.output.decode(errors="replace")[:_KEPT_OUTPUT_CHARS]
    common: dict[str, Any] = {"output": output, "duration_s": round(duration, 4)}
    if watch.timed_out:
        return Outcome(False, "timeout", "timed out", **common)
    if watch.too_much_output:
        return Outcome(False, "output_limit", "too much output; the program was killed", **common)
    if os.WIFSIGNALED(wait_status):
        name = signal.Signals(os.WTERMSIG(wait_status)).name
        return Outcome(False, "crashed", f"killed by {name}", **common)
    try:
        result = json.loads(watch.result.decode())
    except ValueError:
        code = os.WEXITSTATUS(wait_status)
        return Outcome(False, "crashed", f"exited (status {code}) without a result", **common)
    passed = result.get("passed") is True
    detail = str(result.get("detail", ""))
    return Outcome(passed, "passed" if passed else "failed", detail, result=result, **common)


def _kill_descendants() -> None:
    """Kill every process below this worker (they are ours: we are a subreaper), then reap."""
    for _ in range(1000):
        found = _descendants(os.getpid())
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _reap()
        if not found:
            return
        time.sleep(0.001)


def _descendants(root: int) -> list[int]:
    """Live processes below `root`, through /proc/PID/task/TID/children (cheap: no scan of
    every process on the machine)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone already
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/children", "rb") as children:
                    listed = [int(child) for child in children.read().split()]
            except OSError:
                continue
            found += listed
            todo += listed
    return found


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# ----------------------------------------------------------------------------- the child


def _child(
    config: SandboxConfig,
    checker: Callable[[str, Any], dict[str, Any]],
    request: dict[str, Any],
    folder: str,
    uid: int | None,
    output_fd: int,
    result_fd: int,
) -> None:
    """Set up the limits, run the checker, report, exit. Never returns."""
    write, exit_now = os.write, os._exit  # the guard removes neither, but keep our own copies
    try:
        os.setpgid(0, 0)
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the worker died: so do we
        _plumb(output_fd, result_fd)
        os.chdir(folder)
        _limit(config)
        if uid is not None:
            _drop_privileges(uid)
        reliability_guard()
        result = checker(request["program"], request["payload"])
        data = json.dumps(result, default=repr).encode()
    except BaseException as error:  # a broken checker or setup is this job's failure only
        data = json.dumps({"passed": False, "detail": f"sandbox: {error!r}"}).encode()
    with contextlib.suppress(BaseException):
        for start in range(0, len(data), 1 << 16):
            write(_RESULT_FD, data[start : start + (1 << 16)])
    exit_now(0)


def _plumb(output_fd: int, result_fd: int) -> None:
    """stdin from /dev/null, stdout/stderr into the output pipe, the result pipe as fd 3, and
    nothing else open (the worker's protocol pipes above all)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.dup2(result_fd, _RESULT_FD)
    os.closerange(_RESULT_FD + 1, os.sysconf("SC_OPEN_MAX"))
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as we do
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stdin = open(0, closefd=False)  # noqa: SIM115


def _drop_privileges(uid: int) -> None:
    """Become `uid` (so RLIMIT_NPROC applies and others' files cannot be changed), keeping one
    capability: reading any file, so the interpreter can still import from a root-only
    install (pyenv under /root). Without CAP_DAC_READ_SEARCH we fall back to
    CAP_DAC_OVERRIDE, which also allows writing: then only the guard protects files."""
    libc = _LIBC
    permitted = _permitted_capabilities()
    keep = next((cap for cap in _READ_CAPABILITIES if permitted >> cap & 1), None)
    libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if keep is not None:
        header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
        data = (ctypes.c_uint32 * 6)(1 << keep, 1 << keep, 0, 0, 0, 0)  # effective, permitted
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset failed")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give root back


def _permitted_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return 0


def _limit(config: SandboxConfig) -> None:
    memory = config.memory_mb << 20
    limits = {
        resource.RLIMIT_AS: memory,
        resource.RLIMIT_CPU: config.cpu_limit,
        resource.RLIMIT_FSIZE: config.max_file_mb << 20,
        resource.RLIMIT_NPROC: config.max_processes,
        resource.RLIMIT_CORE: 0,
    }
    if not config.unprivileged:  # NPROC counts every process of this user: leave room for them
        limits[resource.RLIMIT_NPROC] = _user_tasks() + config.max_processes
    for kind, value in limits.items():
        _, ceiling = resource.getrlimit(kind)
        if ceiling != resource.RLIM_INFINITY:
            value = min(value, ceiling)
        resource.setrlimit(kind, (value, value))


def _user_tasks() -> int:
    """Threads of this user now (RLIMIT_NPROC counts threads)."""
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
    return count


def reliability_guard() -> None:
    """Make destructive calls unavailable, as the reference HumanEval harness does.

    Not a security boundary on its own (a program can re-import `posix`); the process limits
    and the unprivileged user are what bound the damage.
    """
    import builtins
    import faulthandler
    import subprocess as subprocess_module

    faulthandler.disable()
    builtins.exit = builtins.quit = None  # type: ignore[assignment]
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
        "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
        "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
        "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
    ):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, None)
    subprocess_module.Popen = None  # type: ignore[assignment, misc]
    builtins.help = None  # type: ignore[assignment]
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None  # type: ignore[assignment]
