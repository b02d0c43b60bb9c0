"""Decoders: the one interface every front end uses to get code from a model.

`LocalDecoder` runs CodeGen in this process with JAX. It keeps the KV cache of its last
context: when the next prompt starts with the same tokens (the next turn of a session), only the
new tokens are prefilled; after an undo or an edit it falls back to the longest common prefix.

`prepare(prompt, sample)` gets ready for the next request while the user types: in one
background thread it prefills `prompt` (the session so far, and the REPL's step as typed so
far) into the kept cache and compiles ahead of time (`jit(...).lower(...).compile()`) the
programs a request that adds a step to it will run: the cache resize, the prefills and the
decode chunk, for the cache length that request needs. Where the CPU attention kernel reads
only the cache positions in use (`whole_context_cache`), one row's cache is the whole context
and any text is prefilled in pieces of two widths (`_pieces`: TYPED_TOKENS, STEP_TOKENS), so a
session compiles four programs once and never again; else a step's text is prefilled at
STEP_TOKENS (or TYPED_TOKENS) width after cached tokens, at the cold widths without, for the
one or two `cache_bucket` lengths a request can need. The request then compiles nothing.
Jobs run in order of priority: the programs the next request runs, then the prefill of the
prompt prepared last, then the other programs; a newer prompt drops the queued work an older
one asked for and it does not need, and stops a running prefill at its next piece (the REPL
prepares as the step is typed). A request that comes while a job it needs still runs waits
for it (telling `on_status`); queued jobs it does not need are dropped.

The first request's programs compile while the weights load: `LocalDecoder.load(early=...)`
hands out the decoder over the params' shapes (`checkpoint.params_shapes`, from config.json)
before it reads a weight, and a `prepare` then compiles (a program lowered over
jax.ShapeDtypeStruct params is the one the loaded arrays run); prefills wait for the weights.
The REPL's BackgroundDecoder passes the session's sample on at once (core/decoding.py).

`load_for_decoding` loads a checkpoint ready to decode (quantized when asked, split over the
local devices when asked): the local decoder and the decoder server's engine both start from
it, and both decode through model/sampling.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import heapq
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.core.decoding import EXITING, SampleText, at_exit
from codegen_repl.core.truncation import Cutter
from codegen_repl.errors import ConfigError
from codegen_repl.model import cpu_attention, cpu_matmul
from codegen_repl.model.checkpoint import DTYPES, Params, load_model, params_shapes
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, DecodeAttention, quantize_int8, quantize_leaf
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import (
    DecodeState,
    LogitsFn,
    cache_bucket,
    common_prefix,
    decode_chunk,
    decode_steps,
    default_chunk_size,
    fresh_state,
    lower_decode,
    lower_prefill,
    model_logits_fn,
    padded_suffix,
    prefill_prompt,
    request_knobs,
    resize_state,
)
from codegen_repl.model.sharding import shard_for_decoding
from codegen_repl.model.tokenizer import CodeGenTokenizer


def enable_compilation_cache(path: Path) -> None:
    """JAX's persistent compilation cache, so a second launch does not recompile."""
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@dataclasses.dataclass(frozen=True)
class DecodingModel:
    """A checkpoint ready to decode: what the local decoder and the server's engine run."""

    config: CodeGenConfig
    params: Params  # int8 kernels and scales when int8; placed on the devices
    tokenizer: CodeGenTokenizer
    model: CodeGen
    cache_sharding: jax.sharding.Sharding | None = None  # of a KV cache, when params are split

    @classmethod
    def create(
        cls,
        config: CodeGenConfig,
        params: Params,
        tokenizer: CodeGenTokenizer,
        int8: bool = False,
        decode_attention: DecodeAttention = "auto",
    ) -> DecodingModel:
        """Wrap loaded params (of one dtype, the compute dtype); int8 quantizes them. bf16
        params on a CPU with the C++ matmul compute in fp32: the kernel reads the bf16 weights,
        and XLA's CPU backend runs fp32 faster than bf16 everywhere else."""
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        compute = jnp.dtype(jnp.float32) if cpu_matmul.takes(dtype) else dtype
        model = CodeGen(config, int8, compute, dtype, decode_attention)
        return cls(config, params, tokenizer, model).with_params(params)

    def with_params(self, params: Params) -> DecodingModel:
        """This model over `params` (of its dtype: quantized here when it is int8). Leaves that
        are jax.ShapeDtypeStruct (`checkpoint.params_shapes`) make a model that can only
        compile: its programs are the ones the loaded params run."""
        if self.model.int8:
            abstract = isinstance(jax.tree_util.tree_leaves(params)[0], jax.ShapeDtypeStruct)
            params = jax.eval_shape(quantize_int8, params) if abstract else quantize_int8(params)
        return dataclasses.replace(self, params=params)

    @property
    def dtype(self) -> jnp.dtype:
        return self.model.dtype

    @property
    def logits_fn(self) -> LogitsFn:
        return model_logits_fn(self.model)


