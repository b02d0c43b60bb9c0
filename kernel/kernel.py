"""The `codegen` Jupyter kernel: each cell is a natural-language step.

The kernel is the protocol half (ipykernel's `Kernel`, as in jupyter's echo_kernel): cells go to
a `KernelRunner` in one worker thread, so the event loop stays free for interrupts and
shutdown while a model writes or the child kernel runs (shell requests such as completion wait
for the cell: ipykernel handles them one at a time). What the runner reports is
sent on IOPub as it happens: the code while it streams (one display, updated in place), then the
child kernel's outputs. Options come from the kernelspec's argv (`--CodeGenKernel.model=...`,
written by `codegen-repl install-kernel`) or any traitlets config file.

The session autosaves to `.codegen/<notebook>.ipynb` beside the notebook (a hidden folder, out of
the file browser's way); a restarted kernel keeps the previous file under a numbered name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import os
import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ipykernel.kernelbase import Kernel
from traitlets import Bool, Float, Unicode

from codegen_repl import __version__
from codegen_repl.core.executor import ShellRequest
from codegen_repl.core.notebook import new_session_path
from codegen_repl.core.session import SessionSettings
from codegen_repl.errors import CodeGenError, ConfigError
from codegen_repl.kernel.cells import Cell, CodeView, magic_completions, parse_cell
from codegen_repl.kernel.display import CODE_METADATA, PLACEHOLDER, code_bundle
from codegen_repl.kernel.options import ModelOptions
from codegen_repl.kernel.runner import CellOutcome, KernelRunner, RunnerOptions

AUTOSAVE_FOLDER = ".codegen"  # beside the notebook; hidden in Jupyter's file browser
CHILD_START_WAIT_S = 60.0  # a completion request waits this long for the child to be up
REQUEST_TIMEOUT_S = 15.0  # IPython's first completion imports jedi: seconds on a busy CPU
T = TypeVar("T")


class CodeGenKernel(Kernel, ModelOptions):
    """Steps in, code and its outputs out; the code runs in a child IPython kernel."""

    implementation = "codegen-repl"
    implementation_version = __version__
    banner = "codegen: write a natural-language step per cell; %help lists the magics"
    # Cells are edited as IPython: `%%python` cells (and `!` lines) get Python highlighting, the
    # magics IPython's; a step is plain words, which that mode leaves mostly plain.
    language_info: dict[str, object] = {  # noqa: RUF012 (declared so by ipykernel's Kernel)
        "name": "codegen",
        "version": __version__,
        "mimetype": "text/x-ipython",
        "file_extension": ".txt",  # "export as script" writes the steps: words, not Python
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
    }

    # model, server, api_key and the sampling options: see ModelOptions
    run = Unicode(None, allow_none=True, help="auto: run each step; never: show it only.").tag(
        config=True
    )
    timeout = Float(
        None, allow_none=True, help="Seconds a turn may run (0: no limit; default 60)."
    ).tag(config=True)
    session_path = Unicode(
        "", help=f"Autosave notebook; default: {AUTOSAVE_FOLDER}/<notebook>.ipynb beside it."
    ).tag(config=True)
    autosave = Bool(True, help="Save the session as a notebook after every turn.").tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="codegen")
        self._requests = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.runner: KernelRunner | None = None
        self._startup_error = ""
        try:
            self.runner = KernelRunner(self.runner_options())
        except CodeGenError as error:
            self._startup_error = f"the kernel's options are invalid: {error}"
        else:
            # The child kernel starts while the user types the first cell.
            self._prestarted = self._worker.submit(self._prestart)
        self._cells_running = 0
        # The kernel app ignores SIGINT; during a cell it must stop the model or the child.
        # Installed here because only the main thread may set signal handlers.
        signal.signal(signal.SIGINT, self._on_sigint)

    def runner_options(self) -> RunnerOptions:
        """The kernel's options: its config (kernelspec argv) over config.toml over the
        defaults. No one can answer "run it?" here, so run=ask (config.toml's) means auto."""
        resolved = self.settings(can_ask=False)
        settings = SessionSettings(resolved.prefix, resolved.sample, resolved.timeout)
        cwd = Path.cwd()
        return RunnerOptions(
            model=resolved.model, cwd=cwd, server=resolved.server, api_key=resolved.api_key,
            dtype=resolved.dtype, session_path=self._session_file(cwd), settings=settings,
            run_mode=resolved.run, context_window=resolved.context_window,
            kernel_id=self._kernel_id(),
        )  # fmt: skip

    def _kernel_id(self) -> str:
        """The connection file's name, `kernel-<id>` (Jupyter Server's kernel id): a restart
        keeps it, while the notebook's name (`JPY_SESSION_NAME`) is read once, at the start.
        A running kernel is not told of a rename (Jupyter Server changes the environment only
        for the next start: `update_env`), so this is how the next one finds the last file."""
        connection_file = getattr(self.parent, "connection_file", "") or ""
        return Path(connection_file).stem if connection_file else ""

    def _session_file(self, cwd: Path) -> Path | None:
        if not self.autosave:
            return None
        if self.session_path:
            return cwd / Path(self.session_path).expanduser()
        folder = cwd / AUTOSAVE_FOLDER
        notebook = os.environ.get("JPY_SESSION_NAME")  # set by jupyter_server for its kernels
        if notebook:
            return folder / (Path(notebook).stem + ".ipynb")
        return new_session_path(folder)

    def _prestart(self) -> None:
        assert self.runner is not None
        with contextlib.suppress(CodeGenError):  # the first cell tries again and says why
            self.runner.start()

    # ------------------------------------------------------------------------- execute

    async def do_execute(  # type: ignore[override]
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        if silent:  # frontends' background requests (Python for Python kernels): not steps
            return CellOutcome().reply(self.execution_count)
        frontend = IOPubFrontend(self, self.get_parent("shell"))
        if self.runner is None:
            frontend.error("ConfigError", self._startup_error, [self._startup_error])
            return CellOutcome("error", "ConfigError", self._startup_error).reply(
                self.execution_count
            )
        # JupyterLab's cellId is a string (a UUID); anything else counts as no cell id
        cell = cell_id if isinstance(cell_id, str) else ""
        self._cells_running += 1
        self.runner.expect_cell()  # it may wait behind the child kernel's start: stoppable
        try:
            outcome = await self._in_thread(
                self._worker, self.runner.run_cell, code, frontend, cell
            )
        finally:
            self._cells_running -= 1
        return outcome.reply(self.execution_count)

    @property
    def kernel_info(self) -> dict[str, Any]:
        """The base class's, without the debugger and subshells it would advertise: cells here
        are steps, not code to step through, and they run one at a time."""
        return {**super().kernel_info, "supported_features": []}

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.runner is not None:  # jupyter_client calls are not for a signal handler
            # The cell is named now: a thread that starts late must not hit the next cell.
            cell = self.runner.cell_number
            threading.Thread(
                target=self.runner.interrupt, args=(cell,), name="interrupt", daemon=True
            ).start()

    def pre_handler_hook(self) -> None:
        """Keep our SIGINT handler (the base class swaps in KeyboardInterrupt, which would
        land in the event loop, not in the worker thread that does the work)."""

    def post_handler_hook(self) -> None:
        pass

    async def _in_thread(
        self, pool: concurrent.futures.Executor, function: Callable[..., T], *args: Any
    ) -> T:
        """Run in `pool`, with this request's context (its parent header) carried along."""
        context = contextvars.copy_context()
        call = functools.partial(context.run, function, *args)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    # ------------------------------------------------------------------------- code intelligence

    async def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        cursor = len(code) if cursor_pos is None else cursor_pos
        answer = {"matches": [], "cursor_start": cursor, "cursor_end": cursor, "metadata": {},
                  "status": "ok"}  # fmt: skip
        cell = _parsed(code)
        if cell is None or cell.kind != "code" or cell.view is None:
            matches, start = magic_completions(code, cursor)
            return answer | {"matches": matches, "cursor_start": start}
        view = cell.view
        reply = await self._forward("complete", code=view.code, cursor_pos=view.to_code(cursor))
        if reply is None or reply.get("status") != "ok":
            return answer
        return _mapped_completion(reply, view)

    async def do_inspect(  # type: ignore[override]
        self, code: str, cursor_pos: int | None, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        cursor = len(code) if cursor_pos is None else cursor_pos
        cell = _parsed(code)
        if cell is not None and cell.kind == "code" and cell.view is not None:
            view = cell.view
            position = view.to_code(cursor)
            reply = await self._forward(
                "inspect", code=view.code, cursor_pos=position, detail_level=detail_level
            )
            if reply is not None:
                return reply
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        try:
            cell = parse_cell(code)
        except ConfigError:
            return {"status": "invalid"}
        if cell.kind != "code":
            return {"status": "complete"}
        if not cell.code.strip():
            return {"status": "incomplete", "indent": ""}  # `%%python` waits for its code
        reply = await self._forward("is_complete", code=cell.code)
        return reply if reply is not None else {"status": "unknown"}

    async def _forward(self, request: ShellRequest, **content: Any) -> dict[str, Any] | None:
        """The child's answer, asked through the session's Executor; None (at once) while a
        cell runs, since the child answers only between cells (ipykernel 7 sends such requests
        only after the cell: this guards a front end that uses a subshell), or when it does not
        run."""
        if self.runner is None or self._cells_running:
            return None
        with contextlib.suppress(TimeoutError):  # still starting: answer without it
            await asyncio.wait_for(asyncio.wrap_future(self._prestarted), CHILD_START_WAIT_S)
        executor = self.runner.executor
        return await self._in_thread(
            self._requests, executor.request, request, content, REQUEST_TIMEOUT_S
        )

    # ------------------------------------------------------------------------- shutdown

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        if self.runner is not None:
            self.runner.interrupt()
            await asyncio.get_running_loop().run_in_executor(None, self.runner.shutdown)
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._requests.shutdown(wait=False, cancel_futures=True)
        return {"status": "ok", "restart": restart}


class IOPubFrontend:
    """Sends a cell's results on IOPub, as replies to the cell's execute_request. Safe to call
    from the worker thread (ipykernel's IOPub socket hands messages to its own thread)."""

    def __init__(self, kernel: CodeGenKernel, parent: dict[str, Any]) -> None:
        self.kernel, self.parent = kernel, parent
        self._code_display: str | None = None

    def send(self, msg_type: str, content: dict[str, Any]) -> None:
        kernel = self.kernel
        if kernel.session is not None:
            topic = kernel._topic(msg_type)
            kernel.session.send(
                kernel.iopub_socket, msg_type, content, parent=self.parent, ident=topic
            )

    def stream(self, name: str, text: str) -> None:
        self.send("stream", {"name": name, "text": text})

    def output(self, output: dict[str, Any]) -> None:
        kind = output["output_type"]
        if kind == "stream":
            self.stream(output["name"], output["text"])
        elif kind == "error":
            self.error(output["ename"], output["evalue"], list(output["traceback"]))
        else:
            content = {"data": output["data"], "metadata": output.get("metadata", {})}
            if kind == "execute_result":
                content["execution_count"] = self.kernel.execution_count
            else:
                content["transient"] = {}
            self.send(kind, content)

    def show_code(self, code: str, final: bool) -> None:
        """One display per generation, updated in place; after the final code, the next
        generation (the next turn of `%mtpb`) gets a display of its own. The final code ends
        with a rule, which sets it apart from its outputs."""
        bundle = code_bundle(code, rule=final) if code or final else PLACEHOLDER
        content = {"data": bundle, "metadata": CODE_METADATA}
        if self._code_display is None:
            self._code_display = uuid.uuid4().hex
            self.send("display_data", content | {"transient": {"display_id": self._code_display}})
        else:
            transient = {"display_id": self._code_display}
            self.send("update_display_data", content | {"transient": transient})
        if final:
            self._code_display = None

    def display(self, bundle: dict[str, str]) -> None:
        self.send("display_data", {"data": bundle, "metadata": {}, "transient": {}})

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        self.send("error", {"ename": ename, "evalue": evalue, "traceback": traceback})


def _parsed(code: str) -> Cell | None:
    try:
        return parse_cell(code)
    except ConfigError:
        return None


def _mapped_completion(reply: dict[str, Any], view: CodeView) -> dict[str, Any]:
    """The child's completion reply with its positions moved from the code into the cell."""
    mapped = dict(reply)
    mapped["cursor_start"] = view.to_cell(int(reply["cursor_start"]))
    mapped["cursor_end"] = view.to_cell(int(reply["cursor_end"]))
    metadata = dict(reply.get("metadata") or {})
    typed = metadata.get("_jupyter_types_experimental")
    if isinstance(typed, list):
        metadata["_jupyter_types_experimental"] = [
            {**item, "start": view.to_cell(item["start"]), "end": view.to_cell(item["end"])}
            for item in typed
            if isinstance(item, dict) and "start" in item and "end" in item
        ]
    mapped["metadata"] = metadata
    return mapped


def main() -> None:
    """`python -m codegen_repl.kernel -f CONNECTION_FILE [--CodeGenKernel.model=M ...]`."""
    from ipykernel.kernelapp import IPKernelApp

    IPKernelApp.launch_instance(kernel_class=CodeGenKernel)
