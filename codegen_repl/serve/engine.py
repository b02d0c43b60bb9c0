"""Continuous batching for the decoder server: requests share the device through slots.

The `Engine` owns the device on one background thread. Each sample of a running request holds a
slot: a row of one batched `DecodeState` (model/sampling.py, the decode path the local decoder
uses too), with its own position, step, key and sampling settings. Between decode chunks the
thread admits waiting requests into free slots (prefilling only what the slot's cache does not
already hold: prefix reuse per slot), drops cancelled ones, and streams each sample's settled
text through the request's callback. The asyncio side only queues requests and forwards events;
it never touches JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.core.decoding import SampleText
from codegen_repl.core.truncation import Cutter
from codegen_repl.errors import ConfigError
from codegen_repl.model.checkpoint import Params
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import KVCache, cache_length, init_cache
from codegen_repl.model.sample_params import SampleMode, SampleParams
from codegen_repl.model.sampling import (
    DecodeState,
    Knobs,
    LogitsFn,
    bucket,
    common_prefix,
    decode_chunk,
    decode_steps,
    default_chunk_size,
    empty_state,
    knobs,
    prefill_prompt,
    resize_state,
    sample_key,
    union_mode,
)
from codegen_repl.model.tokenizer import CodeGenTokenizer

FinishReason = Literal["stop", "length", "cancelled"]
# Prefill widths start at 16: new turns are short, and one shape for all of them saves
# compilations (a 16-token prefill costs about what a 1-token one does: weights dominate).
MIN_PREFILL = 16


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Args:
    max_batch: slots decoded together (a request with n samples takes n slots).
    max_concurrency: requests running or waiting; one more is refused (QueueFull).
    chunk_size: tokens per decode chunk (default 4 on CPU, 16 on GPU/TPU).
    """

    max_batch: int = 16
    max_concurrency: int = 64
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")


class QueueFull(Exception):
    """As many requests as max_concurrency are running or waiting."""


@dataclasses.dataclass(frozen=True)
class Delta:
    index: int  # the sample
    text: str


@dataclasses.dataclass(frozen=True)
class Finish:
    index: int
    reason: FinishReason
    tokens: int  # completion tokens of this sample


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finish | Failed


@dataclasses.dataclass
class Request:
    """One completion request: n samples of one prompt. `emit` is called on the engine thread;
    `cancel()` may be called from any thread (e.g. when the client disconnects)."""

    prompt_ids: list[int]
    sample: SampleParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class _Stream:
    """One sample of a request: its text, how much of it was sent, and why it ended."""

    request: Request
    index: int
    sample: SampleText
    reason: FinishReason | None = None

    @property
    def ids(self) -> list[int]:
        return self.sample.ids

    def add(self, tokens: list[int]) -> None:
        self.sample.add(tokens)
        if self.sample.done:
            self.reason = "stop"
        elif len(self.ids) >= self.request.sample.max_new_tokens:
            self.reason = "length"

    def flush(self) -> None:
        """Emit the text that is settled (all of it once the row is done)."""
        if piece := self.sample.take(finished=self.reason is not None):
            self.request.emit(Delta(self.index, piece))


@dataclasses.dataclass
class _Slot:
    """A row of the batched cache: the tokens whose keys/values it holds, and the sample
    decoding in it."""

    tokens: list[int] = dataclasses.field(default_factory=list)
    stream: _Stream | None = None


