"""Benchmarks: MTPB (`mtpb`), HumanEval (`humaneval`), and the sandbox that runs untrusted
samples (`sandbox`).
"""
