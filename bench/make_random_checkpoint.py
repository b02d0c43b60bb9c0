"""A CodeGen-1 checkpoint with random weights, in HF format, for benchmarks.

The weights are drawn with numpy and streamed tensor by tensor into safetensors files under the
HF names, so even the 16B shape is written with about one tensor in memory (no torch needed).
`config.json` comes from transformers' `CodeGenConfig`; a GPT-2 style byte-level tokenizer
(256 byte symbols, placeholders, `<|endoftext|>` at 50256, no merges) is written beside it so
that `AutoTokenizer` and `ct2-transformers-converter` load the folder with no network.

    python bench/make_random_checkpoint.py /tmp/bench_ckpt/350M --size 350M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import CodeGenConfig

# size -> (n_layer, n_embd, n_head, rotary_dim), as published for CodeGen-1
SIZES: dict[str, tuple[int, int, int, int]] = {
    "350M": (20, 1024, 16, 32),
    "2B": (32, 2560, 32, 64),
    "6B": (33, 4096, 16, 64),
    "16B": (34, 6144, 24, 64),
}
VOCAB_SIZE = 51200
TOKENIZER_SIZE = 50257  # GPT-2 vocabulary; the model pads its embedding to 51200
EOS_ID = 50256
EOS = "<|endoftext|>"
INIT_STD = 0.02  # transformers' initializer_range for CodeGen
SHARD_BYTES = 4 << 30
# dtype name -> (safetensors dtype, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("F32", 4),
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
}


def make_random_checkpoint(
    out_dir: Path, size: str = "350M", seed: int = 0, dtype: str = "float32"
) -> Path:
    """Write (or reuse) a random CodeGen checkpoint of `size` in `out_dir`; return `out_dir`.

    A folder that already holds `config.json` and weights of the same shape is reused as is.
    The checkpoint is built in a sibling `.partial` folder and renamed at the end, so an
    interrupted run never leaves a folder that looks complete.
    """
    if size not in SIZES or dtype not in DTYPES:
        raise ValueError(f"size must be one of {list(SIZES)} and dtype one of {list(DTYPES)}")
    out_dir = Path(out_dir)
    if _is_complete(out_dir, size):
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_weights(partial, tensor_shapes(size), seed, dtype)
    write_tokenizer(partial)
    codegen_config(size, dtype).to_json_file(str(partial / "config.json"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def codegen_config(size: str, dtype: str) -> CodeGenConfig:
    from transformers import CodeGenConfig

    n_layer, n_embd, n_head, rotary_dim = SIZES[size]
    config = CodeGenConfig(
        vocab_size=VOCAB_SIZE,
        n_positions=2048,
        n_ctx=2048,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=rotary_dim,
        n_inner=None,
        activation_function="gelu_new",
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    config.architectures = ["CodeGenForCausalLM"]
    config.dtype = dtype
    return config


def _is_complete(out_dir: Path, size: str) -> bool:
    config = out_dir / "config.json"
    weights = [out_dir / "model.safetensors", out_dir / "model.safetensors.index.json"]
    if not config.exists() or not any(path.exists() for path in weights):
        return False
    found = json.loads(config.read_text(encoding="utf-8"))
    n_layer, n_embd, _, _ = SIZES[size]
    if (found.get("n_layer"), found.get("n_embd")) != (n_layer, n_embd):
        raise ValueError(
            f"{out_dir} holds a checkpoint of another shape (n_layer={found.get('n_layer')}, "
            f"n_embd={found.get('n_embd')}); delete it or choose another folder for {size}"
        )
    return True


# ----------------------------------------------------------------------------------- the tensors


def tensor_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, in the order transformers saves them."""
    n_layer, dim, _, _ = SIZES[size]
    inner = 4 * dim  # n_inner=None
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (VOCAB_SIZE, dim)}
    for i in range(n_layer):
        layer = f"transformer.h.{i}"
        shapes[f"{layer}.ln_1.weight"] = (dim,)
        shapes[f"{layer}.ln_1.bias"] = (dim,)
        shapes[f"{layer}.attn.qkv_proj.weight"] = (3 * dim, dim)
        shapes[f"{layer}.attn.out_proj.weight"] = (dim, dim)
        shapes[f"{layer}.mlp.fc_in.weight"] = (inner, dim)
        shapes[f"{layer}.mlp.fc_in.bias"] = (inner,)
        shapes[f"{layer}.mlp.fc_out.weight"] = (dim, inner)
        shapes[f"{layer}.mlp.fc_out.bias"] = (dim,)
    shapes["transformer.ln_f.weight"] = (dim,)
    shapes["transformer.ln_f.bias"] = (dim,)
    shapes["lm_head.weight"] = (VOCAB_SIZE, dim)
    shapes["lm_head.bias"] = (VOCAB_SIZE,)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """transformers' CodeGen init: normal(0, 0.02) matrices, LayerNorm (1, 0), zero biases."""
    if name.endswith(".weight") and len(shape) == 2:
        tensor = rng.standard_normal(shape, dtype=np.float32)
        tensor *= INIT_STD
        return tensor
    fill = 1.0 if ("ln_" in name and name.endswith(".weight")) else 0.0
    return np.full(shape, fill, dtype=np.float32)


