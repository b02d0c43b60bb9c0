"""codegen-repl: a local-first, multi-turn programming assistant for CodeGen models."""

from __future__ import annotations

__version__ = "0.1.0"
