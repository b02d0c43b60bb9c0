"""Command-line commands: serve (the decoder server, issue 7). Heavy imports stay inside the commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `codegen-repl` app."""
