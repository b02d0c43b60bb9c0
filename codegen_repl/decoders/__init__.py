"""Decoders: `local` runs CodeGen in this process with JAX (prefix-KV reuse); `remote` talks to
any OpenAI-compatible completions server over HTTP.
"""