def load_for_decoding(
    model: str | Path,
    dtype: str | None = None,
    int8: bool = False,
    revision: str | None = None,
    cache_dir: Path | None = None,
    compilation_cache: Path | None = None,
    shard: bool = False,
    on_shapes: Callable[[DecodingModel], None] | None = None,
) -> DecodingModel:
    """A checkpoint folder or hub id, ready to decode; dtype defaults to fp32 on CPU, bf16
    elsewhere. `shard` splits the params over all local devices (tensor parallel; the server
    does this), which changes nothing on one device. `on_shapes` is called, before the
    weights are read, with the model over their shapes (`DecodingModel.with_params`), so the
    caller can compile meanwhile; the model returned then has the same module (its programs
    are the ones compiled)."""
    if compilation_cache is not None:
        enable_compilation_cache(compilation_cache)
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if dtype == "float16" and jax.default_backend() == "cpu":
        raise ConfigError(
            "float16 cannot run on the CPU (XLA has no float16 matrix products there); "
            "use --dtype float32 or bfloat16, or run on a GPU"
        )
    shaped: list[DecodingModel] = []

    def config_read(path: Path, config: CodeGenConfig) -> None:
        tokenizer = CodeGenTokenizer.from_dir(path)
        shapes = params_shapes(config, DTYPES[dtype])
        shaped.append(DecodingModel.create(config, shapes, tokenizer, int8=int8))
        if on_shapes is not None:
            on_shapes(shaped[0])

    # int8 quantizes each tensor as it is read: the fp32 model never exists whole
    transform = quantize_leaf if int8 else None
    loaded = load_model(
        model, dtype, revision, cache_dir, on_config=config_read, transform=transform
    )
    ready = shaped[0].with_params(loaded.params)
    if not shard:
        return ready
    params, cache_sharding = shard_for_decoding(ready.params, loaded.config.num_heads)
    return dataclasses.replace(ready, params=params, cache_sharding=cache_sharding)


Status = Callable[[str], None]  # "preparing the context": a request waits for background work
# What a request that adds a step to a prepared context may add to it (tokens): the cache
# lengths and the prefill compiled ahead cover a step of up to this many tokens. After cached
# tokens, a step's text is prefilled STEP_TOKENS wide whatever its length: one prefill program
# per cache length to compile ahead, not three (16/32/64 wide; each one seconds of XLA compile
# for 350M on a CPU). Measured on the 2-core CPU (350M fp32, 200 cached tokens, load ~3): a
# warm prefill 16 / 32 / 64 wide took 0.33 / 0.47 / 0.42 s (median of 15), so a short step pays
# ~0.1 s for the padding, a 17-64 token one nothing.
STEP_TOKENS = 64
# A step whose text was prefilled as it was typed (Session.prepare_next's `typed`) has its last
# few tokens left after Enter (the last word, the line's end): they, and the few typed since
# the last background prefill, are prefilled TYPED_TOKENS wide, a program of its own; a prefill
# streams every weight once, so 8 tokens cost about one decode step where 64 cost ~5 (350M,
# 2-core CPU; bench/repl.py).
TYPED_TOKENS = 8
# One row over the whole-context cache prefills any text in pieces of those two widths (see
# `_pieces`): up to this many tokens TYPED_TOKENS at a time (each costs about what one
# STEP_TOKENS-wide prefill's share of them would), longer text STEP_TOKENS at a time.
TYPED_PIECES_UP_TO = 3 * TYPED_TOKENS
# A request with no context at all prefills its step cold (nothing cached to read) at
# prefill_width's widths, likeliest first: only the first turn of an empty session.
COLD_WIDTHS = (16, 32, 64)
# A program: ("prefill", length, rows, width, cold), ("decode", length, rows, steps, mode),
# ("resize", from_rows, from_length, rows, length), ("fresh", rows, length); "context" is the
# background prefill of a prepared prompt.
Job = tuple[Any, ...]
Piece = tuple[int, bool]  # a prefill's (width, cold)
# A request that prefills more new tokens than this says so first (on_status; the REPL prints
# it): a pasted step or the first turn after a resume reads for seconds on a CPU (350M fp32 on
# 2 cores: ~150 tokens/s), where a typed step's few tokens are not worth a line.
TOLD_PREFILL_TOKENS = 2 * STEP_TOKENS
# The order of the background jobs (Ahead's priorities): the programs the next request runs
# (its state, its prefill and the decode chunk), then the prefill of the prompt prepared
# last, then the other programs. A prefill before those compiles would keep them waiting
# while the user types (the REPL prepares every 0.25 s: measured, turn 1 then compiled its
# decode chunk after Enter, 7.3 s instead of 2.7 s); after them it waits seconds only once,
# on turn 1, and compiles its own program if it runs first.
COMPILE_FIRST_PRIORITY, PREFILL_PRIORITY, COMPILE_LATER_PRIORITY = 0, 1, 2
# The prefill widths one row over the whole-context cache runs (see LocalDecoder._pieces).
PIECE_WIDTHS = (TYPED_TOKENS, STEP_TOKENS)
# The first decode chunk's steps over the whole-context cache: the first code shows after
# one model step, not chunk_size (350M, 2-core CPU: ~80 ms a step at 1,500 cached tokens, so
# Enter -> first code 0.55-0.7 s became ~0.3 s). Turn 1 compiles only this decode program
# ahead and runs all its chunks with it (LocalDecoder._later_steps); the chunk_size one
# compiles after turn 1 (see LocalDecoder._programs).
FIRST_STEPS = 1


