"""What every command group shares: errors as one line and an exit status, the default dtype."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import TypeVar

import typer

from codegen_repl.errors import CodeGenError

Command = TypeVar("Command", bound=Callable[..., object])


def one_line_paragraphs(command: Command) -> Command:
    """`command` with each paragraph of its docstring on one line, for `--help`: typer's rich
    help keeps the line breaks inside every paragraph after the first (typer 0.2x,
    `rich_utils._fix_linebreaks`), so the docstring's source lines would break it mid-phrase at
    any terminal width; rich wraps a one-line paragraph to the terminal's width."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    command.__doc__ = "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)
    return command


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
