"""Decoder-server benchmark: aggregate tokens/s and latency for 1, 4 and 16 concurrent clients.

    python bench/serve.py --size tiny            # seconds, on any machine
    python bench/serve.py --size 350M            # CodeGen-350M's shape, random weights
    python bench/serve.py --model PATH           # any checkpoint folder

A real server (uvicorn on 127.0.0.1, a free port) runs in this process; each client is a thread
with its own httpx connection that streams greedy completions of `--max-tokens` tokens for
prompts of `--prompt-tokens` random token ids (a different prompt per request, so no prefix is
shared). Every level first runs once untimed (compilation), then `--requests` requests are
split over its clients. Clients = 1 is the sequential baseline; `speedup` is a level's aggregate
tokens/s over it. One JSON line per level.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

import make_random_checkpoint as checkpoints
from decode import CHECKPOINTS, machine

from codegen_repl.serve.app import ServerConfig, create_app, load_engine, serve_in_thread
from codegen_repl.serve.engine import EngineConfig

TINY = (2, 256, 8, 16)  # n_layer, n_embd, n_head, rotary_dim: a shape that decodes fast anywhere


def model_folder(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    if args.size == "tiny":
        checkpoints.SIZES.setdefault("tiny", TINY)
    return checkpoints.make_random_checkpoint(CHECKPOINTS / args.size, args.size, dtype="float32")


def one_request(url: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """Stream one greedy completion: (latency, time to first text, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    started = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - started
    latency = time.perf_counter() - started
    return latency, first if first is not None else latency, tokens


def run_level(url: str, clients: int, prompts: list[list[int]], max_tokens: int) -> dict:
    """`clients` threads share the prompts; returns aggregate tokens/s and latency stats."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(mine: list[list[int]]) -> None:
        for prompt in mine:
            result = one_request(url, prompt, max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(prompts[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r[2] for r in results),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p95_latency_s": round(float(np.percentile(latencies, 95)), 3),
        "p50_first_text_s": round(statistics.median(r[1] for r in results), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", *checkpoints.SIZES])
    parser.add_argument("--model", help="a checkpoint folder (instead of --size)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    folder = model_folder(args)
    config = ServerConfig(
        model=str(folder), engine=EngineConfig(max_batch=args.max_batch), dtype=args.dtype
    )
    engine = load_engine(config)
    rng = np.random.default_rng(0)
    levels = [int(c) for c in args.clients.split(",")]
    with serve_in_thread(create_app(folder.name, lambda: engine)) as url:
        while httpx.get(f"{url}/health").status_code != 200:
            time.sleep(0.05)
        sequential = None
        for clients in levels:
            count = max(args.requests, clients)

            def prompts(k: int = count) -> list[list[int]]:
                return rng.integers(32, 126, (k, args.prompt_tokens)).tolist()

            run_level(url, clients, prompts(clients), args.max_tokens)  # compile this level
            result = run_level(url, clients, prompts(), args.max_tokens)
            sequential = sequential or (result["tokens_per_s"] if clients == 1 else None)
            speedup = result["tokens_per_s"] / sequential if sequential else None
            print(json.dumps({
                "bench": "serve", "model": args.model or args.size, "machine": machine(),
                "dtype": str(engine.dtype), "max_batch": args.max_batch,
                "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, **result,
                "speedup_vs_sequential": round(speedup, 2) if speedup else None,
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