class Ahead:
    """One thread running jobs, the lowest `priority` first and in the order they came within
    one, while there are any. Our own rather than a ThreadPoolExecutor, whose idle workers
    live as long as it does and which has no priorities. A daemon thread, so it never keeps
    the process alive; but a daemon thread that is inside XLA when Python finalizes aborts
    the process, so at exit the queued jobs are dropped and the running one is waited for."""

    def __init__(self) -> None:
        # (priority, order, future, work): a heap
        self._queue: list[tuple[int, int, concurrent.futures.Future[None], Callable[[], None]]]
        self._queue = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False  # stop() was called: nothing more runs
        _RUNNING.add(self)

    @property
    def stopped(self) -> bool:
        """stop() was called, or the process exits (core/decoding.py EXITING): nothing more
        runs."""
        return self._stopped or EXITING.is_set()

    def submit(
        self, work: Callable[[], None], priority: int = 0
    ) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            if self.stopped:  # at exit: a thread started now could be inside XLA at the end
                future.cancel()
                return future
            heapq.heappush(self._queue, (priority, next(self._order), future, work))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="decoder-ahead", daemon=True)
                self._thread.start()
        return future

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    return
                _, _, future, work = heapq.heappop(self._queue)
            if future.set_running_or_notify_cancel():
                try:
                    work()
                    future.set_result(None)
                except BaseException as error:  # kept on the future; the request redoes it
                    future.set_exception(error)
            del future, work  # the job's decoder is not kept alive by an idle thread

    def stop(self, wait: bool = True) -> None:
        """Drop the queued jobs, refuse new ones and (`wait`) wait for the running one (a
        background prefill stops at its next piece: see LocalDecoder._prefill_ahead)."""
        with self._lock:
            self._stopped = True
            for _, _, future, _ in self._queue:
                future.cancel()
            self._queue.clear()
            thread = self._thread
        if thread is not None and wait:
            thread.join()


_RUNNING: weakref.WeakSet[Ahead] = weakref.WeakSet()


def _stop_ahead() -> None:
    """At exit (core/decoding.py's at_exit, which sets EXITING first: no background job starts
    any more, also in a decoder created later, e.g. by a model loading in a thread), the
    running jobs end."""
    EXITING.set()
    for ahead in list(_RUNNING):
        ahead.stop()


at_exit(_stop_ahead)


