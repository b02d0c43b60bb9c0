"""codegen-repl: a local-first, multi-turn programming assistant for CodeGen models."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext codegen_repl`: the `%%codegen` magics (imported only when loaded)."""
    from codegen_repl.kernel.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from codegen_repl.kernel.magics import unload_ipython_extension as unload

    unload(ipython)
