"""The `codegen-repl` command line (typer)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from codegen_repl import cli_benchmarks, cli_kernel, cli_serve, cli_train
from codegen_repl.errors import CodeGenError

DEFAULT_MODEL = "Salesforce/codegen-350M-mono"

app = typer.Typer(
    name="codegen-repl",
    help="A local-first, multi-turn programming assistant for CodeGen models.",
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    from codegen_repl.decoder import LocalDecoder, default_cache_dir
    from codegen_repl.model.sampling import SampleParams

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


RunMode = Annotated[str, typer.Option("--run", help="ask, auto or never.")]


@app.callback(invoke_without_command=True)
def start(ctx: typer.Context) -> None:
    """With no command, start the chat REPL with its defaults."""
    if ctx.invoked_subcommand is None:
        chat()


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="A checkpoint folder or a hub id.")] = DEFAULT_MODEL,
    session: Annotated[
        Path | None, typer.Option(help="The session notebook: resumed if it exists.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Run every snippet (--run auto).")] = False,
    run: RunMode = "ask",
    temperature: Annotated[float | None, typer.Option(help="0 = greedy.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Most tokens per step.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Text before the first turn.")] = None,
    no_prefix: Annotated[bool, typer.Option("--no-prefix", help="No import prefix.")] = False,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16; default: auto.")] = "",
) -> None:
    """The multi-turn REPL: write a step, the model writes the code, the kernel runs it."""
    from codegen_repl.repl import ChatOptions, run_chat

    with user_errors():
        options = ChatOptions(
            model=model, session=session, run_mode="auto" if yes else run, temperature=temperature,
            top_p=top_p, max_new_tokens=max_new_tokens, prefix="" if no_prefix else prefix,
            dtype=dtype or None,
        )  # fmt: skip
        code = run_chat(options)
    raise typer.Exit(code)


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
