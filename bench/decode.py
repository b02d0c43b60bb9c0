"""Decode benchmarks: codegen-repl's LocalDecoder side by side with its peers, JSON lines out.

    python bench/decode.py cpu        # 350M shape, prompt 128, 64 new, batch 1 greedy
    python bench/decode.py cpu --impls int8,ct2-int8 --size 2B --isolate   # + peak RSS each
    python bench/decode.py gpu        # 350M b1 greedy and b8 sampled, 2B and 16B b1
    python bench/decode.py gpu --sizes tiny --peer-sizes none   # the same code path, in seconds
    python bench/decode.py multiturn  # time to first token at turn 10 / turn 1
    python bench/decode.py coldstart  # process start to first token, warm compilation cache
    python bench/decode.py kernels    # the CPU matmul per 350M shape, 1-128 rows; streaming
    python bench/decode.py cachelength  # whole-context cache + CPU attention vs cut to length

Every configuration runs the project and its peers in the same process on the same machine,
with random weights in CodeGen's shapes (bench/make_random_checkpoint.py). Nothing here is a
test: the numbers go into the README and the issue notes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from make_random_checkpoint import make_random_checkpoint, write_tokenizer
from peers import (
    PeerMissing,
    bench_ctranslate2,
    bench_transformers,
    convert_ctranslate2,
    summarize,
)

from codegen_repl.core.context import MTPB_PREFIX, TurnText, build_context
from codegen_repl.decoders.local import LocalDecoder
from codegen_repl.model import cpu_matmul
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, init_cache
from codegen_repl.model.sample_params import SampleParams
from codegen_repl.model.sampling import (
    bucket,
    decode_chunk,
    empty_state,
    prefill_prompt,
    request_knobs,
)
from codegen_repl.model.tokenizer import CodeGenTokenizer

LABEL = os.environ.get("BENCH_LABEL", "")
CHECKPOINTS = Path(os.environ.get("BENCH_CHECKPOINTS", Path(tempfile.gettempdir()) / "bench_ckpt"))


def machine() -> str:
    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else cpu_name()
    return f"{device.platform}: {kind} ({os.cpu_count()} cpus)"


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def emit(record: dict) -> None:
    label = {"label": LABEL} if LABEL else {}
    print(json.dumps({"machine": machine(), **label, **record}), flush=True)


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 50000, length).tolist()


def bench_project(
    decoder: LocalDecoder, impl: str, prompt: list[int], sample: SampleParams, repeats: int
) -> dict:
    """Whole generations of exactly max_new_tokens (stop rules and EOS are not applied)."""

    def generate(new_tokens: int) -> None:
        decoder.forget()  # every run starts cold, as the peers do
        run = dataclasses.replace(sample, max_new_tokens=new_tokens)
        for _ in decoder.stream_tokens(prompt, run):
            pass

    return summarize(impl, generate, sample.max_new_tokens, sample.n, repeats)


def guarded(run: Callable[[], dict], impl: str) -> dict:
    try:
        return run()
    except PeerMissing as missing:
        return {"impl": impl, "skipped": str(missing)}


# --------------------------------------------------------------------------------- cpu


CPU_IMPLS = ("fp32", "int8", "bf16", "transformers", "ct2-float32", "ct2-int8", "ct2-int8_float32")


def cpu(args: argparse.Namespace) -> None:
    """Ours (fp32, int8 and bf16 weights) and the peers on one CPU. With --isolate each impl
    runs in its own process, so each record also has that process's peak RSS."""
    folder = make_random_checkpoint(CHECKPOINTS / args.size, size=args.size)
    setup = {"size": args.size, "prompt": args.prompt, "new_tokens": args.new, "batch": 1}
    for impl in args.impls:
        if args.isolate:
            emit(setup | isolated(args, impl))
            continue
        emit(setup | cpu_impl(args, folder, impl))


