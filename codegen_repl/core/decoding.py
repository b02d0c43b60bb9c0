"""The Decoder protocol: the one interface every front end uses to get code from a model.

Nothing here imports JAX: a REPL talking to a decoder server never pays for it. `open_decoder`
imports the decoder it was asked for (`codegen_repl.decoders.local` or `.remote`) only then.

`BackgroundDecoder` is a decoder still loading in a background thread: the front ends (REPL,
kernel, magics, MTPB replay) show their prompt at once and a step that needs the model waits
for it, telling a status callback ("loading the model …"). A decoder that can `prepare(prompt,
sample)` (the local one: prefill and compile ahead) is told what the session will ask next
(`prepare_decoder`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from codegen_repl.core.truncation import Cutter
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.paths import default_cache_dir

if TYPE_CHECKING:
    from codegen_repl.model.tokenizer import CodeGenTokenizer


class Decoder(Protocol):
    """What a front end needs from a model, local or remote."""

    @property
    def max_context(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def describe(self) -> str:
        """One line for a banner: what runs the model, where, in what dtype (a server's
        decoder asks the server, so an unreachable one fails here, before anything is shown)."""
        ...

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        """Stream the text of the first sample, ended by the request's stop rules."""
        ...

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        """All `sample.n` completions, each ended by the stop rules."""
        ...


def open_decoder(
    model: str | Path,
    *,
    server: str | None = None,
    api_key: str | None = None,
    dtype: str | None = None,
    int8: bool = False,
    context_window: int | None = None,
    background: str | None = None,
) -> Decoder:
    """The decoder a front end asked for: a decoder server's when `server` is a URL (then
    `model` names the served model to ask for, and `context_window` is its window in tokens
    where the server does not report it), else `model` loaded in this process: at once, or,
    when `background` is given (the hint a failed load ends with), as a BackgroundDecoder."""
    if server:
        from codegen_repl.decoders.remote import RemoteDecoder

        name = str(model) if model else None
        return RemoteDecoder(server, api_key=api_key, model=name, context_window=context_window)

    def load() -> Decoder:
        from codegen_repl.decoders.local import LocalDecoder  # imports JAX: only when asked for

        return LocalDecoder.load(
            model, dtype=dtype, int8=int8, compilation_cache=default_cache_dir() / "jax",
            early=EARLY.get(),
        )  # fmt: skip

    def check() -> object:
        from codegen_repl.model.files import resolve_checkpoint

        return resolve_checkpoint(model)  # a bad path or an uncached hub id fails here

    if background is None:
        return load()
    return BackgroundDecoder(load, str(model), background, check)


LOAD_EXIT_WAIT_S = 60.0
# Set at exit: no background decoder work starts any more (decoders/local.py's Ahead checks
# it). Here, not beside that work, so that it is set before a loading model is waited for,
# even when the load thread imports the local decoder (and registers its own exit handler)
# after the main thread has exited: a handler registered while atexit runs is never called,
# and a thread that is inside XLA when Python finalizes aborts the process.
EXITING = threading.Event()
_EXIT_HOOKS: list[Callable[[], None]] = []  # what stops background work at exit (at_exit)


def at_exit(hook: Callable[[], None]) -> None:
    """Call `hook` at exit, once EXITING is set and before a loading model is waited for
    (a decoder stops its background thread there)."""
    _EXIT_HOOKS.append(hook)


@atexit.register
def _exiting() -> None:
    EXITING.set()
    for hook in list(_EXIT_HOOKS):
        hook()


Status = Callable[[str], None]  # told when a call waits: "loading the model codegen-350M …"


Prompt = str | Callable[[], str]  # a prompt, or how to build it (once the decoder can count)
# In a BackgroundDecoder's load thread: what a load calls with its decoder before the weights
# are read (the local one can compile then, not count or prefill), so that the programs the
# session asked to prepare for compile while the weights load. open_decoder's local load
# passes it on; a load that does not (a server's decoder) loses nothing.
EARLY: contextvars.ContextVar[Callable[[Decoder], None] | None] = contextvars.ContextVar(
    "EARLY", default=None
)


