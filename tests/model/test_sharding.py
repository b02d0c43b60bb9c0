"""Sharding rules: specs per parameter, meshes, and sharded forward passes on 8 fake CPU devices."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from codegen_repl.errors import ConfigError
from codegen_repl.model.config import CodeGenConfig
from codegen_repl.model.modeling import CodeGen, quantize_int8
from codegen_repl.model.sharding import make_mesh, param_specs


def tiny_params(**shape: int) -> dict:
    model = CodeGen(dataclasses.replace(CodeGenConfig.tiny(), **shape))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))


class FakeMesh:
    """param_specs only reads mesh.shape."""

    def __init__(self, **shape: int) -> None:
        self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_specs_split_heads_hidden_units_and_vocabulary() -> None:
    specs = param_specs(tiny_params(), FakeMesh(fsdp=2, tensor=4))["params"]
    assert specs["wte"]["embedding"] == PartitionSpec("tensor", "fsdp")
    assert specs["block_0"]["attn"]["qkv"]["kernel"] == PartitionSpec("fsdp", None, "tensor", None)
    assert specs["block_0"]["attn"]["out"]["kernel"] == PartitionSpec("tensor", None, "fsdp")
    assert specs["block_1"]["mlp"]["fc_in"]["kernel"] == PartitionSpec("fsdp", "tensor")
    assert specs["block_1"]["mlp"]["fc_out"]["bias"] == PartitionSpec(None)
    assert specs["lm_head"]["bias"] == PartitionSpec("tensor")
    assert specs["ln_f"]["scale"] == PartitionSpec()


def test_a_dimension_the_axis_does_not_divide_is_replicated() -> None:
    params = tiny_params(vocab_size=1001)  # tiny has 4 heads: 3 does not divide them either
    specs = param_specs(params, FakeMesh(tensor=3))["params"]
    assert specs["wte"]["embedding"] == PartitionSpec(None, None)
    assert specs["block_0"]["attn"]["qkv"]["kernel"] == PartitionSpec(None, None, None, None)


def test_int8_scales_follow_their_kernels() -> None:
    params = quantize_int8(
        jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), tiny_params()["params"])
    )
    specs = param_specs(params, FakeMesh(tensor=2))
    assert specs["block_0"]["attn"]["qkv"]["scale"] == PartitionSpec(None, "tensor", None)
    assert specs["block_0"]["mlp"]["fc_in"]["scale"] == PartitionSpec("tensor")


def test_mesh_sizes_are_checked() -> None:
    devices = jax.devices()[:1]
    assert make_mesh(data=-1, devices=devices).shape == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="needs 2 devices, but 1 are there"):
        make_mesh(tensor=2, devices=devices)
    with pytest.raises(ConfigError, match="at most one -1"):
        make_mesh(data=-1, tensor=-1, devices=devices)


SHARDED_FORWARD = textwrap.dedent(
    """
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from codegen_repl.model.config import CodeGenConfig
    from codegen_repl.model.modeling import CodeGen
    from codegen_repl.model.sharding import make_mesh, shard_params

    assert jax.device_count() == 8
    model = CodeGen(dataclasses.replace(CodeGenConfig.tiny(), num_heads=8))
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 1000)
    params = model.init(jax.random.key(0), tokens)
    reference, _ = jax.jit(model.apply)(params, tokens)
    for sizes in [(1, 1, 8), (1, 2, 4), (2, 2, 2), (8, 1, 1)]:
        sharded = shard_params(params, make_mesh(*sizes))
        logits, _ = jax.jit(model.apply)(sharded, tokens)
        error = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
        kernel = sharded["params"]["block_0"]["mlp"]["fc_in"]["kernel"]
        shard = kernel.addressable_shards[0].data.shape
        print(sizes, error, len(kernel.sharding.device_set), shard)
        assert error < 1e-4, (sizes, error)
    """
)


@pytest.mark.slow
def test_sharded_forward_equals_unsharded_on_8_devices() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_FORWARD], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    # (1, 2, 4): fc_in [64, 256] split 2 x 4 -> [32, 64] per device
    assert lines[1].endswith("8 (32, 64)")
