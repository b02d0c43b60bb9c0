"""The kernel process: start an IPython kernel on this process's Python (with optional
resource limits), stop it with everything it started, and describe how it ended.

The kernel also ends with this process (its owner) however the owner ends, `kill -9` included:
see `_LAUNCHER`. Its connection file is named after the owner, so one left behind by an owner
that died together with its kernel is removed when the next kernel starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from jupyter_core.paths import jupyter_runtime_dir
from jupyter_core.utils import ensure_dir_exists

from codegen_repl.errors import KernelError

KERNEL_NAME = "python3"
_SHUTDOWN_WAIT_S = 3.0  # a polite shutdown is given this long before the kill
_LOG_TAIL_CHARS = 2000

CONNECTION_PREFIX = "codegen-kernel-"  # + the owner's pid + "-" + a random part + ".json"

# Run by the kernel's Python before ipykernel (POSIX). argv: -c LAUNCHER OWNER_PID MEMORY_MB CPU_S
# -f CONNECTION_FILE. The kernel must go with its owner (the REPL, the codegen kernel) however
# the owner dies, even by SIGKILL: a reaper process, forked here into the kernel's own process
# group but outside the kernel (so a kernel stuck in C code cannot delay it), waits for the
# owner to end, removes the connection file (it holds the kernel's key) and kills the group:
# the kernel, what its cells started, and itself. A polite shutdown kills the group too.
# The limits then bind the kernel (and what it spawns) but never the owner.
_LAUNCHER = """\
import os, resource, runpy, select, signal, sys, time
owner, memory_mb, cpu_s = int(sys.argv[1]), sys.argv[2], sys.argv[3]
del sys.argv[1:4]
connection_file = sys.argv[sys.argv.index("-f") + 1]
def owner_ended(owner_fd):
    if owner_fd is not None:
        select.select([owner_fd], [], [])  # a pidfd is readable once its process has ended
        return
    while True:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)  # no pidfd_open (not Linux): look again
def reap(owner_fd):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the group's interrupts are for the kernel
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    owner_ended(owner_fd)
    try:
        os.unlink(connection_file)
    except OSError:
        pass
    os.killpg(0, signal.SIGKILL)
try:
    owner_fd = os.pidfd_open(owner)  # Linux: the owner's end is an event, never a reused pid
except (AttributeError, OSError):
    owner_fd = None
if os.getppid() != owner:
    sys.exit("the kernel's owner ended before the kernel started")
child = os.fork() if os.getpgrp() == os.getpid() else -1  # a group of its own to kill
if child == 0:
    try:
        if os.fork() == 0:  # forked twice: the reaper is never the kernel's child (nor zombie)
            reap(owner_fd)
    finally:
        os._exit(0)
if child > 0:
    os.waitpid(child, 0)
if owner_fd is not None:
    os.close(owner_fd)
def limit(kind, soft, hard):
    _, ceiling = resource.getrlimit(kind)
    if ceiling != resource.RLIM_INFINITY:
        soft, hard = min(soft, ceiling), min(hard, ceiling)
    resource.setrlimit(kind, (soft, hard))
if memory_mb != "-":
    limit(resource.RLIMIT_AS, int(memory_mb) << 20, int(memory_mb) << 20)
if cpu_s != "-":  # SIGXCPU at the soft limit names the cause; SIGKILL would look like OOM
    limit(resource.RLIMIT_CPU, int(cpu_s), int(cpu_s) + 2)
