"""`codegen-repl demo`: try the REPL offline on a tiny CodeGen trained here, in about a minute.

The model is trained with the project's own pipeline (train/data.py `build_dataset`, train/loop.py
`train`, train/export.py `export`) on sessions made of the built-in `PAIRS`, so it writes
`PAIRS[step]` for each listed step and knows nothing else. It is cached under
`default_cache_dir()/demo/model-<RECIPE_KEY>`: a changed recipe gets a new key and retrains, and an
interrupted training leaves no folder there (it is built in a temporary folder and renamed).
Heavy imports stay inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from codegen_repl.cli.common import user_errors

# step -> the code the demo model writes for it. Steps are told apart by their first word.
PAIRS: dict[str, str] = {
    "say hello": 'print("hello")',
    "define add": "def add(a, b):\n    return a + b",
    "use add": "print(add(2, 3))",
    "make squares": "squares = [i * i for i in range(5)]\nprint(squares)",
    "divide by zero": "1 / 0",
    "count to three": "for i in range(3):\n    print(i)",
}
# The recipe: corpus size, tokenizer, model shape and optimization. Any change retrains.
RECIPE: dict[str, Any] = {
    "version": 1,
    "sessions": 400,  # distinct sessions of 1..4 turns (build_dataset drops repeats)
    "vocab": 384,
    "seq_len": 128,
    "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "rotary_dim": 8,
              "intermediate_size": 512, "max_positions": 512},
    "train": {"steps": 200, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20,
              "min_lr_ratio": 0.1, "weight_decay": 0.0, "compute_dtype": "float32", "seed": 0},
}  # fmt: skip


def recipe_key() -> str:
    """A short hash of PAIRS and RECIPE: the cache folder's name."""
    text = json.dumps({"pairs": PAIRS, "recipe": RECIPE}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def demo_folder(cache: Path | None = None) -> Path:
    """Where the demo model of the current recipe lives (it may not exist yet)."""
    from codegen_repl.paths import default_cache_dir

    return (cache or default_cache_dir() / "demo") / f"model-{recipe_key()}"


def write_corpus(folder: Path, sessions: int, seed: int = 0) -> None:
    """`sessions` .py files, each a session of 1..4 distinct random turns in the REPL's context
    format (with and without the default prefix); build_dataset appends <|endoftext|>."""
    import numpy as np

    from codegen_repl.core.context import MTPB_PREFIX, TurnText

    rng = np.random.default_rng(seed)
    steps = list(PAIRS)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(sessions):
        chosen = rng.choice(len(steps), size=int(rng.integers(1, 5)), replace=False)
        prefix = (MTPB_PREFIX, "")[int(rng.integers(2))]
        text = prefix + "".join(TurnText(steps[i], PAIRS[steps[i]]).render() for i in chosen)
        (folder / f"session_{index:04d}.py").write_text(text, encoding="utf-8")


def train_demo(work: Path, quiet: bool = False) -> Path:
    """Build the corpus and dataset, train and export into `work`; returns the HF folder.

    Raises KeyboardInterrupt if training was interrupted (no model is exported then)."""
    import io

    from rich.console import Console

    from codegen_repl.train.config import TrainConfig
    from codegen_repl.train.data import BuildConfig, build_dataset
    from codegen_repl.train.export import export
    from codegen_repl.train.loop import train

    write_corpus(work / "corpus", RECIPE["sessions"])
    manifest = build_dataset(
        BuildConfig(
            sources=(str(work / "corpus"),), out=work / "data", seq_len=RECIPE["seq_len"],
            val_fraction=0.0, train_tokenizer=RECIPE["vocab"],
        )
    )  # fmt: skip
    shape = {**RECIPE["model"], "vocab_size": int(manifest["tokenizer"]["vocab_size"])}
    config = TrainConfig.create(
        "tiny", data=str(work / "data"), out=str(work / "run"), eval_every=0, save_every=0,
        keep_checkpoints=1, log_every=50, **RECIPE["train"],
        overrides=[f"model.{key}={value}" for key, value in shape.items()],
    )  # fmt: skip
    console = Console(file=io.StringIO()) if quiet else Console(stderr=True)
    result = train(config, console=console)
    if result.interrupted:
        raise KeyboardInterrupt
    return export(work / "run", work / "model")


def ensure_demo_model(
    cache: Path | None = None, retrain: bool = False, quiet: bool = False
) -> Path:
    """The cached demo model's folder, trained first if missing (or if `retrain`).

    Training happens in a temporary folder beside the cache, renamed into place only when the
    export is complete, so an interrupted run leaves nothing that looks like a model."""
    final = demo_folder(cache)
    if final.is_dir() and not retrain:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".training-", dir=final.parent))
    try:
        model = train_demo(work, quiet=quiet)
        if final.exists():
            shutil.rmtree(final)
        model.rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def banner() -> str:
    """The first lines `demo` prints: what this model can and cannot do."""
    steps = "\n".join(f"  # {step}" for step in PAIRS)
    return (
        "codegen-repl demo: a tiny CodeGen trained on this machine. It knows ONLY these steps "
        "(type them as written); anything else gets nonsense:\n" + steps
    )


def register(app: typer.Typer) -> None:
    """Add `demo` to the `codegen-repl` app."""
    app.command()(demo)


def demo(
    retrain: Annotated[
        bool, typer.Option(help="Train again even if a cached model exists.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Run every snippet (--run auto).")] = False,
    session: Annotated[
        Path | None, typer.Option(help="The session notebook: resumed if it exists.")
    ] = None,
) -> None:
    """Try the REPL offline: train a tiny CodeGen on a handful of known steps (about a minute,
    cached after), then chat with it, greedily. It knows only the steps it lists."""
    from codegen_repl.cli.chat import chat

    typer.echo(banner())
    with user_errors():
        cached = demo_folder().is_dir() and not retrain
        started = time.perf_counter()
        if not cached:
            typer.echo("training it (once; cached after) ...", err=True)
        folder = ensure_demo_model(retrain=retrain)
        if not cached:
            typer.echo(f"trained in {time.perf_counter() - started:.0f} s: {folder}", err=True)
    chat(model=str(folder), session=session, yes=yes, temperature=0.0)
