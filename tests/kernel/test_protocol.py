"""The Jupyter project's own kernel test suite (jupyter_kernel_test) against the installed
`codegen` kernelspec. Its samples are `%%python` and `!` cells, magics and steps' neighbours:
cells whose answers do not depend on what a model writes."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import jupyter_kernel_test
import pytest
from jupyter_client.manager import start_new_kernel

from tests.kernel.conftest import install, kernel_env

NAME = "codegen-protocol-test"


@pytest.fixture(scope="module", autouse=True)
def installed(tmp_path_factory: pytest.TempPathFactory, chat_checkpoint: Path) -> Iterator[None]:
    """Module scope: set up before the TestCase's setUpClass starts the kernel."""
    data = install(tmp_path_factory.mktemp("jupyter"), NAME, chat_checkpoint)
    with kernel_env(data):
        yield


class CodeGenKernelTests(jupyter_kernel_test.KernelTests):
    kernel_name = NAME
    language_name = "codegen"
    file_extension = ".txt"

    code_hello_world = "%%python\nprint('hello, world')"
    code_stderr = "%%python\nimport sys\nprint('oops', file=sys.stderr)"
    code_generate_error = "%%python\nraise ValueError('no')"
    code_execute_result: ClassVar[list[Any]] = [
        {"code": "%%python\n6 * 7", "result": "42"},
        {"code": "!a = 6\n!a * 7", "result": "42"},
    ]
    code_display_data: ClassVar[list[Any]] = [
        {"code": "%%python\nfrom IPython.display import HTML\ndisplay(HTML('<b>x</b>'))",
         "mime": "text/html"},
        {"code": "%code", "mime": "text/markdown"},
    ]  # fmt: skip
    completion_samples: ClassVar[list[Any]] = [
        {"text": "%%python\nimport itertoo", "matches": {"itertools"}},
        {"text": "!import itertoo", "matches": {"itertools"}},
        {"text": "%und", "matches": {"%undo"}},
        {"text": "Print the sum", "matches": set()},
    ]
    complete_code_samples: ClassVar[list[Any]] = [
        "Print the sum of a and b.",
        "%%python\nx = 1",
        "%undo",
        "!x = 1",
    ]
    incomplete_code_samples: ClassVar[list[Any]] = ["%%python\nfor i in range(3):", "%%python"]
    invalid_code_samples: ClassVar[list[Any]] = ["%%python\nx = )", "Print x.\n!print(x)"]
    code_inspect_sample = "%%python\nprint"

    @classmethod
    def setUpClass(cls) -> None:
        cls._folder = tempfile.TemporaryDirectory()  # the kernel autosaves into its cwd
        cls.km, cls.kc = start_new_kernel(
            kernel_name=cls.kernel_name, cwd=cls._folder.name, startup_timeout=120
        )

    @classmethod
    def tearDownClass(cls) -> None:
        super().tearDownClass()
        cls._folder.cleanup()

    def test_error(self) -> None:
        """jupyter_kernel_test's check, less its "one output" rule: after the one error, the
        kernel says (one stderr note) that the failed turn left the model's context."""
        self.flush_channels()
        reply, outputs = self.execute_helper(self.code_generate_error)
        self.assertEqual(reply["content"]["status"], "error")
        self.assertEqual([m["msg_type"] for m in outputs], ["error", "stream"])
        self.assertEqual(outputs[0]["content"]["ename"], "ValueError")
        self.assertIn("left out of the model's context", outputs[1]["content"]["text"])


def test_the_executor_answers_completions_between_runs_only(tmp_path: Path) -> None:
    """The kernel's completion and inspection requests go through the session's Executor, on
    its own client: answered between cells, None at once while a cell runs, and a run's reply
    is never taken by a request (nor a request's by a run)."""
    import threading
    import time

    from codegen_repl.core.executor import Executor, ExecutorConfig

    with Executor(ExecutorConfig(cwd=tmp_path, inline_matplotlib=False)) as executor:
        ask = {"code": "import itertoo", "cursor_pos": 14}
        reply = executor.request("complete", ask, timeout=60)
        assert reply is not None and "itertools" in reply["matches"]
        printed = threading.Event()
        code = "import time; print('started', flush=True); time.sleep(3)"
        running = threading.Thread(target=executor.run, args=(code, None, lambda _: printed.set()))
        running.start()
        assert printed.wait(60)  # the cell runs now
        started = time.monotonic()
        assert executor.request("is_complete", {"code": "x = ("}, timeout=60) is None
        assert time.monotonic() - started < 0.5
        running.join()
        assert executor.run("6 * 7").outputs[0]["data"]["text/plain"] == "42"
        inspected = executor.request("inspect", {"code": "len", "cursor_pos": 3}, timeout=60)
        assert inspected is not None and inspected["found"] is True
