"""Training-step speed: tokens/s, step time, memory and MFU per model preset.

    python benchmarks/train_step.py [--presets=tiny,100m] [--json OUT]

MFU = (training FLOPs per token x tokens/s) / ceiling, where the ceiling is a large
jitted float32 matmul timed in the same run on the same device (see DESIGN.md). The
step is the real one: `train.make_train_step` on the pretraining ELBO loss, jitted with
donated state over a one-device mesh.
"""
import argparse
import json
import platform
import resource
import statistics
import subprocess
import time

import jax
import numpy as np

from dllm import config as config_lib, elbo, metrics, model as model_lib, sharding, train

# (preset, global batch, sequence length)
SHAPES = {"tiny": (32, 128), "100m": (4, 512)}


def device_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{jax.devices()[0].platform}: {model}, {jax.device_count()} device(s)"


def time_steps(step, state, data, steps: int):
    """(median seconds per step over `steps` steps after a warm-up, final state)."""
    state, m = step(state, data)          # warm-up (and first-call overheads)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def bench_preset(name: str, steps: int, ceiling: float) -> dict:
    batch, seq = SHAPES[name]
    config = config_lib.base_config(name)
    model_cfg = model_lib.config_from_dict(config.model)
    model = model_lib.Transformer(model_cfg)
    tx, _ = train.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    state, shardings = train.init_state(model, tx, 0, mesh, sharding.DEFAULT_RULES)
    mask_id = model_cfg.vocab_size - 1
    loss_fn = elbo.stage_loss(config.loss, model_lib.model_apply(model), mask_id)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        step = train.jit_train_step(train.make_train_step(loss_fn, tx), shardings, mesh)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, mask_id, (batch, seq), dtype=np.int32)
        data = sharding.global_batch({"tokens": tokens}, mesh)
        compiled = step.lower(state, data).compile()
        mem = compiled.memory_analysis()
        step_s, state = time_steps(step, state, data, steps)
    tokens_per_s = batch * seq / step_s
    flops = model_lib.flops_per_token(model_cfg, seq) * tokens_per_s
    return {
        "preset": name, "params": model_lib.param_count(model_cfg), "batch": batch,
        "seq_len": seq, "step_s": step_s, "tokens_per_s": tokens_per_s,
        "achieved_flops": flops, "ceiling_flops": ceiling, "mfu": flops / ceiling,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,100m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    ceiling = metrics.matmul_ceiling("float32", n=2048, reps=10)
    rows = [bench_preset(p, args.steps, ceiling) for p in args.presets.split(",")]
    device = device_name()
    print(f"device: {device}\nceiling: float32 2048^3 matmul = {ceiling / 1e9:.1f} GFLOP/s")
    print(f"{'preset':>6} {'params':>8} {'B x S':>9} {'step s':>8} {'tok/s':>9} "
          f"{'GFLOP/s':>8} {'MFU':>6} {'temp MB':>8} {'peak RSS MB':>11}")
    for r in rows:
        print(f"{r['preset']:>6} {r['params'] / 1e6:7.1f}M {r['batch']:>4}x{r['seq_len']:<4} "
              f"{r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['achieved_flops'] / 1e9:8.1f} "
              f"{r['mfu']:6.1%} {(r['temp_bytes'] or 0) / 2**20:8.1f} "
              f"{r['peak_rss_bytes'] / 2**20:11.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "ceiling_flops": ceiling, "presets": rows}, f, indent=2)


if __name__ == "__main__":
    main()