runpy.run_module("ipykernel_launcher", run_name="__main__", alter_sys=True)
"""

_SIGNAL_HINTS = {
    "SIGKILL": "by the system's out-of-memory killer or a kill -9",
    "SIGXCPU": "the CPU time limit",
    "SIGSEGV": "a crash in native code",
}


def start_kernel(
    cwd: Path, startup_timeout: float, memory_limit_mb: int | None, cpu_limit_s: int | None
) -> tuple[KernelManager, BlockingKernelClient, IO[bytes]]:
    """A started kernel that has answered, its client, and the file that takes its own
    stdout/stderr (quoted when it fails to start; close it with `discard`).

    Raises:
        KernelError: the kernel did not start or answer within `startup_timeout` seconds.
    """
    spec = KernelSpec(
        argv=_kernel_argv(memory_limit_mb, cpu_limit_s),
        display_name="Python 3 (codegen-repl)",
        language="python",
        interrupt_mode="signal",
    )
    remove_stale_connection_files()
    manager = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=_OneSpec(spec),
        connection_file=str(connection_file()),
    )
    manager.shutdown_wait_time = _SHUTDOWN_WAIT_S
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by discard()
    client: BlockingKernelClient | None = None
    try:
        manager.start_kernel(cwd=str(cwd), stdout=log, stderr=log, env=_env(memory_limit_mb))
        client = manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=startup_timeout)
    except BaseException as error:
        tail = _tail(log)
        discard(manager, client, log, now=True)
        if not isinstance(error, Exception):
            raise
        raise KernelError(
            f"could not start the Python kernel: {error}{tail}; check that ipykernel is "
            f"installed in {sys.executable} (`{sys.executable} -m pip install ipykernel`)"
        ) from error
    return manager, client, log


def _kernel_argv(memory_limit_mb: int | None, cpu_limit_s: int | None) -> list[str]:
    if sys.platform == "win32":  # no limits there (ExecutorConfig refuses them); ipykernel's
        # own parent poller ends the kernel with its owner
        return [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    limits = ["-" if value is None else str(value) for value in (memory_limit_mb, cpu_limit_s)]
    owner = str(os.getpid())
    return [sys.executable, "-c", _LAUNCHER, owner, *limits, "-f", "{connection_file}"]


def connection_file() -> Path:
    """A new connection file's path in Jupyter's runtime folder (private to the user), named
    after this process, so that files left by an owner that died with its kernel are found
    (`remove_stale_connection_files`)."""
    folder = Path(jupyter_runtime_dir())
    ensure_dir_exists(folder, mode=0o700)
    return folder / f"{CONNECTION_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.json"


def remove_stale_connection_files() -> list[Path]:
    """Remove the connection files whose owner process has ended; the removed paths."""
    removed = []
    for path in Path(jupyter_runtime_dir()).glob(f"{CONNECTION_PREFIX}*-*.json"):
        owner = path.name.removeprefix(CONNECTION_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _running(int(owner)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _env(memory_limit_mb: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if memory_limit_mb is not None:
        # glibc reserves 64 MiB of address space per thread arena, and RLIMIT_AS counts it
        env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


def kernel_popen(manager: KernelManager | None) -> subprocess.Popen[bytes] | None:
    """The kernel's process, when it was started as a local subprocess."""
    provisioner = None if manager is None else manager.provisioner
    return getattr(provisioner, "process", None)


def exit_description(process: subprocess.Popen[bytes] | None) -> str:
    """How the kernel ended: `exit code N`, or `killed by SIGNAME` with the usual cause."""
    code = None if process is None else process.poll()
    if code is None:
        return "no exit code"
    if code >= 0:
        return f"exit code {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
    hint = _SIGNAL_HINTS.get(name)
    return f"killed by {name}" + (f", {hint}" if hint else "")


class _OneSpec(KernelSpecManager):
    """Serves the one kernelspec the executor builds, so the kernel runs on this process's
    Python whatever kernelspecs are installed."""

    def __init__(self, spec: KernelSpec) -> None:
        super().__init__()
        self._spec = spec

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return self._spec


def discard(
    manager: KernelManager, client: BlockingKernelClient | None, log: IO[bytes] | None, now: bool
) -> None:
    """Stop a kernel, its channels and every process in its process group."""
    provisioner = manager.provisioner
    pgid = getattr(provisioner, "pgid", None)  # read now: shutdown forgets the provisioner
    if client is not None:
        client.stop_channels()
    # A half-started or already dead kernel makes shutdown complain; it is going away anyway.
    with contextlib.suppress(Exception):
        manager.shutdown_kernel(now=now)
    # The kernel's own children (subprocesses of user code) share its group and would
    # outlive a kernel that exited politely; never signal our own group.
    if pgid and pgid != os.getpgrp():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if log is not None:
        log.close()


def _tail(log: IO[bytes]) -> str:
    with contextlib.suppress(OSError, ValueError):
        log.seek(0)
        text = log.read().decode("utf-8", "replace").strip()
        if text:
            return f"\n--- kernel output ---\n{text[-_LOG_TAIL_CHARS:]}\n---"
    return ""
