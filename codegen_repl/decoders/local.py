"""Decoders: the one interface every front end uses to get code from a model.

`LocalDecoder` runs CodeGen in this process with JAX. It keeps the KV cache of its last
context: when the next prompt starts with the same tokens (the next turn of a session), only the
new tokens are prefilled; after an undo or an edit it falls back to the longest common prefix.

`load_for_decoding` loads a checkpoint ready to decode (quantized when asked, split over the
local devices when asked): the local decoder and the decoder server's engine both start from
it, and both decode through model/sampling.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.core.decoding import SampleText
from codegen_repl.core.truncation import Cutter
from codegen_repl.errors import ConfigError
from codegen_repl.model.checkpoint import Params, load_model
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, DecodeAttention, init_cache, quantize_int8
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import (
    DecodeState,
    LogitsFn,
    bucket,
    common_prefix,
    decode_chunk,
    decode_steps,
    default_chunk_size,
    empty_state,
    model_logits_fn,
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
        """Wrap loaded params (of one dtype, the compute dtype); int8 quantizes them."""
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        model = CodeGen(config, int8, dtype, dtype, decode_attention)
        return cls(config, quantize_int8(params) if int8 else params, tokenizer, model)

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
) -> DecodingModel:
    """A checkpoint folder or hub id, ready to decode; dtype defaults to fp32 on CPU, bf16
    elsewhere. `shard` splits the params over all local devices (tensor parallel; the server
    does this), which changes nothing on one device."""
    if compilation_cache is not None:
        enable_compilation_cache(compilation_cache)
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if dtype == "float16" and jax.default_backend() == "cpu":
        raise ConfigError(
            "float16 cannot run on the CPU (XLA has no float16 matrix products there); "
            "use --dtype float32 or bfloat16, or run on a GPU"
        )
    loaded = load_model(model, dtype=dtype, revision=revision, cache_dir=cache_dir)
    tokenizer = CodeGenTokenizer.from_dir(loaded.path)
    ready = DecodingModel.create(loaded.config, loaded.params, tokenizer, int8=int8)
    if not shard:
        return ready
    params, cache_sharding = shard_for_decoding(ready.params, loaded.config.num_heads)
    return dataclasses.replace(ready, params=params, cache_sharding=cache_sharding)


class LocalDecoder:
    """CodeGen in this process: jitted prefill and chunked decode, with prefix reuse."""

    def __init__(self, ready: DecodingModel, chunk_size: int | None = None) -> None:
        self.ready = ready
        self.config, self.tokenizer, self.params = ready.config, ready.tokenizer, ready.params
        self.model, self.dtype, self.logits_fn = ready.model, ready.dtype, ready.logits_fn
        self.chunk_size = chunk_size or default_chunk_size()
        self._tokens: list[int] = []  # the tokens whose keys/values are in _kept
        self._kept: DecodeState | None = None  # row 0 of the last request

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
    ) -> LocalDecoder:
        """A checkpoint folder or hub id (see load_for_decoding)."""
        return cls(load_for_decoding(model, dtype, int8, revision, cache_dir, compilation_cache))

    @property
    def max_context(self) -> int:
        return self.config.max_positions

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def describe(self) -> str:
        """`350.0M parameters · GPU (NVIDIA H100) · bfloat16`: size, device, dtype."""
        count = sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(self.params))
        device = jax.devices()[0]
        kind = getattr(device, "device_kind", "") or device.platform
        return f"{count / 1e6:,.1f}M parameters · {device.platform.upper()} ({kind}) · {self.dtype}"

    def reused_tokens(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of `prompt_ids` the cache already holds."""
        return 0 if self._kept is None else common_prefix(self._tokens, prompt_ids)

    def forget(self) -> None:
        """Drop the kept cache: the next request prefills its whole prompt."""
        self._tokens, self._kept = [], None

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
        try:
            for done in range(0, sample.max_new_tokens, self.chunk_size):
                state, tokens = decode_chunk(
                    self.logits_fn, self.params, state, traced, self.chunk_size, mode
                )
                new.append(np.asarray(tokens))
                yield new[-1][:, : sample.max_new_tokens - done]
        finally:
            self._keep(state, prompt_ids, new)

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
        length = bucket(len(prompt_ids) + decode_steps(sample.max_new_tokens, self.chunk_size))
        reuse = self.reused_tokens(prompt_ids)
        if self._kept is None:
            cache = init_cache(self.config, sample.n, length, self.dtype)
            state = empty_state(cache, self.config.vocab_size)
        else:
            state = resize_state(self._kept, sample.n, length)
        self.forget()  # the state is donated below: own it until _keep
        rows = list(range(sample.n))
        return prefill_prompt(self.logits_fn, self.params, state, prompt_ids, reuse, rows)

    def _keep(self, state: DecodeState, prompt_ids: list[int], new: list[np.ndarray]) -> None:
        """Keep row 0 for the next request (unless an interrupt left the state donated)."""
        if any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state)):
            return
        self._kept = resize_state(state, 1, state.cache[0].keys.shape[2])
        row0 = np.concatenate(new, axis=1)[0].tolist() if new else []
        self._tokens = list(prompt_ids) + row0