def prepare_decoder(decoder: Decoder, prompt: Prompt, sample: SampleParams) -> None:
    """Tell `decoder` that the next request will be `prompt` plus a step, with `sample`'s n and
    mode, so it can get ready in the background; decoders without `prepare` ignore it."""
    prepare = getattr(decoder, "prepare", None)
    if prepare is not None:
        prepare(prompt, sample)


class BackgroundDecoder:
    """A Decoder that loads in a daemon thread: `loaded` says whether it is ready, `wait`
    blocks until it is (telling `status` first); every Decoder call waits the same way, telling
    `on_status`. A failed load raises, at each use, a CodeGenError that ends with `hint` (what to
    do, e.g. "load another model with %model NAME").

    A load that calls `EARLY.get()` (set in its thread) with its decoder before the weights are
    read (open_decoder's local one does) gets the samples asked to prepare for (`prepare`) at
    once, for an empty prompt: the decoder compiles the first request's programs while its
    weights load. The prompts themselves are passed on once it has loaded."""

    def __init__(
        self,
        load: Callable[[], Decoder],
        name: str,
        hint: str = "",
        check: Callable[[], object] | None = None,
    ) -> None:
        self.name, self.hint = name, hint
        self._status: Status | None = None
        self._check = check  # quick, before the load: is the model there at all?
        self._checked: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._future: concurrent.futures.Future[Decoder] = concurrent.futures.Future()
        self._prepared: tuple[Prompt, SampleParams] | None = None  # asked before the load ended
        self._lock = threading.Lock()
        self._decoder: Decoder | None = None  # set in the load thread, before _future
        self._early: Decoder | None = None  # the decoder while its weights load (see _shaped)
        self._thread = threading.Thread(
            target=self._load, args=(load,), name="model-load", daemon=True
        )
        self._thread.start()
        # A daemon thread inside XLA when Python finalizes aborts the process: at exit, stop
        # the background work (its compiles while the weights load too: EXITING), then wait for
        # the load (at most LOAD_EXIT_WAIT_S; a download is Python code, safe to abandon).
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        _exiting()
        self._thread.join(LOAD_EXIT_WAIT_S)

    def _shaped(self, decoder: Decoder) -> None:
        """`early`: the decoder, its weights not read yet; told the sample asked for so far."""
        with self._lock:  # (prepare passes a later sample on under it)
            self._early = decoder
            if self._prepared is not None:
                with contextlib.suppress(Exception):  # only work ahead lost
                    prepare_decoder(decoder, "", self._prepared[1])

    def _load(self, load: Callable[[], Decoder]) -> None:
        self._future.set_running_or_notify_cancel()
        try:
            if self._check is not None:
                self._check()
            self._checked.set_result(None)
        except BaseException as error:
            self._checked.set_exception(error)
            self._future.set_exception(error)
            return
        try:
            EARLY.set(self._shaped)  # (this thread's own context)
            decoder = load()
        except BaseException as error:  # reported at each use, see get()
            self._future.set_exception(error)
            return
        finally:
            self._early = None
        self._decoder = decoder  # for the prompts built below (they count tokens)
        while True:  # pass on what was asked meanwhile, then open the doors
            with self._lock:
                if hasattr(decoder, "on_status"):
                    decoder.on_status = self._status  # type: ignore[attr-defined]
                prepared, self._prepared = self._prepared, None
                if prepared is None:
                    self._future.set_result(decoder)
                    return
            with contextlib.suppress(Exception):  # only work ahead lost: the step does it
                prepare_decoder(decoder, *prepared)

    def checked(self) -> None:
        """Block until the quick check before the load has passed; its error is raised as it
        is (a front end that starts reports it as a bad option)."""
        self._checked.result()

    @property
    def loaded(self) -> bool:
        """Whether the load has ended (well or not: `get` then returns or raises at once)."""
        return self._future.done()

    def wait(self, status: Status | None = None, timeout: float | None = None) -> Decoder:
        """The loaded decoder; while it loads, `status` is told once and the call blocks (at
        most `timeout` seconds: TimeoutError). Raises the load's error as `get` does."""
        if self._decoder is not None and threading.current_thread() is self._thread:
            return self._decoder  # a prompt built for prepare, in the load thread
        if not self._future.done() and status is not None:
            status(f"loading the model {self.name} …")
        try:
            self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the model {self.name} is still loading") from None
        except Exception:  # not BaseException: a Ctrl-C while it waits must stop the wait
            pass  # get() reports it
        return self.get()

    def get(self) -> Decoder:
        """The decoder, once loaded (blocks until then); a failed load raises a CodeGenError."""
        from codegen_repl.errors import CheckpointError, CodeGenError

        hint = f" ({self.hint})" if self.hint else ""
        try:
            return self._future.result()
        except CodeGenError as error:
            raise type(error)(f"{error}{hint}") from error
        except Exception as error:
            raise CheckpointError(
                f"could not load the model {self.name}: {type(error).__name__}: {error}{hint}"
            ) from error

    @property
    def on_status(self) -> Status | None:
        """Where waits are told, here and (once loaded) in the decoder's own waits (a local
        decoder waiting for its background prefill)."""
        return self._status

    @on_status.setter
    def on_status(self, status: Status | None) -> None:
        with self._lock:
            self._status = status
            if self._future.done() and self._future.exception() is None:
                decoder = self._future.result()
                if hasattr(decoder, "on_status"):
                    decoder.on_status = status  # type: ignore[attr-defined]

    def prepare(self, prompt: Prompt, sample: SampleParams) -> None:
        """Pass on to the decoder now, or once it has loaded (the latest ask wins; a callable
        prompt is built then)."""
        with self._lock:
            if not self._future.done():
                before, self._prepared = self._prepared, (prompt, sample)
                if self._early is not None and (before is None or before[1] != sample):
                    with contextlib.suppress(Exception):  # a new sample: compile for it
                        prepare_decoder(self._early, "", sample)
                return
        if self._future.exception() is None:
            prepare_decoder(self._future.result(), prompt, sample)

    @property
    def max_context(self) -> int:
        return self.wait(self.on_status).max_context

    def count_tokens(self, text: str) -> int:
        return self.wait(self.on_status).count_tokens(text)

    def describe(self) -> str:
        return self.wait(self.on_status).describe()

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        return self.wait(self.on_status).generate(prompt, sample)

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        return self.wait(self.on_status).complete(prompt, sample)


