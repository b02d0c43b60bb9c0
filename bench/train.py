"""Training throughput: codegen-repl's jitted train step beside HF transformers' PyTorch step.

    python bench/train.py                       # GPU: 350M, then 2B (remat), seq 2048, batch 4
    python bench/train.py --budget-s 150        # stop starting measurements after 150 s
    python bench/train.py --shape small         # CPU-sized: 6 x 512 wide, seq 512, batch 4
    python bench/train.py --shape tiny --steps 2 --warmup 1   # seconds; what the test runs

One JSON line per (implementation, shape): tokens/s (batch x seq / median step time), step
time, MFU, and the peak it divides by. Both sides do the same work per step: forward, backward,
global-norm clip, AdamW on fp32 master weights; bf16 compute on accelerators (JAX: bf16
activations, attention through model/attention.py, i.e. cuDNN flash attention on NVIDIA GPUs;
torch: autocast bf16, transformers' eager attention), fp32 on CPU. Random ids and weights.

FLOPs per token (FLOP_FORMULA): 6 N + 6 L s d, N = every parameter used in a matmul (all but
the embedding lookup, lm_head included), L layers, s sequence length, d width: causal
attention's q k^T and weights x v cost 2 s d each per token forward at half the positions on
average, times 3 for forward + backward. Peak: the device's dense bf16 datasheet value
(H100/H200: 989 TFLOP/s, codegen_repl/train/metrics.py) or --peak-tflops; on a CPU, the
measured rate of a large fp32 matmul in this process (each line states its peak_source).

The JAX line also carries a coarse profile of the step (`breakdown_ms`): the attention of all
layers (forward + backward, the chosen implementation and plain XLA), lm_head + loss, and the
optimizer update, each jitted and timed alone, plus XLA's own FLOP and byte counts of the step.
This script needs JAX, flax, optax, torch and transformers only (no grain, no tensorboardX).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from codegen_repl.model.attention import (
    AttentionImplementation,
    causal_attention,
    pick_implementation,
)
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.train import trainer
from codegen_repl.train.config import TrainConfig
from codegen_repl.train.metrics import peak_flops

FLOP_FORMULA = "6*N + 6*L*s*d per token (N: matmul parameters incl. lm_head; causal attention)"
JAX_IMPL, TORCH_IMPL = "codegen-repl (JAX)", "transformers (PyTorch)"


@dataclasses.dataclass(frozen=True)
class Shape:
    model: CodeGenConfig
    seq_len: int
    batch: int
    remat: bool = False  # JAX side: recompute each block's activations in the backward pass


SHAPES: dict[str, Shape] = {
    # Batch 4: transformers' eager attention keeps fp32 [batch, heads, seq, seq] scores and
    # weights per layer for its backward pass (~2 GiB a layer at 350M, batch 4).
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
        "flops_per_token": flops, "flop_formula": FLOP_FORMULA, **extra,
    }  # fmt: skip
    line["mfu"] = round(tokens_per_second * flops / line["peak_flops"], 4)
    return line


def failed(impl: str, name: str, shape: Shape, error: str, extra: dict) -> dict:
    return {
        "impl": impl, "shape": name, "seq_len": shape.seq_len, "batch": shape.batch,
        "error": error, **extra,
    }  # fmt: skip


# --------------------------------------------------------------------------------- JAX


def run_jax(name: str, shape: Shape, args: argparse.Namespace, extra: dict) -> dict:
    """bench_jax, or a line saying the shape does not fit (try --remat or --batch-size)."""
    try:
        return bench_jax(name, shape, args, extra)
    except Exception as error:  # XLA reports out-of-memory as a runtime error
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return failed(JAX_IMPL, name, shape, f"out of memory: {str(error)[:160]}", extra)


def bench_jax(name: str, shape: Shape, args: argparse.Namespace, extra: dict) -> dict:
    dtype = "bfloat16" if on_accelerator() else "float32"
    config = TrainConfig(
        model=shape.model, seq_len=shape.seq_len, batch_size=shape.batch, steps=1000,
        warmup_steps=10, lr=1e-4, compute_dtype=dtype, remat=args.remat or shape.remat,
    )  # fmt: skip
    mesh = trainer.training_mesh(config)
    functions = trainer.compiled(config, mesh)
    state = functions.init()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape.model.vocab_size, (1, shape.batch, shape.seq_len))
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), trainer.batch_sharding(mesh))
    start = time.perf_counter()
    step = functions.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    seconds: list[float] = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    compute = jnp.dtype(dtype)
    extra = {
        **extra,
        "compute": dtype,
        "remat": config.remat,
        "attention": pick_implementation(compute, shape.model.head_dim),
        "cudnn_attention_in_step": "cudnn" in step.as_text().lower(),
        "compile_s": round(compile_seconds, 2),
        "loss": float(metrics["loss"]),
        **xla_counts(step),
        **memory_in_use(),
    }
    if not args.no_breakdown:
        try:
            extra["breakdown_ms"] = breakdown(config, state, compute)
        except Exception as error:  # e.g. out of memory: the step's numbers still count
            extra["breakdown_error"] = str(error)[:200]
    return report(JAX_IMPL, name, shape, seconds, extra)


def xla_counts(step: Any) -> dict:
    """XLA's FLOP and byte estimates of one compiled step (cuDNN calls are not counted)."""
    try:
        costs, memory = step.cost_analysis(), step.memory_analysis()
    except Exception:  # a backend without the analyses: they are extras, not the measurement
        return {}
    costs = costs[0] if isinstance(costs, list) else costs or {}
    return {
        "xla_tflop_per_step": float(f"{float(costs.get('flops', 0.0)) / 1e12:.4g}"),
        "xla_gb_accessed_per_step": float(f"{float(costs.get('bytes accessed', 0.0)) / 1e9:.4g}"),
        "xla_temp_gib": round(getattr(memory, "temp_size_in_bytes", 0) / 2**30, 2),
    }


