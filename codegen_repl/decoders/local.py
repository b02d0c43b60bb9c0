"""Decoders: the one interface every front end uses to get code from a model.

`LocalDecoder` runs CodeGen in this process with JAX. It keeps the KV cache of its last
context: when the next prompt starts with the same tokens (the next turn of a session), only the
new tokens are prefilled; after an undo or an edit it falls back to the longest common prefix.
"""

from __future__ import annotations

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
from codegen_repl.model.modeling import CodeGen, KVCache, init_cache, quantize_int8
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import (
    DecodeState,
    bucket,
    decode_chunk,
    knobs,
    model_logits_fn,
    prefill,
)
from codegen_repl.model.tokenizer import CodeGenTokenizer


def enable_compilation_cache(path: Path) -> None:
    """JAX's persistent compilation cache, so a second launch does not recompile."""
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class LocalDecoder:
    """CodeGen in this process: jitted prefill and chunked decode, with prefix reuse."""

    def __init__(
        self,
        config: CodeGenConfig,
        params: Params,
        tokenizer: CodeGenTokenizer,
        int8: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        dtype = jax.tree_util.tree_leaves(params)[0].dtype
        self.config, self.tokenizer, self.dtype = config, tokenizer, dtype
        self.params = quantize_int8(params) if int8 else params
        self.model = CodeGen(config, int8=int8, dtype=dtype, param_dtype=dtype)
        self.logits_fn = model_logits_fn(self.model)
        self.chunk_size = chunk_size or (4 if jax.default_backend() == "cpu" else 16)
        self._tokens: list[int] = []  # the tokens whose keys/values are in _cache
        self._cache: KVCache | None = None  # batch 1

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
        """A checkpoint folder or hub id; dtype defaults to fp32 on CPU, bf16 elsewhere."""
        if compilation_cache is not None:
            enable_compilation_cache(compilation_cache)
        dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        loaded = load_model(model, dtype=dtype, revision=revision, cache_dir=cache_dir)
        tokenizer = CodeGenTokenizer.from_dir(loaded.path)
        return cls(loaded.config, loaded.params, tokenizer, int8=int8)

    @property
    def max_context(self) -> int:
        return self.config.max_positions

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def reused_tokens(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of `prompt_ids` the cache already holds."""
        if self._cache is None:
            return 0
        limit = min(len(self._tokens), len(prompt_ids) - 1)  # prefill needs >= 1 new token
        same = 0
        while same < limit and self._tokens[same] == prompt_ids[same]:
            same += 1
        return same

    # ------------------------------------------------------------------------- text

    def generate(self, prompt: str, sample: SampleParams) -> Iterator[str]:
        """Stream the first sample's text as soon as it is settled (see Cutter.visible)."""
        rows = self._rows(sample)
        shown = 0
        for tokens in self.stream_tokens(self.tokenizer.encode(prompt), sample):
            for row, row_tokens in zip(rows, tokens, strict=True):
                row.add(row_tokens.tolist())
            end = rows[0].shown()
            if end > shown:
                yield rows[0].text[shown:end]
                shown = end
            if rows[0].done:
                break
        rest = rows[0].result()[shown:]
        if rest:
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
        key, traced, mode = jax.random.key(sample.seed), knobs(sample), sample.mode
        new: list[np.ndarray] = []
        try:
            for done in range(0, sample.max_new_tokens, self.chunk_size):
                state, tokens = decode_chunk(
                    self.logits_fn, self.params, state, key, traced, self.chunk_size, mode
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
        """Prefill what the cache lacks and widen the state to n rows."""
        steps = -(-sample.max_new_tokens // self.chunk_size) * self.chunk_size
        cache_len = bucket(len(prompt_ids) + steps)
        reuse = self.reused_tokens(prompt_ids)
        cache = self._resized_cache(cache_len)
        self._tokens, self._cache = [], None  # the cache is donated below: own it until _keep
        suffix = prompt_ids[reuse:]
        width = min(bucket(len(suffix), smallest=1), cache_len - reuse)
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(suffix)] = suffix
        logits, cache = prefill(
            self.logits_fn,
            self.params,
            jnp.asarray(padded),
            jnp.int32(len(suffix)),
            cache,
            jnp.int32(reuse),
        )
        if sample.n > 1:
            cache = jax.tree.map(lambda x: jnp.repeat(x, sample.n, axis=0), cache)
            logits = jnp.repeat(logits, sample.n, axis=0)
        return DecodeState(cache, logits, jnp.int32(len(prompt_ids)), jnp.int32(0))

    def _resized_cache(self, cache_len: int) -> KVCache:
        if self._cache is None:
            return init_cache(self.config, 1, cache_len, self.dtype)
        have = self._cache[0].keys.shape[2]
        if have >= cache_len:
            return jax.tree.map(lambda x: x[:, :, :cache_len], self._cache)
        pad = ((0, 0), (0, 0), (0, cache_len - have), (0, 0))
        return jax.tree.map(lambda x: jnp.pad(x, pad), self._cache)

    def _keep(self, state: DecodeState, prompt_ids: list[int], new: list[np.ndarray]) -> None:
        """Keep row 0's cache for the next request (unless an interrupt left it donated)."""
        leaves = jax.tree_util.tree_leaves(state.cache)
        if any(leaf.is_deleted() for leaf in leaves):
            return
        self._cache = jax.tree.map(lambda x: x[:1], state.cache)
        row0 = np.concatenate(new, axis=1)[0].tolist() if new else []
        self._tokens = list(prompt_ids) + row0
