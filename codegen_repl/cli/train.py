"""Command-line commands: `data build`, `train` and `export` (issue 9).

Heavy imports (JAX, grain, orbax) stay inside the commands so `codegen-repl --help` is fast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from codegen_repl.train.data import BuildConfig
    from codegen_repl.train.loop import TrainResult

data_app = typer.Typer(help="Build a tokenized, packed training corpus.", no_args_is_help=True)


@data_app.command("build")
def data_build(
    source: Annotated[
        list[str], typer.Option(help="A folder, file or glob of .py / .ipynb files (repeatable).")
    ],
    out: Annotated[Path, typer.Option(help="The dataset folder to write.")],
    tokenizer: Annotated[
        str | None, typer.Option(help="Model folder, hub id or tokenizer.json.")
    ] = None,
    train_tokenizer: Annotated[
        int | None, typer.Option(help="Train a byte-level BPE of this many ids instead.")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per packed sequence.")] = 2048,
    val_fraction: Annotated[float, typer.Option(help="Share of files for validation.")] = 0.01,
    max_file_bytes: Annotated[int, typer.Option(help="Skip larger files.")] = 1_000_000,
    rows_per_shard: Annotated[int, typer.Option(help="Sequences per shard file.")] = 4096,
) -> None:
    """Collect .py files and .ipynb code cells, drop duplicates and generated or minified files,
    tokenize, append <|endoftext|>, pack into sequences and write shards plus manifest.json."""
    from rich.console import Console

    from codegen_repl.cli.common import user_errors
    from codegen_repl.train.data import BuildConfig

    console = Console(stderr=True)
    with user_errors():
        config = BuildConfig(
            sources=tuple(source), out=out, tokenizer=tokenizer, seq_len=seq_len,
            val_fraction=val_fraction, max_file_bytes=max_file_bytes,
            rows_per_shard=rows_per_shard, train_tokenizer=train_tokenizer,
        )  # fmt: skip
        manifest = _build_with_progress(config, console)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    skipped = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items() if v) or "none"
    typer.echo(
        f"{out}: {train['documents']} train files ({train['tokens']:,} tokens, {train['rows']} "
        f"sequences), {val['documents']} validation files ({val['tokens']:,} tokens); "
        f"skipped: {skipped}"
    )


def _build_with_progress(config: BuildConfig, console: Console) -> dict[str, Any]:
    """build_dataset with a rich progress bar on stderr."""
    from rich.progress import Progress

    from codegen_repl.train.data import build_dataset

    with Progress(console=console, transient=True) as progress:

        def start(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        return build_dataset(config, progress=start)


def train(
    data: Annotated[Path, typer.Option(help="A `codegen-repl data build` folder.")],
    out: Annotated[Path, typer.Option(help="The run folder; an existing run resumes.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value settings, e.g. lr=1e-4 grad_accum=4 model.num_layers=4"),
    ] = None,
    preset: Annotated[str, typer.Option(help="tiny, 350M, 2B, 6B or 16B.")] = "tiny",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps in the run.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch in sequences.")] = None,
    init_from: Annotated[
        str | None, typer.Option(help="Fine-tune from this HF checkpoint (folder or hub id).")
    ] = None,
) -> None:
    """Train or fine-tune a CodeGen model; Ctrl-C saves a checkpoint, rerunning resumes."""
    from codegen_repl.cli.common import user_errors

    with user_errors():
        from codegen_repl.train.loop import initialize_distributed

        initialize_distributed()  # before anything touches a device
        result = _run_training(data, out, overrides or [], preset, steps, batch_size, init_from)
    if result.interrupted:
        typer.echo(
            f"interrupted at step {result.step}; checkpoint saved in {result.checkpoint}. "
            "Run the same command to resume.",
            err=True,
        )
        raise typer.Exit(130)
    typer.echo(f"done: {result.step} steps; checkpoint {result.checkpoint}")


def _run_training(
    data: Path,
    out: Path,
    overrides: list[str],
    preset: str,
    steps: int | None,
    batch_size: int | None,
    init_from: str | None,
) -> TrainResult:
    from codegen_repl.train.config import TrainConfig
    from codegen_repl.train.loop import train as run_train

    model = None
    if init_from is not None:
        from codegen_repl.model.checkpoint import read_config, resolve_checkpoint

        model = read_config(resolve_checkpoint(init_from))
    config = TrainConfig.create(
        preset, overrides, data=str(data), out=str(out), steps=steps, batch_size=batch_size,
        init_from=init_from, model=model,
    )  # fmt: skip
    return run_train(config)


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A run folder (latest step) or a step folder.")
    ],
    out_dir: Annotated[Path, typer.Argument(help="The HF folder to write.")],
) -> None:
    """Write a training checkpoint as an HF folder (config.json, safetensors, tokenizer)."""
    from codegen_repl.cli.common import user_errors

    with user_errors():
        from codegen_repl.train.export import export as run_export

        run_export(checkpoint, out_dir)
    typer.echo(f"exported to {out_dir}; try: codegen-repl generate --model {out_dir} 'def '")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `codegen-repl` app."""
    app.add_typer(data_app, name="data")
    app.command(
        "train", context_settings={"allow_extra_args": False, "ignore_unknown_options": False}
    )(train)
    app.command("export")(export)