class LocalDecoder:
    """CodeGen in this process: jitted prefill and chunked decode, with prefix reuse, and the
    next request's work done ahead (`prepare`)."""

    def __init__(self, ready: DecodingModel, chunk_size: int | None = None) -> None:
        self.ready = ready
        self.config, self.tokenizer, self.params = ready.config, ready.tokenizer, ready.params
        self.model, self.dtype, self.logits_fn = ready.model, ready.dtype, ready.logits_fn
        self.chunk_size = chunk_size or default_chunk_size()
        self.on_status: Status | None = None  # told when a request waits for background work
        self._tokens: list[int] = []  # the tokens whose keys/values are in _kept
        self._kept: DecodeState | None = None  # row 0 of the last request
        self._spare: DecodeState | None = None  # a forgotten state, its memory for the next
        self._lock = threading.Lock()  # guards _kept/_tokens/_streaming between the threads
        self._streaming = False  # a request owns the state (between _start and _keep)
        self._ahead = Ahead()
        self._jobs: dict[Job, concurrent.futures.Future[None]] = {}
        self._asked = 0  # prepares and requests so far: a background prefill stops when it grows
        self._compiled: set[Job] = set()  # the prefill and decode programs compiled (or run)
        self._served = False  # a request has ended (see _programs)
        # False while the params are shapes only (LocalDecoder.load's `early`)
        self.loaded = not isinstance(
            jax.tree_util.tree_leaves(self.params)[0], jax.ShapeDtypeStruct
        )

    @classmethod
    def create(
        cls,
        config: CodeGenConfig,
        params: Params,
        tokenizer: CodeGenTokenizer,
        int8: bool = False,
        chunk_size: int | None = None,
        decode_attention: DecodeAttention = "auto",
    ) -> LocalDecoder:
        """Over loaded params (of one dtype, the compute dtype); int8 quantizes them."""
        ready = DecodingModel.create(config, params, tokenizer, int8, decode_attention)
        return cls(ready, chunk_size)

    @classmethod
    def load(
        cls,
        model: str | Path,
        dtype: str | None = None,
        int8: bool = False,
        revision: str | None = None,
        cache_dir: Path | None = None,
        compilation_cache: Path | None = None,
        early: Callable[[LocalDecoder], None] | None = None,
    ) -> LocalDecoder:
        """A checkpoint folder or hub id (see load_for_decoding). `early` is called with the
        decoder before its weights are read: it can `prepare` then (for an empty context:
        compiles only, see `loaded`), and the first request's programs compile while the
        weights load (~2 s of each ~2-4 s on a CPU for 350M)."""
        made: list[LocalDecoder] = []

        def shapes_known(shapes: DecodingModel) -> None:
            made.append(cls(shapes))
            if early is not None:
                early(made[0])

        try:
            ready = load_for_decoding(
                model, dtype, int8, revision, cache_dir, compilation_cache, on_shapes=shapes_known
            )
        except BaseException:
            if made:  # its compiles serve nobody now
                made[0]._ahead.stop(wait=False)
            raise
        made[0]._loaded(ready)
        return made[0]

    def _loaded(self, ready: DecodingModel) -> None:
        """The weights, once read (see load): until then the params are shapes only, and
        `prepare` compiles but prefills nothing."""
        with self._lock:
            self.ready, self.params = ready, ready.params
            self.loaded = True

    @property
    def max_context(self) -> int:
        return self.config.max_positions

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def describe(self) -> str:
        """`350.0M parameters · GPU (NVIDIA H100) · bfloat16`: size, device, dtype; on a CPU
        also which path a decode step's matmuls and its attention take (`· CPU matmul
        (float32 weights): C++ kernel (avx512, XLA's thread pool) · decode attention: C++
        kernel`, or XLA and why)."""
        count = sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(self.params))
        device = jax.devices()[0]
        kind = getattr(device, "device_kind", "") or device.platform
        text = f"{count / 1e6:,.1f}M parameters · {device.platform.upper()} ({kind}) · {self.dtype}"
        if device.platform != "cpu":
            return text
        weights = "int8" if self.model.int8 else jnp.dtype(self.model.param_dtype).name
        kernel = cpu_attention.applies(1, self.config.head_dim, self.dtype)
        attention = "C++ kernel" if kernel else "XLA"
        return f"{text} · {cpu_matmul.status(weights)} · decode attention: {attention}"

    def reused_tokens(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of `prompt_ids` the cache already holds."""
        return 0 if self._kept is None else common_prefix(self._tokens, prompt_ids)

    def forget(self) -> None:
        """Drop the kept tokens: the next request prefills its whole prompt. On the CPU the kept
        state's memory stays for that request when it has the same shape (see _fits): its
        cache is written over, not allocated and zeroed afresh (40-85 ms for 350M's 335 MB fp32
        cache on the 2-core CPU, mostly page faults)."""
        if self.whole_context_cache:  # elsewhere it never fits (see _fits): let it go
            self._spare = self._kept if self._kept is not None else self._spare
        self._tokens, self._kept = [], None

    @functools.cached_property
    def whole_context_cache(self) -> bool:
        """Whether one row's cache is as long as the model's context from the first token on
        (see cache_length): where decode steps attend through cpu_attention's kernel, which
        reads only the positions in use."""
        return cpu_attention.applies(1, self.config.head_dim, self.dtype)

    def cache_length(self, tokens: int, rows: int = 1) -> int:
        """The cache length (positions) of a request of `rows` rows that needs `tokens`
        positions. With `whole_context_cache`, one row's is the model's context whatever
        `tokens`: the programs a session runs have one shape, compiled once (ahead, while the
        user types the first step), never again as the session grows (measured on the 2-core
        CPU, 350M: decode steps as fast as over a cache cut to the tokens, see bench/decode.py;
        the cache takes 2 x layers x hidden x context x 4 bytes, 335 MB for 350M in fp32).
        (Plus chunk_size - 1 positions: a request that ends at the window decodes a whole
        chunk, whose tokens past max_new_tokens are dropped.) Otherwise, and for several rows
        (n samples: n times the memory), `cache_bucket`'s lengths, one more program set each
        time a session outgrows one."""
        if rows == 1 and self.whole_context_cache:
            # and the last chunk's dropped tokens (decode_steps rounds up to whole chunks)
            return self.max_context + self.chunk_size - 1
        return cache_bucket(tokens, self.max_context)

    # ------------------------------------------------------------------------- ahead

    def prepare(self, prompt: str | Callable[[], str], sample: SampleParams) -> None:
        """Get ready, in the background, for a request of `sample` (its n and mode) whose
        prompt is `prompt` plus up to STEP_TOKENS tokens: prefill `prompt` into the kept
        cache, then compile the programs that request runs. Returns at once; a request that
        comes first takes over (see module docstring). Calling it again with the same prompt
        costs nothing. A callable `prompt` is built here, in the caller's thread."""
        text = prompt() if callable(prompt) else prompt
        ids = self.tokenizer.encode(text) if text else []
        steps = decode_steps(sample.max_new_tokens, self.chunk_size)
        first, later = self._plan_parts(len(ids), sample.n, sample)
        plan = first + later
        for job, future in list(self._jobs.items()):  # an older prompt's queued work: not needed
            if job[0] == "context":
                dropped = future.done() or future.cancel()
            else:
                dropped = job not in plan and future.cancel()
            if dropped:
                self._jobs.pop(job, None)  # (a request's thread may have dropped it too)
        if ids and self.loaded and len(ids) + STEP_TOKENS + steps <= self.max_context:
            # after the programs the next request runs (see PREFILL_PRIORITY)
            self._asked += 1  # a prefill still running stops at its next piece
            prefill = functools.partial(self._prefill_ahead, ids, steps, self._asked)
            self._submit(("context", tuple(ids), steps), prefill, PREFILL_PRIORITY)
        for job in plan:
            priority = COMPILE_FIRST_PRIORITY if job in first else COMPILE_LATER_PRIORITY
            self._submit(job, functools.partial(self._compile, job, sample), priority)

    def wait_prepared(self) -> None:
        """Block until the background work `prepare` asked for is done (benchmarks and tests
        use it to stand for a user who types slower than the machine prepares), including
        work asked for meanwhile."""
        while pending := [job for job in list(self._jobs.values()) if not job.done()]:
            concurrent.futures.wait(pending)

    def _plan(self, base: int, rows: int, sample: SampleParams) -> list[Job]:
        """The programs a request of `rows` rows on `base` + 1..STEP_TOKENS tokens runs, the
        likeliest first (see _plan_parts)."""
        first, later = self._plan_parts(base, rows, sample)
        return first + later

    def _plan_parts(
        self, base: int, rows: int, sample: SampleParams
    ) -> tuple[list[Job], list[Job]]:
        """_plan's programs: (the ones the next request runs, the others)."""
        steps = decode_steps(sample.max_new_tokens, self.chunk_size)
        kept = self._request_length(base + 1, steps)  # what _prefill_ahead leaves
        lengths = dict.fromkeys(
            self._request_length(base + extra, steps, rows) for extra in (1, STEP_TOKENS)
        )
        cold = base == 0
        # Before the first request, a context that narrow pieces cover (turn 1 as it is typed)
        # leaves the wide prefill and the one-step chunk for later (see _programs); a longer
        # one (a resume) needs the wide prefill.
        wide = self._served or base > STEP_TOKENS
        first: list[Job] = []
        later: list[Job] = []
        for length in lengths:
            now, after = self._programs(rows, kept, length, cold, sample, wide)
            first += now
            later += after
        # The cache length after those: compiled while the user types the turns before it
        # needs them (a 350M compile is seconds on a CPU; a turn's typing may be too short).
        beyond = self.cache_length(max(lengths) + 1, rows)
        if beyond > max(lengths) and not cold:
            resized = ("resize", 1, max(lengths), rows, beyond)
            now = self._programs(rows, kept, beyond, cold, sample, wide)[0]
            later += [resized, *(job for job in now if job[0] in ("prefill", "decode"))]
        return first, later

    def _programs(
        self, rows: int, kept: int, length: int, cold: bool, sample: SampleParams, wide: bool
    ) -> tuple[list[Job], list[Job]]:
        """A request's programs at one cache length: (the ones every step runs: what gives it
        its state, when there is one, its prefill and the decode; the rest: the wider cold
        prefills, the narrow TYPED_TOKENS prefill and what _keep runs; `wide`: also the
        STEP_TOKENS prefill and the chunk_size decode of the pieces path, whose first decode is
        the one-step chunk, turn 1's only one). After cached tokens two
        prefill programs serve every step (STEP_TOKENS wide; TYPED_TOKENS for the end of a step
        prefilled as it was typed), not three of prefill_width's."""
        start: Job = ("fresh", rows, length) if cold else ("resize", 1, kept, rows, length)
        if not cold and (rows, length) == (1, kept):
            start = ()
        # The pieces path's decode is the one-step chunk (turn 1's only one, see _later_steps);
        # its chunk_size decode compiles later, with the `wide` rest.
        chunk: Job = ("decode", length, rows, self.chunk_size, sample.mode)
        decode, later_decode = chunk, ()
        if self._in_pieces(rows):
            decode = ("decode", length, rows, FIRST_STEPS, sample.mode)
            later_decode = chunk if wide and chunk != decode else ()
            # The typed pieces likeliest, then longer text's.
            # Not `wide` (turn 1, its programs compiled as the weights load and its step
            # prefilled as it is typed): the step goes in narrow pieces (see _start), and the
            # wide program compiles after the first request, as the next step is typed, rather
            # than beside it (2-3 s of a core for 350M; measured in process: turn 1's first
            # code 0.67-0.88 s instead of 0.32 s when it ran alongside).
            pieces = PIECE_WIDTHS if wide else PIECE_WIDTHS[:1]
            prefills = [("prefill", length, rows, width, False) for width in pieces]
        else:
            widths = COLD_WIDTHS if cold else (STEP_TOKENS, TYPED_TOKENS)
            prefills = [("prefill", length, rows, width, cold) for width in widths]
        keep: Job = ("resize", rows, length, 1, self.cache_length(length)) if rows > 1 else ()
        first = [job for job in (start, prefills[0], decode) if job]
        return first, [job for job in (later_decode, *prefills[1:], keep) if job]

    def _request_length(self, tokens: int, steps: int, rows: int = 1) -> int:
        """The cache length of a request of `rows` rows on `tokens` tokens that decodes
        `steps`: room for at least STEP_TOKENS more (up to the model's context), so that a
        step's prefill fits STEP_TOKENS wide whatever `steps` (a narrower one would be another
        program)."""
        room = min(tokens + STEP_TOKENS, self.max_context)
        return self.cache_length(max(tokens + steps, room), rows)

    def _in_pieces(self, rows: int) -> bool:
        """Whether a request of `rows` rows prefills in `_pieces`."""
        return rows == 1 and self.whole_context_cache

    def _pieces(
        self,
        ids: list[int],
        reuse: int,
        rows: int,
        length: int,
        narrow_up_to: int = TYPED_PIECES_UP_TO,
    ) -> list[Piece]:
        """The prefills (width, cold), in order, of `ids` after `reuse` cached tokens into a
        cache of `length` positions. One row over the whole-context cache: pieces of
        TYPED_TOKENS (up to `narrow_up_to` tokens) or of STEP_TOKENS (the last one
        TYPED_TOKENS wide when it fits), and never cold (a prefill from position 0 reads
        nothing there): two programs, compiled ahead, serve every prefill of the session,
        whatever its length (a resume's whole context, a pasted step). Otherwise one
        prefill, `_smallest` wide."""
        suffix = len(ids) - reuse
        if not self._in_pieces(rows):
            smallest = self._smallest(suffix, reuse)
            return [(padded_suffix(ids, reuse, length, smallest).shape[1], reuse == 0)]
        if suffix <= narrow_up_to:
            return [(TYPED_TOKENS, False)] * -(-suffix // TYPED_TOKENS)
        count = -(-suffix // STEP_TOKENS)
        last = suffix - (count - 1) * STEP_TOKENS
        return [(STEP_TOKENS, False)] * (count - 1) + [
            (TYPED_TOKENS if last <= TYPED_TOKENS else STEP_TOKENS, False)
        ]

    def _prefill(
        self,
        state: DecodeState,
        ids: list[int],
        reuse: int,
        rows: list[int],
        pieces: list[Piece],
        stop: Callable[[], bool] | None = None,
    ) -> tuple[DecodeState, int]:
        """Prefill `ids` after `reuse` cached tokens in `pieces` (see _pieces) and start
        `rows` on them; or, when `stop()` turns true between two pieces, only the pieces
        before it. With `stop` (a background prefill) each piece is computed before the next
        is asked for, not only dispatched (JAX dispatches asynchronously: 24 pieces of a
        paste would all be queued at once, and a request would wait for every one). Returns
        the state and how many tokens of `ids` it holds."""
        length, count = state.cache[0].keys.shape[2], state.position.shape[0]
        for done, (width, cold) in enumerate(pieces[:-1]):
            if done and stop is not None and stop():  # (one piece at least: progress)
                return state, reuse
            state = prefill_prompt(
                self.logits_fn, self.params, state, ids[: reuse + width], reuse, [0], width, cold
            )
            if stop is not None:
                jax.block_until_ready(state)
            self._compiled.add(("prefill", length, count, width, cold))
            reuse += width
        width, cold = pieces[-1]
        state = prefill_prompt(self.logits_fn, self.params, state, ids, reuse, rows, width, cold)
        if stop is not None:
            jax.block_until_ready(state)
        self._compiled.add(("prefill", length, count, width, cold))
        return state, len(ids)

    @staticmethod
    def _smallest(suffix: int, reuse: int) -> int | None:
        """The narrowest width of a prefill of `suffix` tokens after `reuse` cached ones (see
        prefill_prompt): TYPED_TOKENS for what is left of a step prefilled as it was typed,
        STEP_TOKENS for a step's text; None (prefill_width's widths) for a cold prefill or a
        longer suffix."""
        if not reuse or suffix > STEP_TOKENS:
            return None
        return TYPED_TOKENS if suffix <= TYPED_TOKENS else STEP_TOKENS

    def _submit(self, job: Job, work: Callable[[], None], priority: int) -> None:
        known = self._jobs.get(job)
        failed = (
            known is not None and known.done() and not known.cancelled() and bool(known.exception())
        )
        if known is not None and not known.cancelled() and not failed:
            return  # queued, running or done (a failed one is tried again)
        self._jobs[job] = self._ahead.submit(work, priority)

    def _compile(self, job: Job, sample: SampleParams) -> None:
        """Compile one program of `_plan` (no run, no memory for its inputs)."""
        kind = job[0]
        if kind == "fresh":
            fresh_state.lower(self.config, job[1], job[2], self.dtype).compile()
            return
        if kind == "resize":
            resize_state.lower(self._state_shape(job[1], job[2]), job[3], job[4]).compile()
            return
        state = self._state_shape(job[2], job[1])
        if kind == "prefill":
            lower_prefill(self.logits_fn, self.params, state, job[3], job[2], job[4]).compile()
            self._compiled.add(job)
        else:
            knobs = request_knobs(sample)  # also compiles the few small programs knobs run
            lower_decode(self.logits_fn, self.params, state, knobs, job[3], job[4]).compile()
            self._compiled.add(job)

    def _state_shape(self, rows: int, length: int) -> Any:
        return jax.eval_shape(lambda: fresh_state(self.config, rows, length, self.dtype))

    def _prefill_ahead(self, ids: list[int], steps: int, asked: int) -> None:
        """Prefill `ids` into the kept cache (unless a request owns the state, or the cache
        holds them already). It stops between two pieces once a newer prepare or a request
        came (`asked`: the count of those when it was asked for) or the process exits, keeping
        what it prefilled: Enter waits for one piece at most, not for a stale paste's whole
        prefill."""
        with self._lock:
            if self._streaming:
                return
            length = self._request_length(len(ids) + 1, steps)
            if self._kept is not None and self._tokens[: len(ids)] == ids:
                # held already: grow to the planned length, never cut (the tokens past it
                # would be lost while _tokens still names them)
                if self._kept.cache[0].keys.shape[2] < length:
                    self._kept = resize_state(self._kept, 1, length)
                return
            state, reuse = self._take(ids, 1, length)
            # What a step typed so far adds goes in TYPED_TOKENS pieces: that program is
            # compiled first (the one Enter runs), the STEP_TOKENS one last.
            pieces = self._pieces(ids, reuse, 1, length, narrow_up_to=STEP_TOKENS)

            def stale() -> bool:
                return self._asked != asked or self._ahead.stopped

            self._kept, held = self._prefill(state, ids, reuse, [0], pieces, stale)
            self._tokens = ids[:held]

    def _take(self, prompt_ids: list[int], rows: int, length: int) -> tuple[DecodeState, int]:
        """The kept state fitted to `rows` x `length` (or a fresh one) and how many tokens of
        `prompt_ids` it holds; the decoder forgets it (it is donated next). Under _lock."""
        reuse = self.reused_tokens(prompt_ids)
        start = self._start_job(rows, length)
        if not start:
            assert self._kept is not None
            state = self._kept
        elif start[0] == "fresh":
            state = self._spare if self._fits(self._spare, rows, length) else None
            if state is None:  # (the spare goes first: never both in memory at once)
                self._spare = None
                state = fresh_state(self.config, rows, length, self.dtype)
        else:
            state = resize_state(self._kept, rows, length)
        self._drop()
        return state, reuse

    def _drop(self) -> None:
        """Forget the kept state and the spare (donated or failed: neither may be used)."""
        self._tokens, self._kept, self._spare = [], None, None

    def _fits(self, state: DecodeState | None, rows: int, length: int) -> bool:
        """Whether `state` (a forgotten one, see forget) can start a request of this shape.
        Only with `whole_context_cache` (the CPU: a 335 MB cache for 350M, where a fresh one
        costs): the prefill sets every row's position and step, decode steps read only the
        positions in use, and a prefill piece's attention gives the positions past them
        weight 0, so what the old cache holds there (finite keys/values the model wrote) never
        counts."""
        if state is None or not self.whole_context_cache:
            return False
        if any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state)):
            return False
        return (state.position.shape[0], state.cache[0].keys.shape[2]) == (rows, length)

    def _start_job(self, rows: int, length: int) -> Job:
        """The program that gives a request its state: a fresh one, a resize, or () (the kept
        state has the request's shape)."""
        if self._kept is None:
            return ("fresh", rows, length)
        have = (self._kept.position.shape[0], self._kept.cache[0].keys.shape[2])
        return () if have == (rows, length) else ("resize", *have, rows, length)

    def _wait_ahead(self, needed: Callable[[Job], bool]) -> None:
        """Before a request: drop the queued background jobs (the request does what it needs
        of them itself) and wait for the running one if the request `needed` it."""
        running = []
        for job, future in list(self._jobs.items()):
            if future.done():
                continue
            if future.cancel():
                self._jobs.pop(job, None)  # (a prepare in another thread may have too)
            elif needed(job):
                running.append(future)
        if running and not all(future.done() for future in running):
            if self.on_status is not None:
                self.on_status("getting the model ready for this context…")
            concurrent.futures.wait(running)

    # ------------------------------------------------------------------------- text

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        """Stream the first sample's text as soon as it is settled (see Cutter.visible)."""
        rows = self._rows(sample)
        for tokens in self.stream_tokens(self.tokenizer.encode(prompt), sample):
            for row, row_tokens in zip(rows, tokens, strict=True):
                row.add(row_tokens.tolist())
            if piece := rows[0].take():
                yield piece
            if rows[0].done:
                break
        if rest := rows[0].take(finished=True):
            yield rest

    def complete(self, prompt: str, sample: SampleParams) -> list[str]:
        rows = self._rows(sample)
        for tokens in self.stream_tokens(self.tokenizer.encode(prompt), sample):
            for row, row_tokens in zip(rows, tokens, strict=True):
                row.add(row_tokens.tolist())
            if all(row.done for row in rows):
                break
        return [row.result() for row in rows]

    def _rows(self, sample: SampleParams) -> list[SampleText]:
        cutter = Cutter(codegen_rules=sample.codegen_rules, stop=sample.stop)
        return [SampleText(self.tokenizer, cutter) for _ in range(sample.n)]

    # ------------------------------------------------------------------------- tokens

    def stream_tokens(self, prompt_ids: list[int], sample: SampleParams) -> Iterator[np.ndarray]:
        """Chunks of new tokens, [n, chunk_size] each, until max_new_tokens (the last chunk is
        cut to it). Stop rules and EOS are the caller's: stop iterating to stop decoding."""
        self._check_fits(prompt_ids, sample)
        state = self._start(prompt_ids, sample)
        traced, mode = request_knobs(sample), sample.mode
        new: list[np.ndarray] = []
        failed = False
        steps, done = self._first_steps(state, sample), 0
        later = self._later_steps(state, sample)
        try:
            while done < sample.max_new_tokens:
                state, tokens = decode_chunk(
                    self.logits_fn, self.params, state, traced, steps, mode
                )
                new.append(np.asarray(tokens))
                yield new[-1][:, : sample.max_new_tokens - done]
                done, steps = done + steps, later
        except Exception:  # a state that failed to compute must not serve the next request
            failed = True
            raise
        finally:
            self._keep(None if failed else state, prompt_ids, new)

    def _first_steps(self, state: DecodeState, sample: SampleParams) -> int:
        """The first chunk's steps: FIRST_STEPS over the whole-context cache once that program
        is compiled (its room, chunk_size - 1 positions past the window, holds the one step
        more a request then runs), else chunk_size. The tokens are the same either way
        (a step's sample key is its index)."""
        rows, length = state.position.shape[0], state.cache[0].keys.shape[2]
        first: Job = ("decode", length, rows, FIRST_STEPS, sample.mode)
        return FIRST_STEPS if self._in_pieces(rows) and first in self._compiled else self.chunk_size

    def _later_steps(self, state: DecodeState, sample: SampleParams) -> int:
        """The steps of the chunks after the first: chunk_size, but FIRST_STEPS over the
        whole-context cache while only that program is compiled ahead (turn 1 of a prepared
        session: it compiles while the weights load, in 1.3 core-seconds where the 4-step
        chunk took 1.9 for 350M on the 2-core CPU, and shows the first code after one model
        step; the chunk_size program compiles after turn 1). Same tokens either way."""
        rows, length = state.position.shape[0], state.cache[0].keys.shape[2]
        one: Job = ("decode", length, rows, FIRST_STEPS, sample.mode)
        chunk: Job = ("decode", length, rows, self.chunk_size, sample.mode)
        only_one = one in self._compiled and chunk not in self._compiled
        return FIRST_STEPS if self._in_pieces(rows) and only_one else self.chunk_size

    def _check_fits(self, prompt_ids: list[int], sample: SampleParams) -> None:
        if not prompt_ids:
            raise ConfigError("the prompt is empty; give at least one token of context")
        if len(prompt_ids) + sample.max_new_tokens > self.max_context:
            raise ConfigError(
                f"the prompt ({len(prompt_ids)} tokens) + max_new_tokens "
                f"({sample.max_new_tokens}) exceeds the model's context of {self.max_context} "
                "tokens; shorten the prompt or lower max_new_tokens"
            )

    def _start(self, prompt_ids: list[int], sample: SampleParams) -> DecodeState:
        """n rows on the prompt: prefill what the kept cache lacks into row 0, copy it to all."""
        steps = decode_steps(sample.max_new_tokens, self.chunk_size)
        rows, mode = sample.n, sample.mode
        length = self._request_length(len(prompt_ids), steps, rows)
        self._asked += 1  # a background prefill stops at its next piece: it is waited for
        self._wait_ahead(lambda job: job[0] == "context")
        with self._lock:
            reuse = self.reused_tokens(prompt_ids)
            # Up to STEP_TOKENS tokens in TYPED_TOKENS pieces while only that program is
            # compiled (turn 1, typed as its programs compile): ~0.1 s a piece, not seconds
            # of compiling the wide one after Enter.
            wide = ("prefill", length, rows, STEP_TOKENS, False)
            narrow = TYPED_PIECES_UP_TO if wide in self._compiled else STEP_TOKENS
            pieces = self._pieces(prompt_ids, reuse, rows, length, narrow)
            needed = {
                self._start_job(rows, length),
                *(("prefill", length, rows, width, cold) for width, cold in pieces),
            }
            self._wait_ahead(needed.__contains__)
            state, reuse = self._take(prompt_ids, rows, length)
            self._streaming = True
        if len(prompt_ids) - reuse > TOLD_PREFILL_TOKENS and self.on_status is not None:
            self.on_status(f"reading {len(prompt_ids) - reuse} new tokens of context…")
        try:
            state = self._prefill(state, prompt_ids, reuse, list(range(rows)), pieces)[0]
            # A decode chunk's compile (any steps), if it is running, is waited for only now:
            # the prefill (dispatched, computing) runs beside it (turn 1 with a cold compile
            # cache: the typed step's prefill no longer waits for that compile).
            self._wait_ahead(
                lambda job: job[0] == "decode" and job[1:3] == (length, rows) and job[4] == mode
            )
        except BaseException:  # the state is donated: nothing to keep, and prepares go on
            self._keep(None, prompt_ids, [])
            raise
        return state

    def _keep(
        self, state: DecodeState | None, prompt_ids: list[int], new: list[np.ndarray]
    ) -> None:
        """Keep row 0 for the next request (unless an interrupt left the state donated, or
        it failed: None, and the next request starts afresh)."""
        with self._lock:
            self._streaming, self._served = False, True
            if state is None:
                self._drop()
                return
            if any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state)):
                return
            rows, length = state.position.shape[0], state.cache[0].keys.shape[2]
            # one row: the length a one-row request has (the whole context, where it is)
            self._kept = state if rows == 1 else resize_state(state, 1, self.cache_length(length))
            row0 = np.concatenate(new, axis=1)[0].tolist() if new else []
            self._tokens = list(prompt_ids) + row0
