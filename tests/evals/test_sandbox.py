"""The sandbox against hostile programs: each is a failure of its own sample, nothing else.

Every hostile program runs in a batch next to a correct program, which must still pass, and the
sandbox must still answer afterwards. Real processes, real limits; no mocks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from codegen_repl.errors import ConfigError
from codegen_repl.evals.sandbox import Job, Outcome, Sandbox, SandboxConfig

GOOD = Job("assert sum(range(10)) == 45")
FORK_BOMB = """
import posix
while True:
    try:
        posix.fork()
    except OSError:
        pass
"""
ESCAPING_BOMB = """
import os, posix, time
for _ in range(200):
    try:
        if posix.fork() == 0:
            os.setsid()
            time.sleep(600)
    except OSError:
        pass
time.sleep(600)
"""
UNPRIVILEGED = os.geteuid() == 0  # the sandbox drops to its own user id when run as root


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    config = SandboxConfig(
        workers=2, timeout_s=1.5, memory_mb=2048, max_processes=16, max_file_mb=16
    )  # tighter than the defaults (test_sandbox_reference)
    with Sandbox(config) as box:
        yield box


def run_with_good(sandbox: Sandbox, program: str) -> Outcome:
    """The hostile program's outcome; a correct neighbour in the same batch must pass."""
    hostile, good, good_again = sandbox.run([Job(program), GOOD, GOOD])
    assert good.passed and good_again.passed, (good, good_again)
    assert not hostile.passed
    return hostile


def descendants(root: int) -> list[int]:
    """Live processes below `root` (for a worker: whatever its jobs left; it is their
    subreaper, so also the ones that escaped with setsid)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if stat[0] != b"Z":
                parents[int(entry)] = int(stat[1])
    found, todo = [], [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += children
        todo += children
    return found


def job_processes(sandbox: Sandbox) -> list[int]:
    """Processes left by jobs: the workers' descendants (other tests' processes, started by
    this test process too, are not the sandbox's)."""
    workers = [w._process.pid for w in sandbox._workers if w._process is not None]
    return [pid for worker in workers for pid in descendants(worker)]


def pid_checker(program: str, payload: Any) -> dict[str, Any]:
    """A checker for the parallelism test: which worker ran me."""
    exec(program, {})
    return {"passed": True, "worker": os.getppid()}


def test_correct_and_wrong_programs(sandbox: Sandbox) -> None:
    ok, wrong, syntax = sandbox.run([GOOD, Job("assert 1 + 1 == 3"), Job("def f(:")])
    assert (ok.passed, ok.status) == (True, "passed")
    assert (wrong.status, wrong.detail) == ("failed", "failed: AssertionError: ")
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail


def test_infinite_loop_times_out(sandbox: Sandbox) -> None:
    outcome = run_with_good(sandbox, "while True:\n    pass")
    assert outcome.status == "timeout"


def test_sleeping_program_times_out(sandbox: Sandbox) -> None:
    outcome = run_with_good(sandbox, "import time\ntime.sleep(60)")
    assert outcome.status == "timeout"


def test_guard_makes_fork_and_subprocess_unavailable(sandbox: Sandbox) -> None:
    for program in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['ls'])",
                    "import os\nos.system('true')"):  # fmt: skip
        outcome = run_with_good(sandbox, program)
        assert "'NoneType' object is not callable" in outcome.detail


def test_fork_bomb_is_bounded_and_cleaned_up(sandbox: Sandbox) -> None:
    # posix.fork is the guard's blind spot: RLIMIT_NPROC bounds it (as root, that of the
    # sandbox's own user id; otherwise the user's current count plus max_processes).
    peak = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak.append(len(job_processes(sandbox)))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    bomb = FORK_BOMB
    try:
        outcome = run_with_good(sandbox, bomb)
    finally:
        stop.set()
        watcher.join()
    assert outcome.status == "timeout"
    assert max(peak) <= 2 * sandbox.config.max_processes  # two workers, one bomb at most each
    assert job_processes(sandbox) == []


def test_escaping_fork_bomb_is_killed(sandbox: Sandbox) -> None:
    # Children that leave the process group (setsid) are still found through the subreaper.
    outcome = run_with_good(sandbox, ESCAPING_BOMB)
    assert outcome.status == "timeout"
    assert job_processes(sandbox) == []


def test_memory_hog_fails(sandbox: Sandbox) -> None:
    for program in ("x = bytearray(50 * 2**30)", "x = [0] * (2**33)"):
        outcome = run_with_good(sandbox, program)
        assert outcome.status == "failed" and "MemoryError" in outcome.detail


def test_segfault_is_a_crash(sandbox: Sandbox) -> None:
    outcome = run_with_good(sandbox, "import ctypes\nctypes.string_at(0)")
    assert (outcome.status, outcome.detail) == ("crashed", "killed by SIGSEGV")


