"""Training throughput: codegen-repl's jitted train step beside HF transformers' PyTorch step.

    python bench/train.py                       # GPU: 350M and 2B at seq 2048, batch 4
    python bench/train.py --shape small         # CPU-sized: 6 x 512 wide, seq 512, batch 4
    python bench/train.py --shape tiny --steps 2 --warmup 1   # seconds; what the test runs

One JSON line per (implementation, shape): tokens/s (batch x seq / median step time), step
time, MFU, and the peak it divides by. Both sides do the same work per step: forward, backward,
global-norm clip, AdamW on fp32 master weights; bf16 compute on accelerators (JAX: bf16
activations; torch: autocast bf16), fp32 on CPU. Random token ids, random weights.

FLOPs per token: 6 N (N = every parameter used in a matmul: all but the embedding lookup) plus
causal attention 6 L s d. Peak: the device's dense bf16 datasheet value (H100/H200: 989 TFLOP/s,
see codegen_repl/train/metrics.py) or --peak-tflops; on a CPU, the measured rate of a large fp32
matmul in this process (stated in each line as peak_source).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.model.config import CodeGenConfig
from codegen_repl.train import trainer
from codegen_repl.train.config import TrainConfig
from codegen_repl.train.metrics import peak_flops


@dataclasses.dataclass(frozen=True)
class Shape:
    model: CodeGenConfig
    seq_len: int
    batch: int
    remat: bool = False  # JAX side: 2B's fp32 attention scores alone need ~64 GiB without it


SHAPES: dict[str, Shape] = {
    # Batch 4: at 8, the fp32 attention scores kept for the backward pass (~3 GiB a layer)
    # outgrow an 80 GiB H100 without remat; try --batch-size 8 on an H200.
    "350M": Shape(CodeGenConfig.preset("350M"), 2048, 4),
    "2B": Shape(CodeGenConfig.preset("2B"), 2048, 4, remat=True),
    "small": Shape(
        CodeGenConfig(
            hidden_size=512,
            num_layers=6,
            num_heads=8,
            rotary_dim=32,
            intermediate_size=2048,
            max_positions=512,
        ),
        512,
        4,
    ),
    "tiny": Shape(
        dataclasses.replace(
            CodeGenConfig.tiny(), max_positions=128, bos_token_id=0, eos_token_id=0
        ),
        128,
        4,
    ),
}


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def device_name() -> str:
    device = jax.devices()[0]
    if device.platform != "cpu":
        return device.device_kind
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` fp32 [size, size] matmuls: this CPU's practical peak."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def peak(args: argparse.Namespace) -> tuple[float, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak-tflops"
    known = peak_flops()
    if known:
        return known, f"{jax.devices()[0].device_kind} dense bf16 datasheet"
    return cpu_peak_flops(), "measured fp32 2048^3 matmul on this CPU"


def report(impl: str, name: str, shape: Shape, seconds: list[float], extra: dict) -> dict:
    config = TrainConfig(model=shape.model, seq_len=shape.seq_len, batch_size=shape.batch)
    step = statistics.median(seconds)
    tokens_per_second = shape.batch * shape.seq_len / step
    flops = trainer.flops_per_token(config, shape.seq_len)
    line = {
        "impl": impl, "shape": name, "seq_len": shape.seq_len, "batch": shape.batch,
        "step_ms": round(1000 * step, 2), "tokens_per_s": round(tokens_per_second, 1),
        "flops_per_token": flops, **extra,
    }  # fmt: skip
    line["mfu"] = round(tokens_per_second * flops / line["peak_flops"], 4)
    return line


# --------------------------------------------------------------------------------- JAX


def run_jax(name: str, shape: Shape, args: argparse.Namespace, extra: dict) -> dict:
    """bench_jax, or a line saying the shape does not fit (try --remat or --batch-size)."""
    try:
        return bench_jax(name, shape, args, extra)
    except Exception as error:  # XLA reports out-of-memory as a runtime error
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {
            "impl": "codegen-repl (JAX)", "shape": name, "seq_len": shape.seq_len,
            "batch": shape.batch, "error": f"out of memory: {str(error)[:160]}", **extra,
        }  # fmt: skip


def bench_jax(name: str, shape: Shape, args: argparse.Namespace, extra: dict) -> dict:
    dtype = "bfloat16" if on_accelerator() else "float32"
    config = TrainConfig(
        model=shape.model, seq_len=shape.seq_len, batch_size=shape.batch, steps=1000,
        warmup_steps=10, lr=1e-4, compute_dtype=dtype, remat=args.remat or shape.remat,
    )  # fmt: skip
    functions = trainer.compiled(config, trainer.training_mesh(config))
    state = functions.init()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape.model.vocab_size, (1, shape.batch, shape.seq_len))
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), trainer.batch_sharding(
        trainer.training_mesh(config)))  # fmt: skip
    start = time.perf_counter()
    state, metrics = functions.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        state, metrics = functions.train_step(state, batch)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = functions.train_step(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    extra = {
        **extra,
        "compute": dtype,
        "remat": config.remat,
        "first_step_s": round(compile_seconds, 2),
    }
    extra["loss"] = float(metrics["loss"])
    return report("codegen-repl (JAX)", name, shape, seconds, extra)


# --------------------------------------------------------------------------------- transformers


def bench_torch(name: str, shape: Shape, args: argparse.Namespace, extra: dict) -> dict:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hf_config = transformers.CodeGenConfig(**_hf_fields(shape.model))
    try:
        model = transformers.CodeGenForCausalLM(hf_config).to(device).train()  # type: ignore[arg-type]
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
        )
        ids = torch.randint(0, shape.model.vocab_size, (shape.batch, shape.seq_len), device=device)

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            return float(loss.detach())

        for _ in range(args.warmup):
            step()
        seconds = [_timed(step) for _ in range(args.steps)]
    except torch.OutOfMemoryError as error:
        return {
            "impl": "transformers (PyTorch)", "shape": name, "seq_len": shape.seq_len,
            "batch": shape.batch, "error": f"out of memory: {str(error)[:160]}", **extra,
        }  # fmt: skip
    compute = "autocast bfloat16" if cuda else "float32"
    extra["device"] = torch.cuda.get_device_name() if cuda else device_name()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    extra = {**extra, "compute": compute, "versions": versions}
    return report("transformers (PyTorch)", name, shape, seconds, extra)


def _hf_fields(model: CodeGenConfig) -> dict:
    fields = model.to_hf_dict()
    for key in ("architectures", "model_type"):
        fields.pop(key)
    return fields


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps, compilation first")
    parser.add_argument("--batch-size", type=int, default=0, help="override the shape's batch")
    parser.add_argument("--remat", action="store_true", help="recompute activations (JAX; 2B: on)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak of one device")
    parser.add_argument("--skip-torch", action="store_true", help="only the JAX side")
    # Internal: each measurement runs in its own process (see main).
    parser.add_argument("--impl", choices=("jax", "torch", "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--peak-source", default="--peak-tflops", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One measurement (or the peak), in this process."""
    if args.impl == "peak":
        value, source = peak(args)
        return {"peak_tflops": value / 1e12, "peak_source": source}
    name = args.shape[0]
    shape = SHAPES[name]
    if args.batch_size:
        shape = dataclasses.replace(shape, batch=args.batch_size)
    extra = {"peak_flops": args.peak_tflops * 1e12, "peak_source": args.peak_source}
    if args.impl == "jax":
        extra |= {"device": device_name(), "jax": jax.__version__}
        return run_jax(name, shape, args, extra)
    return bench_torch(name, shape, args, extra)