def memory_in_use() -> dict:
    stats = jax.devices()[0].memory_stats() or {}
    peak_bytes = stats.get("peak_bytes_in_use")
    return {"peak_memory_gib": round(peak_bytes / 2**30, 2)} if peak_bytes else {}


def breakdown(config: TrainConfig, state: trainer.TrainState, dtype: jnp.dtype) -> dict:
    """Milliseconds per step of the parts of the step, each jitted and timed on its own."""
    model, batch, seq = config.model, config.batch_size, config.seq_len
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    qkv = [
        jax.random.normal(k, (batch, seq, model.num_heads, model.head_dim), dtype) for k in keys[:3]
    ]
    out: dict[str, float] = {}
    chosen = pick_implementation(dtype, model.head_dim)
    for implementation in [chosen] if chosen == "xla" else [chosen, "xla"]:
        grad = _attention_grad(implementation)
        key = f"attention_{implementation}_all_layers"
        out[key] = _median_ms(functools.partial(grad, *qkv), model.num_layers)
    hidden = jax.random.normal(keys[3], (batch, seq, model.hidden_size), dtype)
    targets = jnp.zeros((batch, seq), jnp.int32)
    head = jax.jit(jax.grad(_head_loss, argnums=(0, 1)))
    params = state.params["lm_head"]
    out["lm_head_and_loss"] = _median_ms(lambda: head(hidden, params, targets))
    tx = trainer.make_optimizer(config)
    update = jax.jit(lambda s: tx.update(s.params, s.opt_state, s.params))
    out["optimizer_update"] = _median_ms(lambda: update(state))
    return {key: round(value, 2) for key, value in out.items()}