def cpu_impl(args: argparse.Namespace, folder: Path, impl: str) -> dict:
    prompt = prompt_ids(args.prompt)
    if impl in ("fp32", "int8", "bf16"):
        dtype = "bfloat16" if impl == "bf16" else "float32"
        decoder = LocalDecoder.load(folder, dtype=dtype, int8=impl == "int8")
        sample = SampleParams(args.new)
        record = bench_project(decoder, f"codegen-repl {impl}", prompt, sample, args.repeats)
        return record | {"matmul": cpu_matmul.status()}
    if impl == "transformers":
        run = functools.partial(bench_transformers, folder, prompt, args.new, repeats=args.repeats)
        return guarded(run, "transformers fp32")
    compute = impl.removeprefix("ct2-")
    quantization = None if compute == "float32" else compute
    run = functools.partial(ctranslate2_run, args, folder, prompt, quantization, compute)
    return guarded(run, f"ctranslate2 {compute}")


def isolated(args: argparse.Namespace, impl: str) -> dict:
    """Run one impl in a child process; its JSON record plus the child's peak RSS (MB)."""
    command = [sys.executable, __file__, "cpu", "--size", args.size, "--prompt", str(args.prompt),
               "--new", str(args.new), "--repeats", str(args.repeats), "--impls", impl]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        return {"impl": impl, "failed": f"exit {child.returncode}"}
    record = json.loads(lines[-1])
    record.pop("machine", None)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return record | {"peak_rss_mb": round(usage.ru_maxrss * scale / 2**20)}


def ctranslate2_run(
    args: argparse.Namespace,
    folder: Path,
    prompt: list[int],
    quantization: str | None,
    compute: str,
) -> dict:
    ct2 = convert_ctranslate2(folder, CHECKPOINTS / f"{args.size}-ct2-{compute}", quantization)
    return bench_ctranslate2(ct2, prompt, args.new, compute_type=compute, repeats=args.repeats)


# --------------------------------------------------------------------------------- gpu


