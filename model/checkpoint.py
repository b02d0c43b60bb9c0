"""HF-format CodeGen checkpoints in and out.

Reads a local folder or a hub repository (through `huggingface_hub`, into the standard HF cache)
holding `config.json` and the weights as `model.safetensors`, a sharded safetensors index, or
`pytorch_model.bin` (+ index; read by `torch_bin`, without torch and without running the pickle's
code). Tensors are read one at a time and converted straight to the target dtype, so a 16B
checkpoint loads with about one bf16 copy of memory. This is the only module that knows HF tensor
names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from codegen_repl.errors import CheckpointError, ConfigError
from codegen_repl.model import torch_bin
from codegen_repl.model.config import MP_NUM, CodeGenConfig
from codegen_repl.model.files import (  # noqa: F401 (re-exported: they were defined here)
    SAFETENSORS,
    SAFETENSORS_INDEX,
    TOKENIZER_FILES,
    TORCH_BIN,
    TORCH_BIN_INDEX,
    download_snapshot,
    find_weights,
    hub_offline,
    read_index,
    resolve_checkpoint,
)

Params = dict[str, Any]  # the Flax params pytree of `modeling.CodeGen`

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Buffers that old transformers versions saved with the weights; they carry no parameters.
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(causal_mask|masked_bias|bias)$")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: CodeGenConfig
    params: Params
    path: Path  # the folder the files were read from
    dtype: str


def load_model(
    model: str | Path,
    dtype: str = "float32",
    revision: str | None = None,
    cache_dir: Path | None = None,
    on_config: Callable[[Path, CodeGenConfig], None] | None = None,
    transform: Transform | None = None,
) -> LoadedModel:
    """Load a CodeGen checkpoint from a local folder or a hub id such as
    `Salesforce/codegen-350M-mono`. `on_config(folder, config)` is called once config.json is
    read, before the weights are (a decoder compiles its programs meanwhile, see
    `params_shapes`). `transform`: see load_params (int8 quantizes tensor by tensor)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_checkpoint(model, revision=revision, cache_dir=cache_dir)
    config = read_config(path)
    if on_config is not None:
        on_config(path, config)
    params = load_params(path, config, DTYPES[dtype], transform)
    return LoadedModel(config=config, params=params, path=path, dtype=dtype)


def read_config(path: Path) -> CodeGenConfig:
    """The checkpoint's config.json; any fault is a CheckpointError naming the file."""
    try:
        return CodeGenConfig.from_json_file(path / "config.json")
    except ConfigError as bad:  # its message names the file, the field and what is expected
        raise CheckpointError(str(bad)) from None


# --------------------------------------------------------------------------------- reading tensors


def read_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) pairs: read-only views of the mapped files (nothing is copied here)."""
    for file in files:
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_torch_bin
        try:
            yield from reader(file)
        except CheckpointError:
            raise
        except Exception as bad:  # each library has its own corrupt-file errors
            raise CheckpointError(
                f"{file} is truncated or corrupt ({type(bad).__name__}: {bad}); "
                "delete it and download the checkpoint again"
            ) from None


# safetensors' own numpy reader copies each tensor out of the file; the format's header gives each
# tensor's dtype, shape and byte offsets (the spec: github.com/huggingface/safetensors, "Format"),
# so a read-only view of the mapped file takes a few lines, and `_to_device` then reads the page
# cache once (350M fp32, 2-core CPU: the load 1.7-2.0 -> 1.25-1.4 s, 2.8-3.2 -> 2.1-2.4 core-s;
# no second copy of each tensor in memory).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}  # fmt: skip


def _read_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, read-only view of the mapped file) per tensor of a .safetensors file, checked as
    the format's spec and safetensors' own reader require: integer shapes and offsets, the
    tensors' bytes covering the data exactly (no gap, no overlap, nothing after the last),
    unique names.

    Raises:
        CheckpointError: a dtype numpy does not hold here (F8_*, complex).
        ValueError, KeyError, TypeError: anything else not as the format says (read_tensors
            words them as a truncated or corrupt file).
    """
    mapped = np.memmap(file, dtype=np.uint8, mode="r")
    size = int.from_bytes(mapped[:8].tobytes(), "little") if len(mapped) >= 8 else -1
    if not 0 <= size <= len(mapped) - 8:
        raise ValueError(f"a header of {size} bytes in a file of {len(mapped)}")
    header = json.loads(mapped[8 : 8 + size].tobytes(), object_pairs_hook=_unique_keys)
    data = mapped[8 + size :]
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} in {file} is {info['dtype']}, which codegen-repl does not "
                f"read (it reads {', '.join(_SAFETENSORS_DTYPES)}); save the checkpoint in "
                "float32, float16 or bfloat16"
            )
        dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), info["shape"]
        begin, end = info["data_offsets"]
        if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)):
            raise ValueError(f"tensor {name!r}: shape {shape}, offsets {begin}-{end}")
        tensors.append((begin, end, name, dtype, tuple(shape)))
    covered = 0
    for begin, end, name, dtype, shape in sorted(tensors, key=lambda t: t[:2]):
        if begin != covered or end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"tensor {name!r} at bytes {begin}-{end}, after {covered}")
        covered = end
    if covered != len(data):
        raise ValueError(f"the tensors cover {covered} of the {len(data)} data bytes")
    for begin, end, name, dtype, shape in tensors:
        yield name, data[begin:end].view(dtype).reshape(shape)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: a name given twice is an error, not the last one's value."""
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"a name given twice in {names}")
    return dict(pairs)


