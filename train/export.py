"""Training checkpoint -> an HF folder (config.json, model.safetensors, tokenizer) that
transformers' CodeGenForCausalLM and `codegen-repl --model OUT_DIR` both load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from codegen_repl.errors import CheckpointError
from codegen_repl.model.tokenizer import EOS_TOKEN, CodeGenTokenizer
from codegen_repl.train import trainer
from codegen_repl.train.config import TrainConfig
from codegen_repl.train.data import TOKENIZER_FILE
from codegen_repl.train.loop import CHECKPOINTS, CONFIG_FILE


def find_checkpoint(path: Path) -> tuple[Path, int]:
    """(run folder, step) for a run folder (its latest checkpoint) or one step's folder."""
    path = Path(path).expanduser()
    if (path / CONFIG_FILE).is_file():
        steps = sorted(int(p.name) for p in (path / CHECKPOINTS).glob("*") if p.name.isdigit())
        if not steps:
            raise CheckpointError(f"{path} has no checkpoints yet; train longer or pick a step")
        return path, steps[-1]
    if path.name.isdigit() and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent, int(path.name)
    raise CheckpointError(
        f"{path} is neither a run folder of `codegen-repl train` (with {CONFIG_FILE}) nor one "
        f"of its {CHECKPOINTS}/STEP folders"
    )


def load_trained_params(run: Path, step: int, config: TrainConfig) -> trainer.Params:
    """The fp32 params saved at `step`, on the first local device (no optimizer state)."""
    import orbax.checkpoint as ocp

    tx = trainer.make_optimizer(config)
    abstract = jax.eval_shape(lambda: trainer.init_state(config, tx)).params
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
    )
    logging.getLogger("absl").setLevel(logging.ERROR)  # read-only notices are not news here
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager((run / CHECKPOINTS).absolute(), options=options) as manager:
        if step not in manager.all_steps():
            raise CheckpointError(f"{run / CHECKPOINTS} has no step {step}: {manager.all_steps()}")
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
        )
    params: trainer.Params = restored["params"]
    return params


def export(checkpoint: Path, out: Path) -> Path:
    """Write the HF folder for a run folder (latest step) or a step folder; returns `out`."""
    from codegen_repl.model.checkpoint import save_hf

    run, step = find_checkpoint(checkpoint)
    config = TrainConfig.load(run / CONFIG_FILE)
    params = load_trained_params(run, step, config)
    host = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), params)
    save_hf(host, config.model, out)
    write_tokenizer(run / TOKENIZER_FILE, out, config)
    (out / "training.json").write_text(
        json.dumps({"run": str(run.absolute()), "step": step}, indent=2) + "\n", encoding="utf-8"
    )
    return out


def write_tokenizer(source: Path, out: Path, config: TrainConfig) -> None:
    """tokenizer.json plus the tokenizer_config.json transformers' AutoTokenizer reads."""
    if not source.is_file():
        raise CheckpointError(f"{source} is missing; the run folder must hold the data tokenizer")
    CodeGenTokenizer.from_file(source).save(out)
    settings = {
        "tokenizer_class": "CodeGenTokenizer",
        "model_max_length": config.model.max_positions,
        "add_prefix_space": False,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", "utf-8")
