"""The sandbox's worker process and the child it forks per job (the parent's side, the pool
of workers, is `sandbox.py`).

A worker is started as `python -c "from codegen_repl.evals.sandbox_worker import worker_main;
worker_main()" CONFIG_JSON FOLDER`: it reads jobs as JSON lines on stdin and writes one
`Outcome` per line on stdout. For each job it forks a child in a new process group with an
empty folder, resource limits, an unprivileged user id when run as root, and the reference
HumanEval harness's reliability guard; the child runs the job's checker and writes its dict to
fd 3. The worker keeps the first `max_output_bytes` of output (and drops the rest), enforces
the wall timeout and the resident-memory cap, then kills and reaps everything below it (it is a
child subreaper) and deletes the folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import importlib
import json
import os
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from codegen_repl.evals.sandbox import Outcome, SandboxConfig

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
MEMORY_POLL_S = 0.01  # how often the worker sums the program's resident memory
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


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
    resident_bytes: int = 0  # set when over the memory cap
    exit_status: int | None = None


def _watch(config: SandboxConfig, pid: int, output_fd: int, result_fd: int, start: float) -> _Watch:
    """Collect output and the result until the child exits, times out or uses too much memory."""
    watch = _Watch()
    pidfd = os.pidfd_open(pid)
    open_fds = [output_fd, result_fd, pidfd]
    memory_limit = config.memory_limit_bytes
    try:
        while watch.exit_status is None:
            remaining = start + config.timeout_s - time.monotonic()
            if remaining <= 0:
                watch.timed_out = True
                return watch
            ready, _, _ = select.select(open_fds, [], [], min(remaining, MEMORY_POLL_S))
            resident = _resident_bytes(pid)
            if resident > memory_limit:
                watch.resident_bytes = resident
                return watch
            if output_fd in ready:
                _read_output(config, output_fd, watch, open_fds)
            if result_fd in ready and not _read_into(result_fd, watch.result, _MAX_RESULT_BYTES):
                open_fds.remove(result_fd)  # end of file: stop watching it
            if pidfd in ready:
                watch.exit_status = os.waitpid(pid, 0)[1]
        _drain(result_fd, watch.result, _MAX_RESULT_BYTES)  # written just before the exit
        _drain(output_fd, watch.output, config.max_output_bytes)
        return watch
    finally:
        os.close(pidfd)


def _read_output(config: SandboxConfig, fd: int, watch: _Watch, open_fds: list[int]) -> None:
    """Read what is there: the first max_output_bytes are kept, the rest dropped (the reference
    harnesses swallow output without a limit, so output alone never fails a program)."""
    count = _read_into(fd, watch.output, config.max_output_bytes)
    if not count:
        open_fds.remove(fd)  # end of file
    watch.output_bytes += count


def _resident_bytes(pid: int) -> int:
    """Resident memory of the child and every process below it (threads share their process's)."""
    total = 0
    for member in (pid, *_descendants(pid)):
        with (
            contextlib.suppress(OSError, ValueError, IndexError),
            open(f"/proc/{member}/statm", "rb") as statm,
        ):
            total += int(statm.read().split()[1]) * _PAGE_BYTES
    return total


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
    if watch.resident_bytes:
        used = watch.resident_bytes >> 20
        return Outcome(False, "memory_limit", f"used {used} MB of memory; killed", **common)
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
    limits = {resource.RLIMIT_CPU: config.cpu_limit, resource.RLIMIT_CORE: 0}
    if config.max_file_mb is not None:
        limits[resource.RLIMIT_FSIZE] = config.max_file_mb << 20
    if config.max_processes is not None:  # None: the caller's limit, inherited
        limits[resource.RLIMIT_NPROC] = config.max_processes
        if not config.unprivileged:  # NPROC counts every process of this user: leave room
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