def random_params(config: CodeGenConfig, dtype: jnp.dtype, seed: int = 0) -> dict:
    """Random weights of CodeGen's shapes, made on the device (no checkpoint round trip)."""
    model = CodeGen(config, dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    made = [
        (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(tree, made)


def gpu(args: argparse.Namespace) -> None:
    tokenizer = bench_tokenizer()
    prompt = prompt_ids(args.prompt)
    runs = [
        (size, batch, sampled)
        for size in ("tiny", "350M")
        for batch, sampled in ((1, False), (8, True))
    ]
    runs += [("2B", 1, False), ("16B", 1, False)]
    for size, batch, sampled in (run for run in runs if run[0] in args.sizes):
        sampling = {"temperature": 0.2, "top_p": 0.95} if sampled else {}
        sample = SampleParams(args.new, n=batch, **sampling)  # type: ignore[arg-type]
        setup = {"size": size, "prompt": args.prompt, "new_tokens": args.new, "batch": batch,
                 "sampled": sampled}  # fmt: skip
        config = bench_config(size)
        params = random_params(config, jnp.bfloat16)
        variants = [(chunk, args.attention[0]) for chunk in args.chunks]
        variants += [(args.chunks[0], attention) for attention in args.attention[1:]]
        for chunk_size, attention in variants if batch == 1 else variants[:1]:
            decoder = LocalDecoder.create(
                config, params, tokenizer, chunk_size=chunk_size, decode_attention=attention
            )
            impl = f"codegen-repl {decoder.dtype.name} chunk {chunk_size} attention {attention}"
            emit(setup | bench_project(decoder, impl, prompt, sample, args.repeats))
            if not args.quick:
                emit(setup | {"impl": impl, **step_kernels(decoder, sample)})
        if not args.quick:
            emit(setup | prefill_time(decoder, prompt))
        if args.trace and size == args.trace_size and batch == 1 and not args.quick:
            emit(setup | trace(decoder, prompt, sample, Path(args.trace)))
        del decoder, params
        if size in args.peer_sizes:
            run = functools.partial(
                bench_transformers, None, prompt, args.new, batch=batch, sample=sampled,
                dtype="bfloat16", device="cuda", repeats=args.repeats, size=size,
            )  # fmt: skip
            emit(setup | guarded(run, "transformers bf16"))


def prefill_time(decoder: LocalDecoder, prompt: list[int], repeats: int = 10) -> dict:
    """Milliseconds of the jitted prefill of the whole prompt into an empty cache (the path a
    cold request takes: one fused causal attention, then one write into the cache)."""
    length = bucket(len(prompt) + decoder.chunk_size)
    runs = []
    for attempt in range(repeats + 1):
        cache = init_cache(decoder.config, 1, length, decoder.dtype)
        state = empty_state(cache, decoder.config.vocab_size)
        jax.block_until_ready(state)
        start = time.perf_counter()
        state = prefill_prompt(decoder.logits_fn, decoder.params, state, prompt, 0, [0])
        state.logits.block_until_ready()
        if attempt:
            runs.append(time.perf_counter() - start)
    return {"impl": "codegen-repl prefill", "prefill_ms": 1000 * min(runs)}


def step_kernels(decoder: LocalDecoder, sample: SampleParams) -> dict:
    """What one decode step launches: the instructions of the compiled decode loop's body that
    are not free (parameters, tuples, constants, bitcasts), and per layer. On a GPU each is a
    kernel (a fusion, a library call, a copy); the step's time is bound by them at small batch.
    """
    try:
        length = bucket(512)
        cache = init_cache(decoder.config, sample.n, length, decoder.dtype)
        state = empty_state(cache, decoder.config.vocab_size)
        compiled = decode_chunk.lower(
            decoder.logits_fn, decoder.params, state, request_knobs(sample), decoder.chunk_size,
            sample.mode,
        ).compile()  # fmt: skip
        ops = loop_body_ops(compiled.as_text())
    except Exception as error:  # a measurement aid: never fail the benchmark for it
        return {"step_kernels_error": f"{type(error).__name__}: {str(error)[:200]}"}
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    layers = decoder.config.num_layers
    return {"step_kernels": len(ops), "per_layer": round(len(ops) / layers, 1), "ops": counts}


FREE_OPS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "copy-start",
            "copy-done", "partition-id", "replica-id", "after-all", "opt-barrier"}  # fmt: skip


def loop_body_ops(hlo: str) -> list[str]:
    """Opcodes of the largest while-loop body of an HLO module's text, free ones left out."""
    import re

    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    computations = re.split(r"\n(?=\S)", hlo)
    best: list[str] = []
    for computation in computations:
        name = re.match(r"%?([\w.\-]+)", computation.strip())
        if name is None or name.group(1) not in bodies:
            continue
        ops = re.findall(r"=\s*\S+\s+([a-z][\w\-]*)\(", computation)
        ops = [op for op in ops if op not in FREE_OPS]
        best = max(best, ops, key=len)
    return best


def trace(decoder: LocalDecoder, prompt: list[int], sample: SampleParams, folder: Path) -> dict:
    """A profiler trace of one warm generation of 32 tokens (TensorBoard/Perfetto): the
    kernels of a decode step and their times."""
    sample = dataclasses.replace(sample, max_new_tokens=min(32, sample.max_new_tokens))
    try:
        list(decoder.stream_tokens(prompt, sample))
        decoder.forget()
        with jax.profiler.trace(str(folder)):
            list(decoder.stream_tokens(prompt, sample))
        return {"impl": "trace", "folder": str(folder)}
    except Exception as error:
        return {"impl": "trace", "error": f"{type(error).__name__}: {str(error)[:200]}"}


def bench_tokenizer() -> CodeGenTokenizer:
    """A tokenizer of the real vocabulary size (byte tokens only: ids drive the benchmark)."""
    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer(Path(folder))
        return CodeGenTokenizer.from_dir(folder)


def bench_config(size: str) -> CodeGenConfig:
    return CodeGenConfig.tiny() if size == "tiny" else CodeGenConfig.preset(size)


# --------------------------------------------------------------------------------- multi-turn


def multiturn(args: argparse.Namespace) -> None:
    """An MTPB-shaped session: 10 turns of about 150 tokens each (a step comment and code);
    random weights made on the device, fp32 on CPU and bf16 elsewhere. The session runs twice
    and the second pass is timed, so no prefill bucket compiles while being timed."""
    config = bench_config(args.size)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    decoder = LocalDecoder.create(config, random_params(config, dtype), bench_tokenizer())
    for _ in range(2):
        decoder.forget()
        first_token_ms, context = session_first_tokens(decoder, args.new)
    ids = decoder.tokenizer.encode(context)
    cold_ms = []
    for _ in range(2):  # turn 10 without reuse: what a decoder that re-encodes history pays
        decoder.forget()
        start = time.perf_counter()
        next(decoder.stream_tokens(ids, SampleParams(args.new)))
        cold_ms.append(1000 * (time.perf_counter() - start))
    emit(
        {
            "bench": "multiturn",
            "size": args.size,
            "dtype": str(decoder.dtype),
            "context_tokens": decoder.count_tokens(context),
            "first_token_ms": [round(ms, 1) for ms in first_token_ms],
            "turn10_over_turn1": first_token_ms[-1] / first_token_ms[0],
            "turn10_without_reuse_ms": round(cold_ms[-1], 1),
        }
    )


def session_first_tokens(decoder: LocalDecoder, new_tokens: int) -> tuple[list[float], str]:
    """Milliseconds to the first chunk of tokens at each of 10 turns, and the last context."""
    rng = np.random.default_rng(0)
    words = ["value", "result", "numbers", "print", "append", "range", "for", "in", "if", "len"]
    turns: list[TurnText] = []
    first_token_ms = []
    context = ""
    for turn in range(10):
        step = f"Step {turn}: " + " ".join(rng.choice(words, 6))
        context = build_context(MTPB_PREFIX, turns, step)
        start = time.perf_counter()
        next(decoder.stream_tokens(decoder.tokenizer.encode(context), SampleParams(new_tokens)))
        first_token_ms.append(1000 * (time.perf_counter() - start))
        code = "\n".join(" ".join(rng.choice(words, 6)) for _ in range(3))
        turns.append(TurnText(step, code))
    return first_token_ms, context


# --------------------------------------------------------------------------------- kernels


def kernel_shapes(config: CodeGenConfig) -> dict[str, tuple[int, int]]:
    """[K, N] of every Linear of a CodeGen layer, and lm_head."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return {"qkv": (hidden, 3 * hidden), "out": (hidden, hidden), "fc_in": (hidden, inner),
            "fc_out": (inner, hidden), "lm_head": (hidden, config.vocab_size)}  # fmt: skip


def best_ms(run: Callable[[], jax.Array], seconds: float = 1.0) -> float:
    """The fastest of the runs of `run` (after a warm-up) over about `seconds`, in ms."""
    run().block_until_ready()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        start = time.perf_counter()
        run().block_until_ready()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def narrow_weights(k: int, n: int, kind: str, rng: np.random.Generator) -> tuple:
    if kind == "int8":
        weights = jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8))
        return weights, jnp.asarray(rng.uniform(1e-3, 1e-2, n).astype(np.float32))
    return jnp.asarray(rng.standard_normal((k, n), np.float32)).astype(jnp.bfloat16), None


def kernels(args: argparse.Namespace) -> None:
    """Each int8/bf16 matmul of a layer alone (weights hot in the caches) on the C++ kernel and
    on XLA's path, then a decode step's worth of them over 600 MB of weights (so that they
    stream from memory, as in decoding): GB/s of weights read."""
    from codegen_repl.model import cpu_matmul

    if not cpu_matmul.takes(jnp.int8):
        emit({"bench": "kernels", "skipped": cpu_matmul.status()})
        return
    rng = np.random.default_rng(0)
    shapes = kernel_shapes(bench_config(args.size))
    kernel, xla = jax.jit(cpu_matmul.matmul), jax.jit(cpu_matmul.reference)
    for kind in ("int8", "bf16"):
        for name, (k, n) in shapes.items():
            w, scale = narrow_weights(k, n, kind, rng)
            # 64, 128: prefills, on AMX tiles where the CPU has them (else XLA's path takes them)
            for rows in (1, cpu_matmul.MAX_ROWS, 64, 128):
                x = jnp.asarray(rng.standard_normal((rows, k), np.float32))
                ours = best_ms(lambda: kernel(x, w, scale))  # noqa: B023 (used at once)
                theirs = best_ms(lambda: xla(x, w, scale))  # noqa: B023
                path = "amx" if cpu_matmul.takes_amx(rows) else "vector"
                emit({"bench": "kernels", "size": args.size, "kind": kind, "shape": name,
                      "k": k, "n": n, "rows": rows, "path": path, "kernel_ms": round(ours, 3),
                      "kernel_gb_s": round(w.nbytes / ours / 1e6, 1),
                      "kernel_gmac_s": round(rows * k * n / ours / 1e6, 1),
                      "xla_ms": round(theirs, 3), "isa": cpu_matmul.set_isa("best")})  # fmt: skip
        emit({"bench": "kernels", "size": args.size, "kind": kind} | streaming(shapes, kind, rng))


STREAM_BYTES = 600 * 2**20  # twice what this machine's 300 MB L3 could hold


def streaming(shapes: dict[str, tuple[int, int]], kind: str, rng: np.random.Generator) -> dict:
    """One row through a stack of layers' matmuls (600 MB of weights, so that they stream from
    memory as in decoding) and lm_head, in one jitted program."""
    from codegen_repl.model import cpu_matmul

    names = ("qkv", "out", "fc_in", "fc_out")
    layer_bytes = sum(k * n for k, n in (shapes[name] for name in names))
    layer_bytes *= 1 if kind == "int8" else 2
    layers = [
        [narrow_weights(*shapes[name], kind, rng) for name in names]
        for _ in range(max(2, -(-STREAM_BYTES // layer_bytes)))
    ]
    head = narrow_weights(*shapes["lm_head"], kind, rng)
    hidden = shapes["out"][1]

    @jax.jit
    def step(x: jax.Array, layers: list, head: tuple) -> jax.Array:
        for qkv, out, fc_in, fc_out in layers:
            h = jnp.tanh(cpu_matmul.matmul(x, *fc_in))
            mixed = cpu_matmul.matmul(x, *qkv)[:, :hidden] + cpu_matmul.matmul(x, *out)
            x = jnp.tanh(x + mixed + cpu_matmul.matmul(h, *fc_out))
        return cpu_matmul.matmul(x, *head)

    x = jnp.asarray(rng.standard_normal((1, shapes["qkv"][0]), np.float32))
    ms = best_ms(lambda: step(x, layers, head), seconds=5.0)
    weight_bytes = sum(w.nbytes for layer in layers for w, _ in layer) + head[0].nbytes
    return {"shape": "stream", "layers": len(layers), "weights_mb": weight_bytes // 2**20,
            "step_ms": round(ms, 2), "stream_gb_s": round(weight_bytes / ms / 1e6, 1)}  # fmt: skip


# --------------------------------------------------------------------------------- cold start


def coldstart(args: argparse.Namespace) -> None:
    folder = make_random_checkpoint(CHECKPOINTS / args.size, size=args.size)
    command = [
        str(Path(sys.executable).with_name("codegen-repl")),
        "generate",
        "--model",
        str(folder),
        "--max-new-tokens",
        "1",
        "def f():",
    ]
    times = []
    for _ in range(2):  # the first run fills the compilation cache
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    emit(
        {"bench": "coldstart", "size": args.size, "first_run_s": times[0], "warm_cache_s": times[1]}
    )


# ------------------------------------------------------------------------------ cache length


def cachelength(args: argparse.Namespace) -> None:
    """Decode steps at 200, 800 and 1,500 cached tokens (350M shape, fp32, one row), two ways
    in one process, alternated `--repeats` times: the cache as long as the model's context
    with decode attention in the C++ kernel (what the local decoder does where the kernel is
    built: one program for every length), and the cache cut to `cache_bucket`'s lengths with
    XLA's attention (the path before: a program per length). Per point: the program's
    compile seconds (0 when the length's program is already compiled) and ms per token, wall
    and CPU (process time over all threads: steadier than wall on a shared machine)."""
    from codegen_repl.model import cpu_attention
    from codegen_repl.model.sampling import DecodeState, cache_bucket, lower_decode, model_logits_fn

    if not cpu_attention.applies(1, 64, jnp.float32):
        sys.exit(f"cachelength needs the CPU attention kernel: {cpu_matmul.status()}")
    config = bench_config(args.size)
    model = CodeGen(config)
    params, logits_fn = random_params(config, jnp.float32), model_logits_fn(model)
    sample = SampleParams(16, temperature=0.0)
    knobs, steps = request_knobs(sample), 4
    limit = cpu_attention.MAX_TOKENS
    for _ in range(args.repeats):
        for way in ("whole-context, C++ attention", "cut to length, XLA attention"):
            whole = way.startswith("whole")
            cpu_attention.MAX_TOKENS = limit if whole else 0
            decode_chunk.clear_cache()
            record: dict = {"bench": "cachelength", "size": args.size, "way": way}
            for tokens in (200, 800, 1500):
                length = config.max_positions if whole else cache_bucket(tokens + 64, 2048)
                empty = empty_state(init_cache(config, 1, length, jnp.float32), config.vocab_size)
                at = jnp.full((1,), tokens, jnp.int32)
                state = DecodeState(empty.cache, empty.logits, at, empty.step)
                start = time.perf_counter()
                compiled = lower_decode(logits_fn, params, state, knobs, steps, sample.mode)
                compiled = compiled.compile()
                compile_s = time.perf_counter() - start
                walls, cpus = [], []
                for _ in range(6):
                    wall, cpu_time = time.perf_counter(), time.process_time()
                    after, chunk = compiled(params, state, knobs)
                    chunk.block_until_ready()
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu_time)
                    at = jnp.full((1,), tokens, jnp.int32)  # the same positions again
                    state = DecodeState(after.cache, after.logits, at, after.step)
                record[str(tokens)] = {
                    "cache_length": length,
                    "compile_s": round(compile_s, 2),
                    "ms_per_token": round(1000 * float(np.median(walls[1:])) / steps, 1),
                    "cpu_ms_per_token": round(1000 * float(np.median(cpus[1:])) / steps, 1),
                }
            emit(record)
    cpu_attention.MAX_TOKENS = limit


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "what", choices=["cpu", "gpu", "multiturn", "coldstart", "kernels", "cachelength"]
    )
    parser.add_argument("--size", default="350M")
    parser.add_argument("--sizes", default="350M,2B,16B")
    parser.add_argument("--peer-sizes", default="350M,2B,16B")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--impls", default=",".join(CPU_IMPLS), help=f"cpu: which to run, of {','.join(CPU_IMPLS)}"
    )
    parser.add_argument("--isolate", action="store_true", help="cpu: one process per impl (RSS)")
    parser.add_argument("--chunks", default="16", help="gpu: decode chunk sizes to time (b1)")
    parser.add_argument("--trace", default="", help="gpu: write a profiler trace here")
    parser.add_argument("--trace-size", default="350M")
    parser.add_argument("--quick", action="store_true", help="gpu: decode speed only")
    parser.add_argument(
        "--attention", default="auto", help="gpu: decode attentions to time (b1): auto,dot,sum"
    )
    args = parser.parse_args()
    args.chunks = [int(size) for size in args.chunks.split(",")]
    args.attention = args.attention.split(",")
    gpu_run = args.what == "gpu"
    args.prompt = args.prompt or (512 if gpu_run else 128)
    args.new = args.new or (128 if gpu_run else 64)
    args.sizes, args.peer_sizes = args.sizes.split(","), args.peer_sizes.split(",")
    args.impls = args.impls.split(",")
    if unknown := set(args.impls) - set(CPU_IMPLS):
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {','.join(CPU_IMPLS)}")
    commands = {"cpu": cpu, "gpu": gpu, "multiturn": multiturn, "coldstart": coldstart}
    (commands | {"kernels": kernels, "cachelength": cachelength})[args.what](args)


if __name__ == "__main__":
    main()
