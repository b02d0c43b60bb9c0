"""The `codegen-repl` command line (typer)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from codegen_repl.errors import CodeGenError

DEFAULT_MODEL = "Salesforce/codegen-350M-mono"

app = typer.Typer(
    name="codegen-repl",
    help="A local-first, multi-turn programming assistant for CodeGen models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def default_dtype() -> str:
    """fp32 on CPU, bf16 on a GPU or TPU."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to complete.")],
    model: Annotated[
        str, typer.Option(help="A checkpoint folder or a hub id.", show_default=True)
    ] = DEFAULT_MODEL,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16; default: auto.")] = "",
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag, commit).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="HF cache folder.")] = None,
) -> None:
    """Complete PROMPT with a CodeGen model and print only the completion."""
    from codegen_repl.model.checkpoint import load_model
    from codegen_repl.model.sampling import SampleParams, generate_tokens
    from codegen_repl.model.tokenizer import CodeGenTokenizer

    try:
        sample = SampleParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )
        loaded = load_model(
            model, dtype=dtype or default_dtype(), revision=revision, cache_dir=cache_dir
        )
        tokenizer = CodeGenTokenizer.from_dir(loaded.path)
        ids = tokenizer.encode(prompt)
        stop = (tokenizer.eos_token_id,)
        printed = ""
        new: list[int] = []
        for token in generate_tokens(loaded.config, loaded.params, ids, sample, stop):
            new.append(token)
            text = tokenizer.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
        sys.stdout.write(tokenizer.decode(new)[len(printed) :])
        sys.stdout.flush()
    except CodeGenError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        raise typer.Exit(130) from None


@app.command()
def version() -> None:
    """Print the version."""
    from codegen_repl import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
