"""Run by test_mesh.py in a subprocess with 8 fake CPU devices: the standard test run on several
data x fsdp x tensor meshes; prints one JSON line per mesh."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import jax
from rich.console import Console

from codegen_repl.train import trainer
from codegen_repl.train.loop import resolve_config, train
from tests.train.conftest import tiny_config


def main(data: Path, out: Path, meshes: list[tuple[int, int, int]]) -> None:
    assert jax.device_count() == 8, jax.devices()
    for data_ways, fsdp, tensor in meshes:
        mesh_settings = [f"mesh_data={data_ways}", f"mesh_fsdp={fsdp}", f"mesh_tensor={tensor}"]
        config = tiny_config(data, out / f"{data_ways}x{fsdp}x{tensor}", *mesh_settings)
        result = train(config, console=Console(file=io.StringIO()))
        resolved = resolve_config(config)[0]
        shardings = trainer.compiled(resolved, trainer.training_mesh(resolved)).shardings
        specs = {
            name: str(shardings.params["block_0"]["mlp"][name]["kernel"].spec)
            for name in ("fc_in", "fc_out")
        }
        line = {"mesh": [data_ways, fsdp, tensor], "losses": result.losses, "specs": specs}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [tuple(json.loads(m)) for m in sys.argv[3:]])
