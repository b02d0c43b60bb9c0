"""Decode speed of the peers our JAX decoder is compared with: HF transformers and CTranslate2.

Each `bench_*` function loads a model once, runs one warm-up generation, then times `repeats`
generations of exactly `new_tokens` tokens (EOS cannot stop them early) and returns

    {"impl", "tokens_per_s", "ms_per_token", "new_tokens", "batch", "prefill_ms", "runs_s"}

where `tokens_per_s = batch * new_tokens / best run` (prefill included, as a user sees it),
`ms_per_token = best run / new_tokens` (one step of the whole batch), `prefill_ms` is the best
timed one-token generation (prompt forward plus the first token) and `runs_s` are all timed
runs. Best of, not median: on a shared CPU other load only ever adds time. torch, transformers
and ctranslate2 are imported inside the functions; a missing one raises `PeerMissing` (an
ImportError) that says what to install.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CodeGenForCausalLM

TEMPERATURE = 0.2  # CodeGen's published sampling settings
TOP_P = 0.95


class PeerMissing(ImportError):
    """A peer library is not installed; the benchmark reports the peer as skipped."""


def require(module: str, impl: str, package: str | None = None) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as missing:
        raise PeerMissing(
            f"{impl} needs `{module}` ({missing}); install it with "
            f"`pip install {package or module}`"
        ) from missing


# ------------------------------------------------------------------------------------- timing


def time_runs(generate: Callable[[int], None], new_tokens: int, repeats: int) -> list[float]:
    """Seconds per call of `generate(new_tokens)`, after one untimed warm-up call."""
    generate(new_tokens)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(new_tokens)
        runs.append(time.perf_counter() - start)
    return runs


def summarize(
    impl: str, generate: Callable[[int], None], new_tokens: int, batch: int, repeats: int
) -> dict:
    """Time full generations and one-token generations (the prefill) into the result dict."""
    runs = time_runs(generate, new_tokens, repeats)
    prefill = min(time_runs(generate, 1, repeats))
    seconds = min(runs)
    return {
        "impl": impl,
        "tokens_per_s": batch * new_tokens / seconds,
        "ms_per_token": 1000 * seconds / new_tokens,
        "new_tokens": new_tokens,
        "batch": batch,
        "prefill_ms": 1000 * prefill,
        "runs_s": [round(run, 4) for run in runs],
    }


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_length(got: int, new_tokens: int, impl: str) -> None:
    if got != new_tokens:
        raise RuntimeError(f"{impl} generated {got} tokens where {new_tokens} were asked")


# ------------------------------------------------------------------------------- transformers


def bench_transformers(
    model_dir: Path | None,
    prompt_ids: list[int],
    new_tokens: int,
    batch: int = 1,
    sample: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    repeats: int = 3,
    size: str | None = None,
) -> dict:
    """`CodeGenForCausalLM.generate` with a KV cache; greedy, or sampled at T=0.2, top-p 0.95.

    With `model_dir=None` the model is built with random weights of `size` straight on `device`
    (no checkpoint on disk; transformers' own init).
    """
    impl = f"transformers-{dtype}"
    torch = require("torch", impl)
    model = load_transformers_model(model_dir, size, dtype, device)
    input_ids = torch.tensor([prompt_ids] * batch, device=device)
    attention_mask = torch.ones_like(input_ids)
    sampling = {"temperature": TEMPERATURE, "top_p": TOP_P} if sample else {}

    def generate(count: int) -> None:
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=sample,
                pad_token_id=model.config.eos_token_id,
                **sampling,
            ).cpu()  # waits for the device
        check_length(output.shape[1] - len(prompt_ids), count, impl)

    return summarize(impl, generate, new_tokens, batch, repeats)


def load_transformers_model(
    model_dir: Path | None, size: str | None, dtype: str, device: str
) -> CodeGenForCausalLM:
    """The HF model from `model_dir`, or with random weights of `size` made on `device`."""
    torch = require("torch", "transformers")
    transformers = require("transformers", "transformers")
    if model_dir is not None:
        model = transformers.CodeGenForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype)
        )
        return model.to(device).eval()
    if size is None:
        raise ValueError("bench_transformers needs a model_dir or a size")
    from make_random_checkpoint import codegen_config

    with torch.device(device):
        model = transformers.CodeGenForCausalLM._from_config(
            codegen_config(size, dtype), dtype=getattr(torch, dtype)
        )
    return model.eval()


# --------------------------------------------------------------------------------- CTranslate2


def convert_ctranslate2(model_dir: Path, out_dir: Path, quantization: str | None = None) -> Path:
    """Convert an HF CodeGen folder with CTranslate2's converter; reuse `out_dir` when complete.

    The converter loads the folder's tokenizer with `AutoTokenizer` for the vocabulary, so the
    folder needs tokenizer files (`make_random_checkpoint` writes them).
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.bin").exists():
        return out_dir
    require("torch", "the CTranslate2 converter")
    require("transformers", "the CTranslate2 converter")
    converters = require("ctranslate2.converters", "CTranslate2", package="ctranslate2")
    converter = converters.TransformersConverter(str(model_dir))
    partial = out_dir.with_name(out_dir.name + ".partial")
    converter.convert(str(partial), quantization=quantization, force=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return out_dir


def ct2_tokens(ct2_dir: Path, ids: list[int]) -> list[str]:
    """Token strings for ids: `generate_batch` takes strings, which it maps back to the same ids."""
    vocabulary_json = Path(ct2_dir) / "vocabulary.json"
    if vocabulary_json.exists():
        vocabulary = json.loads(vocabulary_json.read_text(encoding="utf-8"))
    else:  # CTranslate2 < 3 wrote one token per line
        text = (Path(ct2_dir) / "vocabulary.txt").read_text(encoding="utf-8")
        vocabulary = text.split("\n")
    return [vocabulary[i] for i in ids]


def bench_ctranslate2(
    ct2_dir: Path,
    prompt_ids: list[int],
    new_tokens: int,
    batch: int = 1,
    compute_type: str = "float32",
    device: str = "cpu",
    repeats: int = 3,
    threads: int | None = None,
) -> dict:
    """`Generator.generate_batch`, greedy, the prompt forwarded at once (no prompt in result).

    `threads` is CTranslate2's `intra_threads`; None uses every CPU this process may run on,
    as torch does (CTranslate2's own default is a fixed count).
    """
    impl = f"ctranslate2-{compute_type}"
    ctranslate2 = require("ctranslate2", impl)
    intra_threads = threads if threads is not None else usable_cpus()
    generator = ctranslate2.Generator(
        str(ct2_dir), device=device, compute_type=compute_type, intra_threads=intra_threads
    )
    prompts = [ct2_tokens(ct2_dir, prompt_ids)] * batch

    def generate(count: int) -> None:
        results = generator.generate_batch(
            prompts,
            max_length=count,
            min_length=count,
            include_prompt_in_result=False,
            sampling_topk=1,
        )
        for result in results:
            check_length(len(result.sequences_ids[0]), count, impl)

    return summarize(impl, generate, new_tokens, batch, repeats)
