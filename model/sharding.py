"""Where each parameter lives on a device mesh: data / fsdp / tensor axes and NamedSharding rules.

One rule per parameter kind, Megatron-style for the tensor axis (attention heads, the MLP's
hidden units and the vocabulary are split; each block then needs one reduction after `out` and one
after `fc_out`), ZeRO-3/FSDP-style for the fsdp axis (the model dimension is split and gathered
just in time by XLA). A dimension that the mesh axis does not divide is replicated instead, so any
preset runs on any mesh. Training and the decoder server both use these rules.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from codegen_repl.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
DATA, FSDP, TENSOR = AXES

# Parameter kind (the last two names of its path) -> the mesh axis of each dimension.
# Shapes: see modeling.py (qkv [hidden, 3, heads, head_dim], out [heads, head_dim, hidden], ...).
_RULES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("wte", "embedding"): (TENSOR, FSDP),  # [vocab, hidden]
    ("qkv", "kernel"): (FSDP, None, TENSOR, None),
    ("qkv", "scale"): (None, TENSOR, None),  # int8 scales: [3, heads, head_dim]
    ("out", "kernel"): (TENSOR, None, FSDP),
    ("out", "scale"): (None,),
    ("fc_in", "kernel"): (FSDP, TENSOR),  # [hidden, intermediate]
    ("fc_in", "bias"): (TENSOR,),
    ("fc_in", "scale"): (TENSOR,),
    ("fc_out", "kernel"): (TENSOR, FSDP),  # [intermediate, hidden]
    ("fc_out", "bias"): (None,),
    ("fc_out", "scale"): (None,),
    ("lm_head", "kernel"): (FSDP, TENSOR),  # [hidden, vocab]
    ("lm_head", "bias"): (TENSOR,),
    ("lm_head", "scale"): (TENSOR,),
}


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all). One size may be -1: it
    takes all the devices the others leave."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ConfigError(f"mesh sizes must be >= 1, with at most one -1; got {sizes}")
    if -1 in sizes:
        known = int(np.prod([size for size in sizes if size != -1]))
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices do not divide into a mesh of {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(
            f"a mesh of data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices, but {len(devices)} are there; choose sizes whose "
            "product is the device count (or use -1 for one of them)"
        )
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def param_specs(params: dict, mesh: Mesh) -> dict:
    """The PartitionSpec of every leaf of a CodeGen params tree (with or without the top-level
    "params" collection, fp or int8). LayerNorms and unknown leaves are replicated."""

    def spec(path: tuple, leaf: jax.Array) -> PartitionSpec:
        names = [str(getattr(key, "key", key)) for key in path]
        axes = _RULES.get((names[-2], names[-1]), ()) if len(names) >= 2 else ()
        if len(axes) != np.ndim(leaf):
            return PartitionSpec()
        return PartitionSpec(
            *(_fit(axis, size, mesh) for axis, size in zip(axes, leaf.shape, strict=True))
        )

    return jax.tree_util.tree_map_with_path(spec, params)


def _fit(axis: str | None, size: int, mesh: Mesh) -> str | None:
    """The axis, or None (replicate) where the mesh axis is 1 or does not divide the size."""
    if axis is None or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
        return None
    return axis


def param_shardings(params: dict, mesh: Mesh) -> dict:
    """NamedShardings of every leaf (see param_specs)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(params, mesh),
        is_leaf=lambda node: isinstance(node, PartitionSpec),
    )


def shard_params(params: dict, mesh: Mesh) -> dict:
    """Put the params on the mesh, each leaf split by its rule."""
    return jax.device_put(params, param_shardings(params, mesh))


def batch_spec() -> PartitionSpec:
    """Batches [batch, seq] are split over the data and fsdp axes together."""
    return PartitionSpec((DATA, FSDP), None)


def shard_for_decoding(params: dict, num_heads: int) -> tuple[dict, NamedSharding | None]:
    """Tensor-parallel params over all local devices, and the sharding of a KV cache
    [batch, heads, length, head_dim] (heads split as the attention weights are); unchanged,
    and no cache sharding, on one device."""
    if jax.local_device_count() == 1:
        return params, None
    mesh = make_mesh(tensor=-1, devices=jax.local_devices())
    heads = TENSOR if num_heads % mesh.shape[TENSOR] == 0 else None
    return shard_params(params, mesh), NamedSharding(mesh, PartitionSpec(None, heads, None, None))
