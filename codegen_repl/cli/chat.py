"""`codegen-repl chat`, also the bare `codegen-repl`: the multi-turn REPL.

Its options go through the one settings resolver (codegen_repl.core.settings): these flags over
config.toml over the built-in defaults. Heavy imports stay inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from codegen_repl.cli.common import user_errors

ApiKey = Annotated[
    str | None, typer.Option(envvar="CODEGEN_API_KEY", help="The decoder server's API key.")
]


def register(app: typer.Typer) -> None:
    """Add `chat` to the `codegen-repl` app (which also runs it when no command is given)."""
    app.command()(chat)


def chat(
    model: Annotated[
        str | None, typer.Option(help="A checkpoint folder or a hub id (with --server: its name).")
    ] = None,
    server: Annotated[str | None, typer.Option(help="A decoder server's URL.")] = None,
    api_key: ApiKey = None,
    session: Annotated[
        Path | None, typer.Option(help="The session notebook: resumed if it exists.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Run every snippet (--run auto).")] = False,
    run: Annotated[str | None, typer.Option("--run", help="ask, auto or never.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Most tokens per step.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Text before the first turn.")] = None,
    no_prefix: Annotated[bool, typer.Option("--no-prefix", help="No import prefix.")] = False,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    context_window: Annotated[
        int | None,
        typer.Option(
            "--context", help="With --server: its context window in tokens, if it does not say."
        ),
    ] = None,
) -> None:
    """The multi-turn REPL: write a step, the model writes the code, the kernel runs it.

    Defaults come from config.toml (see `codegen-repl config show`); options override it."""
    from codegen_repl.core.settings import Overrides, merge, resolve
    from codegen_repl.errors import ConfigError
    from codegen_repl.repl.chat import ChatOptions, run_chat
    from codegen_repl.userconfig import UserConfig

    with user_errors():
        if yes and run not in (None, "auto"):
            raise ConfigError(
                f"--yes runs every snippet (--run auto); it conflicts with --run {run}: "
                "give one of them"
            )
        flags = Overrides.of(
            {"model": model, "server": server, "api_key": api_key, "dtype": dtype,
             "run": "auto" if yes else run, "temperature": temperature, "top_p": top_p,
             "max_new_tokens": max_new_tokens, "prefix": "" if no_prefix else prefix,
             "context_window": context_window}
        )  # fmt: skip
        given = merge(flags, UserConfig.load().overrides())
        settings = resolve(given)
        options = ChatOptions(
            model=settings.model, server=settings.server, api_key=settings.api_key,
            session=session, run_mode=settings.run, dtype=settings.dtype, theme=settings.theme,
            images=settings.images, context_window=settings.context_window,
            # Sampling and prefix only where a flag or config.toml sets them: a resumed
            # session keeps its own otherwise (a new one starts from the defaults).
            temperature=given.temperature, top_p=given.top_p,
            max_new_tokens=given.max_new_tokens, prefix=given.prefix,
        )  # fmt: skip
        code = run_chat(options)
    raise typer.Exit(code)
