"""Scaling of the train step over the devices of one host: step time, tokens/s per
device and the communication share, per preset and device count.

    python benchmarks/scaling.py [--presets=tiny,100m] [--devices=1,2,4,8] [--axis=fsdp]
                                 [--steps=3] [--json OUT]

The step is the real one (`train.make_train_step` on the pretraining ELBO, state
donated), jitted over a mesh of the first n devices with every device on `--axis`
(fsdp: parameters, gradients and optimizer state sharded, the 7B recipe's layout),
and the same global batch for every n. The communication share is the time in
collective ops (all-gather, reduce-scatter, all-reduce, ...) over the time in all ops,
summed over the devices' threads in a profile of two steps.

On CPU there are 8 fake devices (set here before jax starts) sharing the host's cores:
the step time over n devices measures the partitioning overhead, not a speed-up, and
the communication share includes waiting at a collective for devices the shared cores
have not run yet. On a GPU / TPU host the real devices are used, in bfloat16, and MFU
per device is reported against a bfloat16 matmul ceiling timed in the same run.
"""
import argparse
import glob
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.train_step import compiled_step, device_name, time_steps  # noqa: E402
from dllm import config as config_lib, metrics, model as model_lib, sharding  # noqa: E402

# (preset, global batch, sequence length): batches divide 8 devices.
SHAPES = {"tiny": (32, 128), "100m": (8, 128)}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def build_step(preset: str, n: int, axis: str, dtype: str):
    """(jitted step, state, batch) of `preset` on a mesh of the first n devices."""
    batch, seq = SHAPES[preset]
    config = config_lib.base_config(preset)
    config.model.dtype = dtype
    config.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, axis: n})
    return compiled_step(config, n, batch, seq)


def op_names(compiled) -> set[str]:
    """Names of the HLO instructions whose profile events do not nest others' (not
    loops or calls): the ops whose times add up to the step's device time."""
    ops = re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\(",
                     compiled.as_text(), flags=re.M)
    return {name for name, opcode in ops if opcode not in ("while", "call", "conditional")}


def comm_share(step, state, data, names: set[str]) -> tuple[float, object]:
    """Share of op time in collectives over 2 profiled steps; returns (share, state)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(2):
            state, m = step(state, data)
            jax.block_until_ready(m)
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
        profile = jax.profiler.ProfileData.from_file(path)
    total = comm = 0
    for plane in profile.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in names:
                    total += ev.duration_ns
                    comm += ev.duration_ns if ev.name.startswith(COLLECTIVES) else 0
    return comm / max(total, 1), state


def bench(preset: str, n: int, axis: str, steps: int, dtype: str) -> dict:
    step, state, data = build_step(preset, n, axis, dtype)
    step_s, state = time_steps(step, state, data, steps)
    share, state = comm_share(step, state, data, op_names(step))
    batch, seq = SHAPES[preset]
    return {"preset": preset, "devices": n, "axis": axis, "batch": batch, "seq_len": seq,
            "step_s": step_s, "tokens_per_s_per_device": batch * seq / step_s / n,
            "comm_share": share}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,100m")
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--axis", default="fsdp", choices=sharding.MESH_AXES)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    accelerator = jax.devices()[0].platform != "cpu"
    dtype = "bfloat16" if accelerator else "float32"
    counts = [n for n in map(int, args.devices.split(",")) if n <= jax.device_count()]
    rows = [bench(preset, n, args.axis, args.steps, dtype)
            for preset in args.presets.split(",") for n in counts]
    if accelerator:  # MFU per device against a matmul timed here, in the step's dtype
        ceiling = metrics.matmul_ceiling(dtype, n=4096, reps=10)
        for r in rows:
            cfg = model_lib.config_from_dict(config_lib.base_config(r["preset"]).model)
            r["mfu"] = (model_lib.flops_per_token(cfg, r["seq_len"])
                        * r["tokens_per_s_per_device"] / ceiling)
    device = device_name()
    print(f"device: {device}; mesh axis: {args.axis}; dtype {dtype}")
    print(f"{'preset':>6} {'devices':>7} {'B x S':>9} {'step s':>8} {'tok/s/dev':>10} "
          f"{'comm':>6}" + (f" {'MFU':>6}" if accelerator else ""))
    for r in rows:
        print(f"{r['preset']:>6} {r['devices']:>7} {r['batch']:>4}x{r['seq_len']:<4} "
              f"{r['step_s']:8.3f} {r['tokens_per_s_per_device']:10.0f} "
              f"{r['comm_share']:6.1%}" + (f" {r['mfu']:6.1%}" if accelerator else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "dtype": dtype, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