def main() -> None:
    """Each implementation and shape runs in a fresh process, so neither framework's memory
    pool (JAX preallocates most of a GPU) takes memory from the other."""
    args = parse_args()
    if args.impl:
        print(json.dumps(child(args)), flush=True)
        return
    peak_line = _run_child(["--impl", "peak", *_passed_on(args)], cpu_only=False)
    names = args.shape or (["350M", "2B"] if _has_accelerator() else ["small"])
    common = [*_passed_on(args), "--peak-tflops", str(peak_line["peak_tflops"])]
    common += ["--peak-source", peak_line["peak_source"]]
    for name in names:
        for impl in ("jax",) if args.skip_torch else ("jax", "torch"):
            line = _run_child(["--impl", impl, "--shape", name, *common], cpu_only=impl == "torch")
            print(json.dumps(line), flush=True)


def _passed_on(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    out += ["--batch-size", str(args.batch_size), "--peak-tflops", str(args.peak_tflops)]
    return out + (["--remat"] if args.remat else [])


def _run_child(argv: list[str], cpu_only: bool) -> dict:
    # The torch process uses JAX only for FLOP arithmetic: keep it off the GPU.
    env = {**os.environ, **({"JAX_PLATFORMS": "cpu"} if cpu_only else {})}
    done = subprocess.run(
        [sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"bench/train.py {' '.join(argv)} failed ({done.returncode})")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _has_accelerator() -> bool:
    """Without initializing JAX here (its GPU memory pool would stay with this process)."""
    env = {**os.environ}
    probe = "import jax; print(jax.default_backend())"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return done.stdout.strip() not in ("", "cpu")


if __name__ == "__main__":
    main()