def to_bytes(tensor: np.ndarray, dtype: str) -> bytes:
    """Little-endian bytes of a float32 tensor in `dtype` (bfloat16 by truncation)."""
    if dtype == "bfloat16":
        return (tensor.view(np.uint32) >> 16).astype("<u2").tobytes()
    return tensor.astype("<f2" if dtype == "float16" else "<f4").tobytes()


# ------------------------------------------------------------------------------ safetensors files


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: str) -> list[list[str]]:
    """Tensor names grouped into shards of at most SHARD_BYTES (one tensor may exceed it)."""
    item = DTYPES[dtype][1]
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * item
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_weights(out_dir: Path, shapes: dict[str, tuple[int, ...]], seed: int, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    shards = plan_shards(shapes, dtype)
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shapes, shards[0], rng, dtype)
        return
    weight_map: dict[str, str] = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / file, shapes, names, rng, dtype)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(int(np.prod(shape)) for shape in shapes.values()) * DTYPES[dtype][1]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_safetensors(
    file: Path,
    shapes: dict[str, tuple[int, ...]],
    names: list[str],
    rng: np.random.Generator,
    dtype: str,
) -> None:
    """Stream `names` into one safetensors file: header first, then one tensor at a time."""
    with file.open("wb") as handle:
        handle.write(_safetensors_header(shapes, names, dtype))
        for name in names:
            handle.write(to_bytes(random_tensor(name, shapes[name], rng), dtype))
        handle.flush()
        os.fsync(handle.fileno())


def _safetensors_header(shapes: dict[str, tuple[int, ...]], names: list[str], dtype: str) -> bytes:
    """The safetensors header: u64 length, then JSON padded with spaces to 8 bytes."""
    code, item = DTYPES[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        nbytes = int(np.prod(shapes[name])) * item
        header[name] = {
            "dtype": code,
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


# ------------------------------------------------------------------------------------ tokenizer


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in GPT-2's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in printable] + [
        symbols[byte] for byte in range(256) if byte not in printable
    ]


def write_tokenizer(out_dir: Path) -> None:
    """A loadable GPT-2 style tokenizer with the right size; ids, not text, drive the benchmark."""
    tokens = byte_symbols()
    tokens += [f"<fill_{i}>" for i in range(len(tokens), TOKENIZER_SIZE - 1)]
    tokens.append(EOS)
    vocab = {token: i for i, token in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CodeGenTokenizer",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "add_prefix_space": False,
        "model_max_length": 2048,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint folder (reused when complete)")
    parser.add_argument("--size", choices=list(SIZES), default="350M")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args(argv)
    print(make_random_checkpoint(args.out, args.size, args.seed, args.dtype))


if __name__ == "__main__":
    main()
