"""`codegen-repl serve`: the decoder server. Heavy imports stay inside the command."""

from __future__ import annotations

from typing import Annotated

import typer

from codegen_repl.core.settings import DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `codegen-repl` app."""
    app.command()(serve)


def serve(
    model: Annotated[str, typer.Option(help="A checkpoint folder or a hub id.")] = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Address to listen on; other than loopback needs an API key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CODEGEN_API_KEY",
            help="Clients must send 'Authorization: Bearer KEY' (env: CODEGEN_API_KEY).",
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option(help="Samples decoded together (slots of the batched KV cache).")
    ] = 16,
    max_concurrency: Annotated[
        int, typer.Option(help="Requests running or queued; more get 429.")
    ] = 64,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16; default: auto.")] = "",
    int8: Annotated[bool, typer.Option(help="Weight-only int8 quantization.")] = False,
) -> None:
    """Serve the model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions)."""
    from codegen_repl.cli.common import user_errors
    from codegen_repl.core.settings import check_model

    with user_errors():
        check_model(model)  # before the server starts: a bad model is one line and status 2
        from codegen_repl.serve.app import ServerConfig, run_server
        from codegen_repl.serve.engine import EngineConfig

        config = ServerConfig(
            model=model,
            host=host,
            port=port,
            api_key=api_key or None,
            engine=EngineConfig(max_batch=max_batch, max_concurrency=max_concurrency),
            dtype=dtype or None,
            int8=int8,
        )
        typer.echo(
            f"serving {model} on http://{host}:{port}/v1 (OpenAI completions and chat); "
            "loading the model, /health says when it is ready",
            err=True,
        )
        run_server(config)