def test_os_exit_is_a_crash(sandbox: Sandbox) -> None:
    outcome = run_with_good(sandbox, "import os\nos._exit(0)")
    assert outcome.status == "crashed" and "without a result" in outcome.detail


def test_sys_exit_and_keyboard_interrupt_fail(sandbox: Sandbox) -> None:
    for program in ("import sys\nsys.exit(0)", "raise KeyboardInterrupt"):
        assert run_with_good(sandbox, program).status == "failed"


def test_deleting_files_is_prevented(sandbox: Sandbox, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for program in (f"import os\nos.remove({str(victim)!r})",
                    f"import os\nos.unlink({str(victim)!r})",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})"):  # fmt: skip
        run_with_good(sandbox, program)
    assert victim.read_text() == "keep me"


@pytest.mark.skipif(not UNPRIVILEGED, reason="without a user of its own only the guard protects")
def test_deleting_files_past_the_guard_is_denied(sandbox: Sandbox, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    outcome = run_with_good(sandbox, f"import posix\nposix.unlink({str(victim)!r})")
    assert "PermissionError" in outcome.detail
    assert victim.read_text() == "keep me"


def test_gigabytes_of_output_are_cut(sandbox: Sandbox) -> None:
    # Output past the cap is dropped, not fatal: a flood ends at the timeout.
    outcome = run_with_good(sandbox, "while True:\n    print('x' * 1_000_000)")
    assert outcome.status == "timeout", outcome
    assert len(outcome.output) <= 2000


def test_resident_memory_over_the_cap_is_killed() -> None:
    # A cap of 512 MiB and time enough (10 s) to reach it on a loaded machine.
    config = SandboxConfig(workers=1, timeout_s=10.0, memory_mb=512)
    programs = ("x = bytearray(2**30)\nx[::4096] = b'1' * 2**18",  # 1 GiB, every page touched
                "import sys\nsys.stdout.write('y' * 2**31)")  # fmt: skip
    with Sandbox(config) as box:
        for program in programs:
            outcome = box.run_one(Job(program))
            assert outcome.status == "memory_limit" and "MB of memory" in outcome.detail, outcome
            assert len(outcome.output) <= 2000
        assert box.run_one(GOOD).passed


def test_writing_a_huge_file_fails(sandbox: Sandbox) -> None:
    outcome = run_with_good(sandbox, "open('big', 'wb').write(b'x' * (64 << 20))")
    assert "File too large" in outcome.detail


def test_each_program_gets_a_fresh_empty_folder(sandbox: Sandbox) -> None:
    left, right = sandbox.run([Job("open('mark', 'w').write('1')"),
                               Job("import posix\nassert posix.listdir('.') == []")])  # fmt: skip
    assert left.passed and right.passed, right


def test_dead_worker_is_replaced(sandbox: Sandbox) -> None:
    with Sandbox(SandboxConfig(workers=1, timeout_s=5.0)) as box:
        box.run_one(GOOD)  # start the worker
        worker = box._workers[0]._process
        assert worker is not None
        threading.Timer(0.5, lambda: os.kill(worker.pid, 9)).start()
        died = box.run_one(Job("import time\ntime.sleep(3)"))
        assert died.status == "worker_died"
        assert box.run_one(GOOD).passed


def test_programs_run_in_parallel_workers() -> None:
    config = SandboxConfig(workers=2, timeout_s=5.0)
    with Sandbox(config) as box:
        jobs = [Job("import time\ntime.sleep(0.3)", "tests.evals.test_sandbox:pid_checker")] * 4
        outcomes = box.run(jobs)
    assert all(o.passed for o in outcomes)
    assert len({o.result["worker"] for o in outcomes}) == 2


def test_bad_configuration_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="workers must be a positive whole number"):
        SandboxConfig(workers=0)
    with pytest.raises(ConfigError, match="timeout_s must be a positive"):
        SandboxConfig(timeout_s=0)


def test_unknown_checker_fails_the_job_only(sandbox: Sandbox) -> None:
    bad, good = sandbox.run([Job("x = 1", "codegen_repl.nothing:here"), GOOD])
    assert not bad.passed and "unknown checker" in bad.detail and good.passed


def test_without_a_user_of_its_own_programs_still_run() -> None:
    # The path taken when not running as root (forced here; as root only the guard and the
    # user's process count would bound a fork bomb, so none runs in this test).
    with Sandbox(SandboxConfig(workers=1, timeout_s=1.0, drop_privileges=False)) as box:
        ok, wrong, loop = box.run([GOOD, Job("assert False"), Job("while True:\n    pass")])
    assert ok.passed and wrong.status == "failed"
    assert loop.status == "timeout"