class Engine:
    """Decodes requests in slots on a background thread that owns the device."""

    def __init__(
        self,
        config: CodeGenConfig,
        params: Params,
        tokenizer: CodeGenTokenizer,
        logits_fn: LogitsFn,
        engine: EngineConfig | None = None,
        dtype: jnp.dtype = jnp.float32,
        cache_sharding: jax.sharding.Sharding | None = None,
    ) -> None:
        """cache_sharding: where the KV cache [slots, heads, length, head_dim] lives when the
        params are split over several devices (heads over the tensor axis)."""
        self.config, self.params, self.tokenizer, self.logits_fn = (
            config, params, tokenizer, logits_fn,
        )  # fmt: skip
        self.settings = engine or EngineConfig()
        self.chunk_size = self.settings.chunk_size or default_chunk_size()
        self.dtype, self.cache_sharding = dtype, cache_sharding
        self.slots = [_Slot() for _ in range(self.settings.max_batch)]
        self.state: DecodeState | None = None  # rows = a bucket of the slots in use
        self.waiting: collections.deque[Request] = collections.deque()
        self.stats = {
            "served": 0, "cancelled": 0, "failed": 0, "reused_tokens": 0, "prefilled_tokens": 0,
        }  # fmt: skip
        self._knobs: tuple[Knobs, SampleMode] | None = None  # of the rows as they are
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="codegen-engine", daemon=True)
        self._thread.start()

    @property
    def max_context(self) -> int:
        return self.config.max_positions

    # ----------------------------------------------------------------- any thread

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when max_concurrency requests are in flight and
        ConfigError when it can never run (the caller validates sizes first)."""
        if request.sample.n > self.settings.max_batch:
            raise ConfigError(f"n must be <= {self.settings.max_batch} (the server's max batch)")
        if len(request.prompt_ids) + request.sample.max_new_tokens > self.max_context:
            raise ConfigError("the prompt and max_tokens do not fit the model's context")
        with self._wake:
            if self.in_flight() >= self.settings.max_concurrency:
                raise QueueFull()
            self.waiting.append(request)
            self._wake.notify()

    def in_flight(self) -> int:
        running = {id(s.stream.request) for s in self.slots if s.stream is not None}
        return len(running) + len(self.waiting)

    def busy_slots(self) -> int:
        return sum(slot.stream is not None for slot in self.slots)

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ----------------------------------------------------------------- engine thread

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.busy_slots():
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.busy_slots():
                    self._decode()
            except Exception as error:  # a bug or a device error: fail the running requests
                self._fail_all(f"the decoder failed: {type(error).__name__}: {error}")
        self._fail_all("the server is shutting down")

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.stream is not None and slot.stream.request.cancelled.is_set():
                self._finish_request(slot.stream.request, "cancelled")
        with self._wake:
            dropped = [r for r in self.waiting if r.cancelled.is_set()]
            self.waiting = collections.deque(r for r in self.waiting if not r.cancelled.is_set())
        for request in dropped:
            self.stats["cancelled"] += 1
            for index in range(request.sample.n):
                request.emit(Finish(index, "cancelled", 0))

    def _admit(self) -> None:
        """Move waiting requests into free slots, in order, while they fit. The state is
        reshaped once for all of them (a burst of requests compiles one shape, not each)."""
        admitted: list[tuple[Request, list[int]]] = []
        taken: set[int] = set()
        with self._wake:
            while self.waiting:
                rows = self._free_slots(self.waiting[0], taken)
                if rows is None:
                    break
                taken.update(rows)
                admitted.append((self.waiting.popleft(), rows))
        if not admitted:
            return
        need = max(len(r.prompt_ids) + self._steps(r.sample) for r, _ in admitted)
        self._shrink(taken, need)
        self._reshape(max(taken) + 1, need)
        for k, (request, rows) in enumerate(admitted):
            try:
                self._start(request, rows)
            except Exception as error:
                for failed, _ in admitted[k:]:
                    self.stats["failed"] += 1
                    failed.emit(Failed(f"the decoder failed: {type(error).__name__}: {error}"))
                raise

    def _free_slots(self, request: Request, taken: set[int]) -> list[int] | None:
        """n free slots: the one whose cache shares most of the prompt first, then the lowest
        (so the batch stays narrow); None when too few are free."""
        free = [i for i, slot in enumerate(self.slots) if slot.stream is None and i not in taken]
        if len(free) < request.sample.n:
            return None
        best = max(
            free, key=lambda i: (common_prefix(self.slots[i].tokens, request.prompt_ids), -i)
        )
        return [best, *[i for i in free if i != best][: request.sample.n - 1]]

    def _steps(self, sample: SampleParams, done: int = 0) -> int:
        """Decode steps a request runs after `done` tokens: whole chunks."""
        return decode_steps(sample.max_new_tokens - done, self.chunk_size)

    def _start(self, request: Request, rows: list[int]) -> None:
        """Prefill the prompt into rows[0] (after what it holds) and copy it to the others."""
        ids, sample = request.prompt_ids, request.sample
        self._reshape(max(rows) + 1, len(ids) + self._steps(sample))
        assert self.state is not None
        reuse = common_prefix(self.slots[rows[0]].tokens, ids)
        self.stats["reused_tokens"] += reuse
        self.stats["prefilled_tokens"] += len(ids) - reuse  # what this prompt computed anew
        self.state = prefill_prompt(
            self.logits_fn, self.params, self.state, ids, reuse, rows, smallest=MIN_PREFILL
        )
        cutter = Cutter(codegen_rules=sample.codegen_rules, stop=sample.stop)
        for index, row in enumerate(rows):
            sample_text = SampleText(self.tokenizer, cutter)
            self.slots[row] = _Slot(list(ids), _Stream(request, index, sample_text))
        self._knobs = None

    def _decode(self) -> None:
        """One chunk for every busy slot; stream the text; finish the samples that are done."""
        self._park_free_slots()
        assert self.state is not None
        rows = self.state.logits.shape[0]
        if self._knobs is None:
            samples = [self._slot_sample(i) for i in range(rows)]
            self._knobs = knobs(samples), union_mode([sample for sample, _ in samples])
        traced, mode = self._knobs
        state, tokens = decode_chunk(
            self.logits_fn, self.params, self.state, traced, self.chunk_size, mode
        )
        self.state = state
        chunk = np.asarray(tokens)  # [rows, chunk_size]
        for i in range(rows):
            slot = self.slots[i]
            if slot.stream is None:
                continue
            slot.tokens.extend(chunk[i].tolist())
            if slot.stream.reason is not None:  # this sample ended; the request's others go on
                continue
            need = slot.stream.request.sample.max_new_tokens - len(slot.stream.ids)
            slot.stream.add(chunk[i, :need].tolist())
            slot.stream.flush()
        running = {id(s.stream.request): s.stream.request for s in self.slots if s.stream}
        for request in running.values():
            if all(s.stream.reason for s in self.slots if s.stream and s.stream.request is request):
                self._finish_request(request, None)

    def _park_free_slots(self) -> None:
        """Point each free slot where its chunk writes nothing it holds: after its tokens,
        which are cut so that the chunk fits (the write must not be clamped onto them)."""
        assert self.state is not None
        length = cache_length(self.state.cache)
        position = np.asarray(self.state.position).copy()
        for i in range(position.shape[0]):
            slot = self.slots[i]
            if slot.stream is None:
                del slot.tokens[length - self.chunk_size :]
                position[i] = len(slot.tokens)
        self.state = self.state._replace(position=jnp.asarray(position))

    def _slot_sample(self, i: int) -> tuple[SampleParams, jax.Array]:
        """The settings and key of slot i (a free slot decodes greedily; its tokens are unused),
        the same as the local decoder gives that sample (see sampling.sample_key)."""
        stream = self.slots[i].stream
        if stream is None:
            return _IDLE, jax.random.key(0)
        return stream.request.sample, sample_key(stream.request.sample, stream.index)

    def _finish_request(self, request: Request, reason: FinishReason | None) -> None:
        """Free the request's slots; tell the client how each sample ended (a sample still
        running ends with `reason`)."""
        for slot in self.slots:
            stream = slot.stream
            if stream is None or stream.request is not request:
                continue
            slot.stream = None
            ended = stream.reason or reason or "cancelled"
            request.emit(Finish(stream.index, ended, len(stream.ids)))
        self.stats["cancelled" if reason == "cancelled" else "served"] += 1
        self._knobs = None

    def _fail_all(self, message: str) -> None:
        requests = {id(s.stream.request): s.stream.request for s in self.slots if s.stream}
        with self._wake:
            requests |= {id(r): r for r in self.waiting}
            self.waiting.clear()
        for slot in self.slots:
            slot.stream, slot.tokens = None, []
        self.state = None  # a failed device call may have consumed the donated buffers
        for request in requests.values():
            self.stats["failed"] += 1
            request.emit(Failed(message))

    # ----------------------------------------------------------------- cache shape

    def _reshape(self, min_rows: int, min_length: int) -> None:
        """Grow the state to at least min_rows slots and a cache of min_length positions
        (buckets, so few shapes are compiled)."""
        rows = min(bucket(min_rows, smallest=1), self.settings.max_batch)
        length = bucket(min_length)
        if self.state is None:
            cache = self._placed(init_cache(self.config, rows, length, self.dtype))
            self.state = empty_state(cache, self.config.vocab_size)
            return
        have_rows, have_length = self.state.logits.shape[0], cache_length(self.state.cache)
        if rows > have_rows or length > have_length:
            state = resize_state(self.state, max(rows, have_rows), max(length, have_length))
            self.state = state._replace(cache=self._placed(state.cache))

    def _shrink(self, taken: set[int], need: int) -> None:
        """Narrow the batch to the slots in use or `taken` (being admitted, needing `need`
        positions), and the cache to what they need, so a burst of long requests does not slow
        the ones after it. Done at admission, not when a request finishes: an idle slot keeps
        its tokens until then, and a conversation's next turn, which lands on that slot, reuses
        them. Only by half or more at a time, and not while requests wait: every new shape is
        compiled (once)."""
        if self.state is None or self.waiting:
            return
        used = [i for i, slot in enumerate(self.slots) if slot.stream is not None]
        rows = min(bucket(max([*used, *taken]) + 1, smallest=1), self.settings.max_batch)
        needs = [need, *(len(self.slots[i].tokens) + self._left(i) for i in used)]
        length = bucket(max(needs))
        have_rows, have_length = self.state.logits.shape[0], cache_length(self.state.cache)
        rows = rows if rows * 2 <= have_rows else have_rows
        length = length if length * 2 <= have_length else have_length
        if (rows, length) != (have_rows, have_length):
            state = resize_state(self.state, rows, length)
            self.state = state._replace(cache=self._placed(state.cache))
            for i, slot in enumerate(self.slots):
                if i >= rows:
                    slot.tokens = []
                del slot.tokens[length:]

    def _placed(self, cache: KVCache) -> KVCache:
        return cache if self.cache_sharding is None else jax.device_put(cache, self.cache_sharding)

    def _left(self, i: int) -> int:
        stream = self.slots[i].stream
        assert stream is not None
        return self._steps(stream.request.sample, len(stream.ids))


_IDLE = SampleParams(max_new_tokens=1)
