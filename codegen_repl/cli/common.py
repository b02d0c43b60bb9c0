"""What every command group shares: errors as one line and an exit status, the default dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from codegen_repl.errors import CodeGenError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Our errors as one line and exit status 2, Ctrl-C as status 130; never a traceback."""
    try:
        yield
    except CodeGenError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


def default_dtype() -> str:
    """fp32 on CPU, bf16 on a GPU or TPU."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
