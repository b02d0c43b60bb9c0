"""The `codegen-repl` command line (typer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from codegen_repl.cli import benchmarks as cli_benchmarks
from codegen_repl.cli import kernel as cli_kernel
from codegen_repl.cli import serve as cli_serve
from codegen_repl.cli import train as cli_train
from codegen_repl.cli.common import default_dtype, user_errors
from codegen_repl.userconfig import DEFAULT_MODEL

T = TypeVar("T")

app = typer.Typer(
    name="codegen-repl",
    help="A local-first, multi-turn programming assistant for CodeGen models.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to complete.")],
    model: Annotated[str, typer.Option(help="A checkpoint folder or a hub id.")] = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 0.95,
    top_k: Annotated[int, typer.Option(help="Keep the k likeliest tokens (0 = off).")] = 0,
    n: Annotated[int, typer.Option("-n", "--n", help="Number of samples.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="A string that ends a sample.")] = None,
    truncate: Annotated[bool, typer.Option(help="Apply CodeGen's truncation rules.")] = False,
    stream: Annotated[bool, typer.Option(help="Print text as it is generated.")] = False,
    int8: Annotated[bool, typer.Option(help="Weight-only int8 quantization.")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16; default: auto.")] = "",
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag, commit).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="HF cache folder.")] = None,
) -> None:
    """Complete PROMPT with a CodeGen model and print only the completion.

    With -n above 1, the samples are printed one after another, each followed by a line
    `<|sample-end|>`.
    """
    from codegen_repl.decoders.local import LocalDecoder
    from codegen_repl.model.sample_params import SampleParams
    from codegen_repl.userconfig import default_cache_dir

    with user_errors():
        sample = SampleParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            n=n,
            seed=seed,
            stop=tuple(stop or ()),
            codegen_rules=truncate,
        )
        if int8 and default_dtype() == "float32":
            typer.echo(
                "note: --int8 on CPU saves memory but decodes slower than fp32 (XLA's CPU "
                "backend has no fast int8 matmul); it pays off on GPUs",
                err=True,
            )
        decoder = LocalDecoder.load(
            model,
            dtype=dtype or None,
            int8=int8,
            revision=revision,
            cache_dir=cache_dir,
            compilation_cache=default_cache_dir() / "jax",
        )
        if stream and n == 1:
            for piece in decoder.generate(prompt, sample):
                sys.stdout.write(piece)
                sys.stdout.flush()
        else:
            texts = decoder.complete(prompt, sample)
            ends = "\n<|sample-end|>\n" if n > 1 else ""
            sys.stdout.write("".join(text + ends for text in texts))
        sys.stdout.flush()


RunMode = Annotated[str | None, typer.Option("--run", help="ask, auto or never.")]
ApiKey = Annotated[
    str | None, typer.Option(envvar="CODEGEN_API_KEY", help="The decoder server's API key.")
]


@app.callback(invoke_without_command=True)
def start(ctx: typer.Context) -> None:
    """With no command, start the chat REPL with its defaults."""
    if ctx.invoked_subcommand is None:
        chat()


@app.command()
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
    run: RunMode = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Most tokens per step.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Text before the first turn.")] = None,
    no_prefix: Annotated[bool, typer.Option("--no-prefix", help="No import prefix.")] = False,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
) -> None:
    """The multi-turn REPL: write a step, the model writes the code, the kernel runs it.

    Defaults come from config.toml (see `codegen-repl config path`); options override it."""
    from codegen_repl.repl.chat import ChatOptions, run_chat
    from codegen_repl.userconfig import UserConfig

    with user_errors():
        config = UserConfig.load()
        options = ChatOptions(
            model=model or config.model or ("" if server or config.server else DEFAULT_MODEL),
            server=server or config.server,
            api_key=api_key,
            session=session,
            run_mode="auto" if yes else run or config.run,
            temperature=_first(temperature, config.temperature),
            top_p=_first(top_p, config.top_p),
            max_new_tokens=_first(max_new_tokens, config.max_new_tokens),
            prefix="" if no_prefix else _first(prefix, config.prefix),
            dtype=dtype or config.dtype,
            theme=config.theme,
            images=config.images,
        )
        code = run_chat(options)
    raise typer.Exit(code)


def _first(given: T | None, configured: T | None) -> T | None:
    return configured if given is None else given


config_app = typer.Typer(help="The user's config.toml: defaults for the REPL and the kernel.")
app.add_typer(config_app, name="config")


@config_app.command("path")
def config_path() -> None:
    """Print where config.toml is read from."""
    from codegen_repl.userconfig import config_path

    typer.echo(str(config_path()))


@config_app.command("show")
def config_show() -> None:
    """Print the settings in effect (config.toml over the defaults)."""
    import dataclasses

    from codegen_repl.userconfig import UserConfig

    with user_errors():
        config = UserConfig.load()
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        typer.echo(f"{field.name} = {value!r}" if value is not None else f"{field.name}: not set")


@config_app.command("init")
def config_init(
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a config.toml with every key documented (commented out)."""
    from codegen_repl import userconfig

    path = userconfig.config_path()
    if path.exists() and not force:
        typer.echo(f"error: {path} exists; edit it, or pass --force to overwrite it", err=True)
        raise typer.Exit(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(userconfig.template(), encoding="utf-8")
    typer.echo(str(path))


@app.command()
def version() -> None:
    """Print the version."""
    from codegen_repl import __version__

    typer.echo(__version__)


for _commands in (cli_serve, cli_benchmarks, cli_kernel, cli_train):
    _commands.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
