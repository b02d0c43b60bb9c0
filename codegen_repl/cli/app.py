"""The `codegen-repl` command line (typer): the app, `generate`, `config` and `version`; the
other command groups register themselves from their modules (chat, serve, benchmarks, kernel,
train). With no command, or with options only, it runs `chat`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from codegen_repl.cli import benchmarks as cli_benchmarks
from codegen_repl.cli import chat as cli_chat
from codegen_repl.cli import demo as cli_demo
from codegen_repl.cli import kernel as cli_kernel
from codegen_repl.cli import serve as cli_serve
from codegen_repl.cli import train as cli_train
from codegen_repl.cli.common import default_dtype, one_line_paragraphs, user_errors
from codegen_repl.core.settings import GENERATE_SAMPLE


class ChatByDefault(TyperGroup):
    """`codegen-repl [OPTIONS]` is `codegen-repl chat [OPTIONS]`: with no command named (only
    options, or nothing), `chat` runs, and takes every option it has."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's click Context
        if args == ["--version"]:  # as most command lines spell it: the `version` command
            return super().parse_args(ctx, ["version"])
        chat_options = not args or (args[0].startswith("-") and args[0] not in ("--help", "-h"))
        return super().parse_args(ctx, ["chat", *args] if chat_options else args)


app = typer.Typer(
    name="codegen-repl",
    cls=ChatByDefault,
    help="A local-first, multi-turn programming assistant for CodeGen models. With no command "
    "(only options, or nothing) it runs `chat`: `codegen-repl --model PATH` is `codegen-repl "
    "chat --model PATH`.",
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli_chat.register(app)


@app.command()
@one_line_paragraphs
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to complete.")],
    model: Annotated[str | None, typer.Option(help="A checkpoint folder or a hub id.")] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Most tokens to generate.")
    ] = GENERATE_SAMPLE.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = GENERATE_SAMPLE.temperature,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling mass (1 = off).")
    ] = GENERATE_SAMPLE.top_p,
    top_k: Annotated[
        int, typer.Option(help="Keep the k likeliest tokens (0 = off).")
    ] = GENERATE_SAMPLE.top_k,
    n: Annotated[int, typer.Option("-n", "--n", help="Number of samples.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    stop: Annotated[list[str] | None, typer.Option(help="A string that ends a sample.")] = None,
    truncate: Annotated[bool, typer.Option(help="Apply CodeGen's truncation rules.")] = False,
    stream: Annotated[bool, typer.Option(help="Print text as it is generated.")] = False,
    int8: Annotated[bool, typer.Option(help="Weight-only int8 quantization.")] = False,
    dtype: Annotated[
        str | None,
        typer.Option(help="float32, bfloat16 or float16."),
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="Hub revision (branch, tag, commit).")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="HF cache folder.")] = None,
    verbose: Annotated[
        bool, typer.Option(help="Say on stderr what runs the model (device, dtype, kernels).")
    ] = False,
) -> None:
    """Complete PROMPT with a CodeGen model, in this process, and print only the completion.

    The model and dtype default to config.toml's, else the built-in ones (`codegen-repl config
    show` prints them); sampling is greedy unless asked (config.toml's sampling is the REPL's).
    With -n above 1, the samples are printed one after another, each followed by a line
    `<|sample-end|>`. On a terminal the output ends with a newline; into a pipe or a file it is
    exactly the completion.
    """
    from codegen_repl.core.settings import Overrides, resolve
    from codegen_repl.decoders.local import LocalDecoder
    from codegen_repl.model import cpu_matmul
    from codegen_repl.model.sample_params import SampleParams
    from codegen_repl.paths import default_cache_dir
    from codegen_repl.userconfig import UserConfig

    with user_errors():
        _check_prompt(prompt)
        config = UserConfig.load()
        chosen = resolve(
            Overrides.of({"model": model, "dtype": dtype}),
            Overrides(model=config.model, dtype=config.dtype),
        )
        sample = SampleParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            n=n, seed=seed, stop=tuple(stop or ()), codegen_rules=truncate,
        )  # fmt: skip
        on_cpu = default_dtype() == "float32"
        if on_cpu and (int8 or chosen.dtype == "bfloat16") and not cpu_matmul.available():
            typer.echo(
                f"note: int8/bf16 weights on CPU save memory but decode slower than fp32 here: "
                f"{cpu_matmul.status()}",
                err=True,
            )
        decoder = LocalDecoder.load(
            chosen.model, dtype=chosen.dtype, int8=int8, revision=revision, cache_dir=cache_dir,
            compilation_cache=default_cache_dir() / "jax",
        )  # fmt: skip
        if verbose:  # and on a CPU, which path the matmuls and the decode attention take
            typer.echo(f"{chosen.model}: {decoder.describe()}", err=True)
        written = ""
        if stream and n == 1:
            for piece in decoder.generate(prompt, sample):
                sys.stdout.write(piece)
                sys.stdout.flush()
                written = (written + piece)[-1:]
        else:
            texts = decoder.complete(prompt, sample)
            ends = "\n<|sample-end|>\n" if n > 1 else ""
            written = "".join(text + ends for text in texts)
            sys.stdout.write(written)
        if sys.stdout.isatty() and not written.endswith("\n"):
            sys.stdout.write("\n")  # the shell's prompt on its own line; a pipe gets the text only
        sys.stdout.flush()


def _check_prompt(prompt: str) -> None:
    """An argument that is not valid UTF-8 reaches us with lone surrogates (Python's
    surrogateescape): say so in one line, before loading a model."""
    from codegen_repl.errors import ConfigError

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(
            f"the prompt is not valid UTF-8 text (byte or character {error.start}); pass text "
            "in UTF-8 (check the terminal's or the file's encoding)"
        ) from None


config_app = typer.Typer(help="The user's config.toml: defaults for the REPL and the kernel.")
app.add_typer(config_app, name="config")


@config_app.command("path")
def config_path() -> None:
    """Print where config.toml is read from."""
    from codegen_repl.paths import config_path

    typer.echo(str(config_path()))


@config_app.command("show")
def config_show() -> None:
    """Print the settings in effect, each with where it comes from (config.toml or default)."""
    import dataclasses

    from codegen_repl import userconfig
    from codegen_repl.core.settings import resolve
    from codegen_repl.userconfig import UserConfig

    with user_errors():
        config = UserConfig.load()
    settings = resolve(config.overrides())
    for field in dataclasses.fields(config):
        source = "default" if getattr(config, field.name) is None else "config.toml"
        value = getattr(settings, field.name)
        if value is None:  # TOML has no null: show the line commented out
            typer.echo(f"# {field.name} = (not set)  # {source}")
        else:
            typer.echo(f"{field.name} = {userconfig.toml_value(value)}  # {source}")


@config_app.command("init")
def config_init(
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a config.toml with every key documented (commented out)."""
    from codegen_repl import userconfig
    from codegen_repl.paths import config_path

    path = config_path()
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


for _commands in (cli_serve, cli_benchmarks, cli_kernel, cli_train, cli_demo):
    _commands.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
