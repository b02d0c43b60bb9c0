"""Command-line commands: data build, train and export (issue 9). Heavy imports stay inside the commands."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `codegen-repl` app."""