def _attention_grad(implementation: AttentionImplementation) -> Callable[..., Any]:
    """Jitted gradients of one layer's attention: its forward and backward pass."""

    def attend(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        return jnp.sum(causal_attention(query, key, value, implementation=implementation))

    return jax.jit(jax.grad(attend, argnums=(0, 1, 2)))


def _head_loss(hidden: jax.Array, params: dict, targets: jax.Array) -> jax.Array:
    """The step's lm_head and cross-entropy: bf16 matmul, fp32 logits and log-sum-exp."""
    kernel, bias = (params[name].astype(hidden.dtype) for name in ("kernel", "bias"))
    logits = (hidden @ kernel + bias).astype(jnp.float32)  # [batch, seq, vocab]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - picked)


def _median_ms(run: Callable[[], Any], times: int = 1, repeats: int = 5) -> float:
    """Median milliseconds of `run` (after one untimed call that compiles it), x `times`."""
    jax.block_until_ready(run())
    seconds = [_timed(lambda: jax.block_until_ready(run())) for _ in range(repeats)]
    return 1000 * statistics.median(seconds) * times


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
        return failed(TORCH_IMPL, name, shape, f"out of memory: {str(error)[:160]}", extra)
    compute = "autocast bfloat16" if cuda else "float32"
    extra["device"] = torch.cuda.get_device_name() if cuda else device_name()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    extra = {**extra, "compute": compute, "versions": versions}
    if cuda:
        extra["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return report(TORCH_IMPL, name, shape, seconds, extra)


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
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--batch-size", type=int, default=0, help="override the shape's batch")
    parser.add_argument("--remat", action="store_true", help="recompute activations (JAX; 2B: on)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak of one device")
    parser.add_argument("--skip-torch", action="store_true", help="only the JAX side")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the JAX step profile")
    parser.add_argument(
        "--budget-s", type=float, default=0.0,
        help="start no measurement after this many seconds; cut a running one there (0: none)",
    )  # fmt: skip
    # Internal: each measurement runs in its own process (see main).
    parser.add_argument("--impl", choices=("jax", "torch", "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--peak-source", default="--peak-tflops", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace) -> dict:
    """One measurement (or the peak and the backend), in this process."""
    if args.impl == "peak":
        value, source = peak(args)
        return {
            "peak_tflops": value / 1e12,
            "peak_source": source,
            "backend": jax.default_backend(),
        }
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
    pool (JAX preallocates most of a GPU) takes memory from the other; the parent process never
    initializes JAX."""
    args = parse_args()
    if args.impl:
        print(json.dumps(child(args)), flush=True)
        return
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    peak_line = _run_child(["--impl", "peak", *_passed_on(args)], cpu_only=False, deadline=None)
    default = ["350M", "2B"] if peak_line["backend"] != "cpu" else ["small"]
    common = [*_passed_on(args), "--peak-tflops", str(peak_line["peak_tflops"])]
    common += ["--peak-source", peak_line["peak_source"]]
    for name in args.shape or default:
        for impl in ("jax",) if args.skip_torch else ("jax", "torch"):
            argv = ["--impl", impl, "--shape", name, *common]
            try:
                line = _run_child(argv, cpu_only=impl == "torch", deadline=deadline)
            except subprocess.TimeoutExpired:
                label, shape = JAX_IMPL if impl == "jax" else TORCH_IMPL, SHAPES[name]
                error = f"not measured: past --budget-s {args.budget_s:g}"
                line = failed(label, name, shape, error, {"peak_source": peak_line["peak_source"]})
            print(json.dumps(line), flush=True)


def _passed_on(args: argparse.Namespace) -> list[str]:
    out = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    out += ["--batch-size", str(args.batch_size), "--peak-tflops", str(args.peak_tflops)]
    out += ["--remat"] if args.remat else []
    return out + (["--no-breakdown"] if args.no_breakdown else [])


def _run_child(argv: list[str], cpu_only: bool, deadline: float | None) -> dict:
    """One child's JSON line; subprocess.TimeoutExpired when it runs past `deadline`."""
    # The torch process uses JAX only for FLOP arithmetic: keep it off the GPU.
    env = {**os.environ, **({"JAX_PLATFORMS": "cpu"} if cpu_only else {})}
    timeout = None if deadline is None else deadline - time.monotonic()
    if timeout is not None and timeout <= 0:
        raise subprocess.TimeoutExpired(argv, 0)
    done = subprocess.run(
        [sys.executable, __file__, *argv], env=env, capture_output=True, text=True,
        check=False, timeout=timeout,
    )  # fmt: skip
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"bench/train.py {' '.join(argv)} failed ({done.returncode})")
    result: dict = json.loads(done.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    main()
