"""Multi-host start-up, device mesh, logical-axis rules and shardings.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallel,
parameters and optimizer state sharded too) and `tensor` (heads / MLP / vocab
split across devices), each of size ici x dcn (within x across slices). Modules
name their axes logically ("embed", "heads", "batch", ...); the rules (config.mesh.rules,
default DEFAULT_RULES) map those names onto mesh axes, so one model definition serves
every mesh from one CPU to a multi-slice pod.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
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


def initialize_distributed(dist_cfg) -> None:
    """Join JAX's multi-controller runtime; call before anything touches devices.

    `dist_cfg` = config.distributed. With `coordinator_address` ("host:port") set:
    `num_processes` processes, this one `process_id`. Empty: what
    `jax.distributed.initialize()` detects itself (Cloud TPU VMs and GKE, SLURM, Open
    MPI, ...); where it detects nothing, one process. Waits at most `timeout_s` for
    the other processes.
    """
    if jax.distributed.is_initialized():
        return
    timeout = int(dist_cfg.timeout_s)
    if dist_cfg.coordinator_address:
        jax.distributed.initialize(dist_cfg.coordinator_address, int(dist_cfg.num_processes),
                                   int(dist_cfg.process_id), initialization_timeout=timeout)
        return
    try:
        jax.distributed.initialize(initialization_timeout=timeout)
    except ValueError as e:  # no cluster environment: it cannot name a coordinator
        if "coordinator_address" not in str(e):
            raise
        logging.info("no cluster environment detected: one process")


def mesh_shape(sizes_cfg, count: int, name: str = "config.mesh",
               unit: str = "devices") -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes over `count` devices (or slices) from config; one
    size may be -1 (fills the rest)."""
    sizes = [int(sizes_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"{name}: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if count % known:
            raise ValueError(f"{name} {dict(zip(MESH_AXES, sizes))} does not divide "
                             f"{count} {unit}")
        sizes[sizes.index(-1)] = count // known
    if int(np.prod(sizes)) != count:
        raise ValueError(f"{name} {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"{unit}, {count} available")
    return tuple(sizes)


def device_grid(mesh_cfg, devices) -> np.ndarray:
    """The devices arranged as a (data, fsdp, tensor) array.

    `mesh_cfg.data/fsdp/tensor` are the sizes within a slice (ICI); `mesh_cfg.dcn`
    (optional, same keys, default all 1) are the sizes across slices (DCN), so an
    axis spans ici x dcn devices. Slices are the devices' `slice_index` (TPU
    multi-slice), or processes where all devices are in one slice (GPU / CPU hosts).
    """
    dcn_cfg = mesh_cfg.get("dcn", None) or {a: 1 for a in MESH_AXES}
    if all(int(dcn_cfg[a]) == 1 for a in MESH_AXES):   # one slice: one topology-aware grid
        return mesh_utils.create_device_mesh(mesh_shape(mesh_cfg, len(devices)), devices,
                                             allow_split_physical_axes=True)
    by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
    num_slices = len({d.process_index if by_process else d.slice_index for d in devices})
    dcn = mesh_shape(dcn_cfg, num_slices, "config.mesh.dcn", "slices")
    ici = mesh_shape(mesh_cfg, len(devices) // num_slices, "config.mesh (per slice)")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                                allow_split_physical_axes=True)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh with Auto axis types (logical-rule sharding needs them)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(device_grid(mesh_cfg, devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


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


def abstract_arrays(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (restore and
    compile targets: no array is allocated)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's numpy batch -> global jax.Arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
