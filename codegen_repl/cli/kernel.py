"""Command-line commands: install-kernel (issue 6). Heavy imports stay inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def install_kernel(
    user: Annotated[
        bool, typer.Option("--user", help="Install for this user (the default).")
    ] = False,
    sys_prefix: Annotated[
        bool, typer.Option("--sys-prefix", help="Install into this Python's environment.")
    ] = False,
    prefix: Annotated[
        Path | None, typer.Option(help="Install under PREFIX/share/jupyter/kernels.")
    ] = None,
    name: Annotated[str, typer.Option(help="The kernelspec's name.")] = "codegen",
    display_name: Annotated[
        str | None, typer.Option(help="The name notebooks show; default from the model.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Checkpoint folder (with config.json) or hub id the kernel loads."),
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="Decoder server URL (the kernel loads no model).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="The server's API key (stored in the kernelspec).")
    ] = None,
) -> None:
    """Install the `codegen` Jupyter kernel: each cell is a step, the model writes the code."""
    from codegen_repl.cli.common import user_errors
    from codegen_repl.core.settings import check_model
    from codegen_repl.errors import ConfigError
    from codegen_repl.kernel.install import KernelInstall, install_kernel

    with user_errors():
        if user + sys_prefix + (prefix is not None) > 1:
            raise ConfigError("give at most one of --user, --sys-prefix and --prefix")
        place = "sys-prefix" if sys_prefix else "prefix" if prefix is not None else "user"
        if model and not server:  # a server's model is a name the server knows
            check_model(model)
        options = KernelInstall(
            name=name, place=place, prefix=prefix, model=model, server=server,
            api_key=api_key, display_name=display_name,
        )  # fmt: skip
        folder = install_kernel(options)
    typer.echo(f"installed kernelspec {name} in {folder}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `codegen-repl` app."""
    app.command("install-kernel")(install_kernel)
