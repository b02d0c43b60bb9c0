"""Benchmarks: MTPB (`mtpb`, with its problems shipped in the package), HumanEval (`humaneval`),
pass@k (`passk`), crash-safe JSON-lines files (`jsonl`), and the sandbox that runs untrusted
samples (`sandbox`, the caller's side; `sandbox_worker`, the worker process and its children).
"""
