"""Memory plan of a training step, without the hardware.

    python -m dllm.plan --config=experiments/pretrain.py:7b --mesh=fsdp:32 --hbm_gb=95
    python -m dllm.plan --config=experiments/sft.py:7b --mesh=fsdp:8,tensor:2 --remat=none,full,dots
    python -m dllm.plan --config=experiments/midtrain.py:7b --mesh=fsdp:32 --attention=pallas

Lowers and compiles the real train step (the config's model, optimizer, loss, batch
and sharding rules, state donated) for a mesh of fake CPU devices against abstract
arrays (`jax.ShapeDtypeStruct`s carrying shardings: no parameter is ever allocated),
as MaxText's ahead-of-time check does, and prints per-device bytes: parameters,
optimizer state and batch (from their shardings), XLA's temporaries (activations
kept for the backward pass, gradients, collectives' buffers) and the total
(arguments + outputs - donated + temporaries), in GB (10^9 bytes, the unit chip specs
quote HBM in). One row per remat policy asked for. The step is the one the config
runs: the output head's chunked cross-entropy (`model.xent_chunk`) and the attention
path `--attention` names (default the config's `model.attention`, which resolves to
the XLA path on these CPU devices; `pallas` plans the TPU's splash-attention kernel,
compiled here in interpret mode; a step with attention annealing, `loss.anneal_steps`
> 0, takes the XLA path under `pallas` too).

The CPU compiler's temporaries are an estimate for a TPU: the TPU compiler fuses and
lays out differently (usually tighter), so leave a margin.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dllm import cli, data, elbo, kernels, model as model_lib, sharding, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file and variant.",
                                          lock_config=True)
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. 'fsdp:32' or 'data:2,fsdp:8,tensor:2' "
                            "(axes not named are 1); default: the config's mesh.")
_REMAT = flags.DEFINE_list("remat", [], "Remat policies to compare (model.remat: none, "
                           "dots_attention, dots, attention, full); default: the config's.")
_ATTENTION = flags.DEFINE_string("attention", "", "Attention path to plan (model.attention: "
                                 "xla, pallas, ...); default: the config's.")
_HBM = flags.DEFINE_float("hbm_gb", 0.0, "Memory per device (GB = 1e9 bytes, as in chip specs) "
                          "to check the total against.")
_JSON = flags.DEFINE_string("json", None, "Write the rows here as JSON.")
flags.mark_flags_as_required(["config"])

GB = 10 ** 9


def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp:32' / 'data:2,fsdp:8,tensor:2' -> {data, fsdp, tensor} sizes (default 1)."""
    sizes = dict.fromkeys(sharding.MESH_AXES, 1)
    for part in filter(None, spec.split(",")):
        axis, _, size = part.partition(":")
        if axis not in sizes or not size.isdigit():
            raise ValueError(f"--mesh={spec!r}: expected axis:size with axis in "
                             f"{sharding.MESH_AXES}, got {part!r}")
        sizes[axis] = int(size)
    return sizes


def per_device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    def leaf_bytes(x):
        return int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
    return sum(leaf_bytes(x) for x in jax.tree.leaves(abstract_tree))


def abstract_batch(config, mesh) -> dict:
    batch_sharding = sharding.batch_sharding(mesh)
    shapes = data.batch_shapes(config.data, config.train.batch_size)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
            for k, (shape, dtype) in shapes.items()}


def plan(config, devices) -> dict:
    """Compiles the train step of `config` for `devices` (abstract arrays only) and
    returns per-device bytes: params, opt_state, batch, temp, total (+ XLA's raw
    argument / output / alias sizes)."""
    model_cfg = model_lib.config_from_dict(config.model)
    model = model_lib.Transformer(model_cfg)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.rules_from_config(config.mesh)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]      # the batch is split over these
    if config.train.batch_size % replicas:
        raise ValueError(f"train.batch_size={config.train.batch_size} does not split over "
                         f"data x fsdp = {replicas} devices")
    tx, _ = train.make_optimizer(config.train)
    state, state_sh = train.abstract_state(model, tx, mesh, rules)
    batch = abstract_batch(config, mesh)
    # Any token id serves as the mask for planning: memory does not depend on it.
    loss_fn = elbo.stage_loss(config.loss, model_lib.model_apply(model),
                              model_cfg.vocab_size - 1)
    with sharding.activate(mesh, rules):
        step = train.jit_train_step(train.make_train_step(loss_fn, tx), state_sh, mesh)
        mem = step.lower(state, batch).compile().memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    return {"mesh": dict(mesh.shape), "remat": model_cfg.remat,
            "attention": kernels.resolve(model_cfg.attention, model_cfg.dtype),
            "params_count": model_lib.param_count(model_cfg), "seq_len": config.data.seq_len,
            "batch_per_device": config.train.batch_size // replicas,
            "params": per_device_bytes(state.params),
            "opt_state": per_device_bytes(state.opt_state), "batch": per_device_bytes(batch),
            "temp": mem.temp_size_in_bytes, "total": total,
            "argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
            "alias": mem.alias_size_in_bytes}


def format_rows(rows: list[dict], hbm_gb: float = 0.0) -> str:
    """The plan as a table, per device, in GB (MB when every total is under 1 GB)."""
    unit, scale = ("GB", GB) if max(r["total"] for r in rows) >= GB else ("MB", 10 ** 6)
    keys = ("params", "opt_state", "batch", "temp", "total")
    lines = [f"{'mesh':>24} {'remat':>14} {'attention':>9} {'B/dev':>5} "
             + " ".join(f"{k.split('_')[0]:>9}" for k in keys)
             + ("  fits" if hbm_gb else "") + f"    ({unit} per device)"]
    for r in rows:
        mesh = ",".join(f"{a}:{n}" for a, n in r["mesh"].items())
        line = (f"{mesh:>24} {r['remat']:>14} {r['attention']:>9} {r['batch_per_device']:>5} "
                + " ".join(f"{r[k] / scale:9.2f}" for k in keys))
        if hbm_gb:
            line += f"  {'yes' if r['total'] <= hbm_gb * GB else 'NO'}"
        lines.append(line)
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    dcn = config.mesh.get("dcn", None) or {}
    sizes = parse_mesh(_MESH.value) if _MESH.value else {  # the whole axis: within x across slices
        a: config.mesh[a] * dcn.get(a, 1) for a in sharding.MESH_AXES}
    if min(sizes.values()) < 1:
        ici = {a: config.mesh[a] for a in sharding.MESH_AXES}
        raise app.UsageError(f"the config's mesh {ici} has a -1: give every size with --mesh, "
                             "e.g. --mesh=fsdp:32")
    with config.unlocked():  # one flat mesh of fake devices: memory does not depend on slices
        config.mesh.update(sizes, dcn=dict.fromkeys(sharding.MESH_AXES, 1))
        if _ATTENTION.value:
            config.model.attention = _ATTENTION.value
    # Before anything touches a device: that many fake CPU devices.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", int(np.prod(list(sizes.values()))))
    rows = []
    for remat in _REMAT.value or [config.model.remat]:
        with config.unlocked():
            config.model.remat = remat
        try:
            rows.append(plan(config, jax.devices()))
        except ValueError as e:  # a mesh that does not fit the config: say so, no traceback
            raise app.UsageError(str(e)) from None
    print(f"{rows[0]['params_count'] / 1e6:.1f}M parameters, seq_len {rows[0]['seq_len']}"
          + (f", {_HBM.value:g} GB per device" if _HBM.value else ""))
    print(format_rows(rows, _HBM.value))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
