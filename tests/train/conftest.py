"""Fixtures of the training tests: a small Python corpus, its packed dataset, tiny configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from codegen_repl.train.config import TrainConfig
from codegen_repl.train.data import BuildConfig, build_dataset


def write_corpus(folder: Path, files: int = 40, seed: int = 0) -> Path:
    """`files` distinct small Python modules (deterministic)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = ["total", "count", "items", "value", "result", "index"]
    for i in range(files):
        functions = []
        for j in range(rng.randint(1, 4)):
            name, other = rng.sample(names, 2)
            functions.append(
                f"def {name}_{i}_{j}({other}):\n"
                f"    {name} = {other} * {rng.randint(0, 99)}\n"
                f"    return {name} + {j}\n"
            )
        (folder / f"module_{i:02d}.py").write_text("\n\n".join(functions), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory, corpus: Path, tokenizer_files: Path) -> Path:
    """The corpus packed at seq_len 32 with the tiny test tokenizer, 10% validation files."""
    out = tmp_path_factory.mktemp("dataset")
    build_dataset(
        BuildConfig(
            sources=(str(corpus),),
            out=out,
            tokenizer=str(tokenizer_files),
            seq_len=32,
            val_fraction=0.1,
            rows_per_shard=16,
        )
    )
    return out


def tiny_config(data: Path, out: Path, *overrides: str, **fields: object) -> TrainConfig:
    """A 2-layer, 64-wide model, fp32 compute (exact comparisons), logging every step."""
    base = ["compute_dtype=float32", "log_every=1", "eval_every=0", "save_every=0"]
    fields = {"steps": 8, "batch_size": 4, **fields}
    return TrainConfig.create(
        "tiny",
        [*base, *overrides],
        data=str(data),
        out=str(out),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """The standard 8-step run (checkpoints and eval at 4 and 8), uninterrupted: the reference
    of the resume test and the checkpoint the export tests export."""

    from codegen_repl.train.loop import train

    out = tmp_path_factory.mktemp("run")
    result = train(tiny_config(dataset, out, "save_every=4", "eval_every=4"), console=quiet())
    return out, result


def quiet():
    """A console that renders into memory (the progress display is not under test)."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), width=120)
