"""8 fake CPU devices: data x fsdp x tensor meshes train with the losses of one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# fp32 compute (HIGHEST matmul precision); sharded reductions add in another order, so losses
# may differ in the last bits, growing a little with each optimizer step.
RELATIVE_TOLERANCE = 1e-6  # measured: at most 1.4e-7 over 8 steps
MESHES = ((2, 2, 2), (1, 1, 8))  # all three axes; tensor 8 > 4 heads falls back


@pytest.mark.slow
def test_meshes_match_one_device(dataset: Path, trained_run, tmp_path: Path) -> None:
    _, reference = trained_run  # the same run on this process's single CPU device
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(root),
    }
    command = [
        sys.executable,
        str(Path(__file__).parent / "mesh_run.py"),
        str(dataset),
        str(tmp_path),
    ]
    command += [json.dumps(mesh) for mesh in MESHES]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [tuple(line["mesh"]) for line in lines] == list(MESHES)
    expected = [loss for _, loss in reference.losses]
    for line in lines:
        losses = [loss for _, loss in line["losses"]]
        assert len(losses) == len(expected) == 8
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, expected, strict=True))
        print(f"mesh {line['mesh']}: largest relative loss difference {worst:.2e}")
        assert worst <= RELATIVE_TOLERANCE, (line["mesh"], losses, expected)
    # The rules really split the weights (fsdp on the model dimension, tensor on the MLP units).
    assert lines[0]["specs"]["fc_in"] == "P('fsdp', 'tensor')"
    assert lines[1]["specs"]["fc_out"] == "P('tensor', None)"