def _read_torch_bin(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    state = torch_bin.load_state_dict(file)  # views of the file: nothing is read yet
    for name in list(state):
        yield name, state.pop(name)


# --------------------------------------------------------------------------------- name mapping


def qkv_from_hf(weight: np.ndarray, config: CodeGenConfig) -> np.ndarray:
    """[3*hidden, hidden] fused, mp_num=4 shards of (query, value, key) -> [hidden, 3, heads, hd]
    in plain (query, key, value) order."""
    heads, head_dim, hidden = config.num_heads, config.head_dim, config.hidden_size
    w = weight.reshape(MP_NUM, 3, heads // MP_NUM, head_dim, hidden)
    w = w[:, [0, 2, 1]]  # per shard (q, v, k) -> (q, k, v)
    w = w.transpose(1, 0, 2, 3, 4).reshape(3, heads, head_dim, hidden)
    return w.transpose(3, 0, 1, 2)


def qkv_to_hf(kernel: np.ndarray, config: CodeGenConfig) -> np.ndarray:
    """The inverse of `qkv_from_hf`."""
    heads, head_dim, hidden = config.num_heads, config.head_dim, config.hidden_size
    w = kernel.transpose(1, 2, 3, 0).reshape(3, MP_NUM, heads // MP_NUM, head_dim, hidden)
    w = w.transpose(1, 0, 2, 3, 4)[:, [0, 2, 1]]
    return w.reshape(3 * hidden, hidden)


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One HF tensor: where it goes in the params tree and how it is reshaped."""

    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def tensor_map(config: CodeGenConfig) -> dict[str, Mapping]:
    """Every parameter of CodeGenForCausalLM by its HF name."""
    d, inner, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, head_dim = config.num_heads, config.head_dim

    # One function object per kind for all layers: load_params compiles one program per
    # function and shape (see _to_device).
    def qkv_in(w: np.ndarray) -> np.ndarray:
        return qkv_from_hf(w, config)

    def qkv_out(k: np.ndarray) -> np.ndarray:
        return qkv_to_hf(k, config)

    def out_in(w: np.ndarray) -> np.ndarray:
        return w.T.reshape(heads, head_dim, d)

    def out_out(k: np.ndarray) -> np.ndarray:
        return k.reshape(d, d).T

    out = {
        "transformer.wte.weight": Mapping(("wte", "embedding"), (vocab, d), _same, _same),
        "transformer.ln_f.weight": Mapping(("ln_f", "scale"), (d,), _same, _same),
        "transformer.ln_f.bias": Mapping(("ln_f", "bias"), (d,), _same, _same),
        "lm_head.weight": Mapping(("lm_head", "kernel"), (vocab, d), _transpose, _transpose),
        "lm_head.bias": Mapping(("lm_head", "bias"), (vocab,), _same, _same),
    }
    for i in range(config.num_layers):
        hf, block = f"transformer.h.{i}", f"block_{i}"
        out |= {
            f"{hf}.ln_1.weight": Mapping((block, "ln", "scale"), (d,), _same, _same),
            f"{hf}.ln_1.bias": Mapping((block, "ln", "bias"), (d,), _same, _same),
            f"{hf}.attn.qkv_proj.weight": Mapping(
                (block, "attn", "qkv", "kernel"),
                (3 * d, d),
                qkv_in,
                qkv_out,
            ),
            f"{hf}.attn.out_proj.weight": Mapping(
                (block, "attn", "out", "kernel"),
                (d, d),
                out_in,
                out_out,
            ),
            f"{hf}.mlp.fc_in.weight": Mapping(
                (block, "mlp", "fc_in", "kernel"), (inner, d), _transpose, _transpose
            ),
            f"{hf}.mlp.fc_in.bias": Mapping(
                (block, "mlp", "fc_in", "bias"), (inner,), _same, _same
            ),
            f"{hf}.mlp.fc_out.weight": Mapping(
                (block, "mlp", "fc_out", "kernel"), (d, inner), _transpose, _transpose
            ),
            f"{hf}.mlp.fc_out.bias": Mapping((block, "mlp", "fc_out", "bias"), (d,), _same, _same),
        }
    return out


# --------------------------------------------------------------------------------- load and save


@functools.partial(jax.jit, static_argnums=(0, 2))
def _to_device(to_flax: Callable[[Any], Any], array: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """to_flax(array) cast to `dtype`, by XLA: its transposes are blocked and use every core
    (numpy's copy of a transposed view took 6 of 8 s of the 350M load on the 2-core CPU), and
    the result is a new buffer (never an alias of a mapped file). One program per tensor shape
    (a few per model), in the persistent compilation cache after the first load."""
    return to_flax(array.astype(dtype))


# (params path, tensor) -> the leaves that stand for it under its parent, e.g. an int8 kernel
# and its scale (modeling.quantize_leaf).
Transform = Callable[[tuple[str, ...], jax.Array], dict[str, jax.Array]]


def load_params(
    path: Path,
    config: CodeGenConfig,
    dtype: jnp.dtype = jnp.float32,
    transform: Transform | None = None,
) -> Params:
    """Every tensor of the checkpoint in `path`, checked, reshaped and cast to `dtype`.

    `transform` turns each tensor into the leaves kept for it as soon as it is read, so the
    tensors before it never all exist at once: int8 quantized at load held the whole fp32 model
    and its int8 copy (2B: 14.1 GB peak RSS, against 5.4 GB for CTranslate2's int8 model).
    Raises CheckpointError (and returns nothing) if any tensor is missing, unexpected, of the
    wrong shape, or unreadable.
    """
    mapping = tensor_map(config)
    params: Params = {}
    for name, array in read_tensors(find_weights(path)):
        if _BUFFERS.match(name):
            continue
        if name not in mapping:
            raise CheckpointError(
                f"unexpected tensor {name!r} in {path}; is this a CodeGen-1 checkpoint?"
            )
        spec = mapping.pop(name)
        if tuple(array.shape) != spec.hf_shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(array.shape)}, expected {spec.hf_shape} "
                f"from config.json; the weights and config.json in {path} do not match"
            )
        tensor = _to_device(spec.to_flax, np.asarray(array), jnp.dtype(dtype))
        if transform is None:
            _set(params, spec.path, tensor)
            continue
        leaves = jax.block_until_ready(transform(spec.path, tensor))  # one at a time
        del tensor
        for leaf, value in leaves.items():
            _set(params, (*spec.path[:-1], leaf), value)
    # The conversions read views of the mapped files (JAX takes them without a copy on a CPU)
    # and run after dispatch: the load ends when they have, so that a file changed or cut
    # after it neither changes the weights nor crashes the process (SIGBUS).
    jax.block_until_ready(params)
    if mapping:
        missing = sorted(mapping, key=_natural)
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(f"checkpoint in {path} lacks {len(missing)} tensors: {shown}")
    return params


def params_shapes(config: CodeGenConfig, dtype: jnp.dtype = jnp.float32) -> Params:
    """The params tree `load_params` returns for `config` and `dtype`, as jax.ShapeDtypeStruct
    leaves, without reading a file: enough to compile the model's programs while the weights
    load (a program lowered over these is the one a call over the loaded arrays finds)."""
    params: Params = {}
    for spec in tensor_map(config).values():
        shape = _flax_shape(spec.to_flax, spec.hf_shape)
        _set(params, spec.path, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return params


@functools.lru_cache(maxsize=64)
def _flax_shape(to_flax: Callable[[Any], Any], hf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `to_flax` gives a tensor of `hf_shape` (once per function and shape)."""
    return tuple(jax.eval_shape(to_flax, jax.ShapeDtypeStruct(hf_shape, jnp.float32)).shape)


def save_hf(params: Params, config: CodeGenConfig, out: Path) -> None:
    """Write an HF folder (config.json + model.safetensors) that transformers loads."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: np.ascontiguousarray(spec.to_hf(np.asarray(_get(params, spec.path))))
        for name, spec in tensor_map(config).items()
    }
    config.to_json_file(out / "config.json")
    save_file(tensors, str(out / SAFETENSORS), metadata={"format": "pt"})


def _set(tree: Params, path: tuple[str, ...], value: jax.Array | jax.ShapeDtypeStruct) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Params, path: tuple[str, ...]) -> jax.Array:
    for key in path:
        tree = tree[key]
    return tree  # type: ignore[return-value]


def _natural(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