@dataclasses.dataclass
class SampleText:
    """One sample's text as it streams in, whether EOS or a stop rule has ended it, and how much
    of it has been handed on: the one settled-text stream of the local decoder, the server's
    engine (tokens in) and the remote decoder (text in, `tokenizer` None)."""

    tokenizer: CodeGenTokenizer | None
    cutter: Cutter
    ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    done: bool = False
    sent: int = 0  # characters of `text` already handed on by `take`

    def add(self, tokens: Sequence[int]) -> None:
        """Append token ids (decoded with `tokenizer`); EOS ends the sample."""
        if self.done:
            return
        assert self.tokenizer is not None, "a text-only SampleText takes add_text"
        for token in tokens:
            if token == self.tokenizer.eos_token_id:
                self.done = True
                break
            self.ids.append(token)
        self._settle(self.tokenizer.decode(self.ids))

    def add_text(self, piece: str) -> None:
        """Append text as a server streamed it."""
        if not self.done:
            self._settle(self.text + piece)

    def _settle(self, text: str) -> None:
        """Keep `text`, cut where a stop rule has fired (which ends the sample; EOS may have
        ended it already)."""
        cut = self.cutter.final(text)
        self.text = text if cut is None else text[:cut]
        self.done = self.done or cut is not None

    def shown(self) -> int:
        """How much of the text can be shown now: it is settled and holds whole characters."""
        if self.done:
            return len(self.text)
        settled = self.cutter.visible(self.text)
        while settled and self.text[settled - 1] == "\ufffd":  # wait for a character's tail
            settled -= 1
        return settled

    def take(self, finished: bool = False) -> str:
        """The text settled since the last take; once the sample is done (or `finished`, e.g.
        at max_new_tokens), all that is left of its final, cut text."""
        final = finished or self.done
        text = self.result() if final else self.text
        end = len(text) if final else self.shown()
        piece = text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def result(self) -> str:
        """The whole sample, cut by the stop rules."""
        return self.cutter.apply(self.text)
