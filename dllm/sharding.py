"""Device mesh, logical-axis rules and shardings of the train state.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallel,
parameters and optimizer state sharded too) and `tensor` (heads / MLP / vocab
split across devices). Modules name their axes logically ("embed", "heads",
"batch", ...); the rules below map those names onto mesh axes, so one model
definition serves every mesh from one CPU to a pod.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). Names missing here stay replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("layers", None),
    ("length", None),
    ("head_dim", None),
    ("act_embed", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from config; one size may be -1 (fills the rest)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide "
                             f"{num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, {num_devices} available")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh with Auto axis types (logical-rule sharding needs them)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(mesh_cfg) -> tuple:
    """Logical rules: config.mesh.rules if given (list of [name, axes]), else the defaults."""
    rules = mesh_cfg.get("rules", None)
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
    """Context in which jitted functions trace with the mesh and logical rules."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned
    (unannotated leaves are replicated)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
