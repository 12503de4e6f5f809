"""Training-step speed and memory of dllm beside its PyTorch peer, on whatever
backend is present.

    python benchmarks/train_step.py [--presets tiny,100m] [--remat none,dots]
                                    [--param_dtype float32,bfloat16]
                                    [--peer mask,nomask] [--steps 5] [--json OUT]

Defaults: on CPU the tiny (32 x 128) and 100m (4 x 512) presets in float32; on a GPU /
TPU the qwen2.5-coder-1.5b shape made bidirectional at 4 x 2048 in bfloat16 (float32
parameters and Adam state). The dllm step is the real one (`train.make_train_step`
on the pretraining ELBO, AdamW, state donated, one-device mesh; attention path
`model.attention=auto`); the peer is benchmarks/torch_peer.py (transformers Qwen2
of the same shape, full attention mask or none, same loss, AdamW).

Each phase times its calls in turn with the ceiling, `steps` times after a warm-up,
and reports medians; a row's MFU is against its own phase's ceiling, so a shared
machine's load falls on both alike. Phases: each torch peer alone (freed before the
next), then the dllm rows (a 1.5B dllm state and a peer do not fit one device
together once JAX's allocator has grown). The ceiling is a jitted matmul on random
operands in the step's dtype (2048^2 on CPU, 8192^2 on an accelerator). MFU = model
FLOPs per token (`model.flops_per_token`: 3 x forward, full bidirectional attention)
x tokens/s / ceiling. On CPU the same ratio from process CPU time is given too
(`mfu_cpu`: what other processes' load cannot inflate). Memory: XLA's plan of the
compiled step (arguments + outputs - donated + temporaries) and the device's peak
where the backend reports one (JAX's peak so far in this process, read after each
dllm row is built: the first row's is its own, a later row's includes the rows
before it; each peer's torch.cuda.max_memory_allocated since it was made).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dllm import config as config_lib, elbo, metrics, model as model_lib, sharding, train  # noqa: E402

# (global batch, sequence length) per preset
SHAPES = {"tiny": (32, 128), "100m": (4, 512), "qwen2.5-coder-1.5b": (4, 2048)}


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{d.platform}: {d.device_kind}, {jax.device_count()} device(s)"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                     if l.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"cpu: {model}, {os.cpu_count()} cores, {jax.device_count()} device(s)"


def time_steps(step, state, data, steps: int):
    """(median seconds per step over `steps` steps after a warm-up, final state): the
    step timed alone (benchmarks/scaling.py)."""
    state, m = step(state, data)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        (wall, _), (state, m) = time_call(lambda: step(state, data))
        times.append(wall)
    return statistics.median(times), state


def time_call(fn):
    """((wall s, CPU s), output) of fn() with its output ready."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def compiled_step(config, n_devices: int, batch: int, seq: int):
    """(compiled ELBO train step, state, random batch [batch, seq]) of `config` on a mesh
    of the first n_devices devices (config.mesh)."""
    model = model_lib.Transformer(model_lib.config_from_dict(config.model))
    tx, _ = train.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:n_devices])
    state, shardings = train.init_state(model, tx, 0, mesh, sharding.DEFAULT_RULES)
    vocab = config.model.vocab_size
    loss_fn = elbo.stage_loss(config.loss, model_lib.model_apply(model), vocab - 1)
    tokens = np.random.default_rng(0).integers(0, vocab - 1, (batch, seq), dtype=np.int32)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        step = train.jit_train_step(train.make_train_step(loss_fn, tx), shardings, mesh)
        data = sharding.global_batch({"tokens": tokens}, mesh)
        return step.lower(state, data).compile(), state, data


def preset_config(preset: str, dtype: str, remat: str, param_dtype: str = "float32"):
    """The base config of `preset` made bidirectional, in `dtype` compute."""
    config = config_lib.base_config(preset)
    config.model.update(causal=False, dtype=dtype, remat=remat, param_dtype=param_dtype)
    return config


class DllmStep:
    """The jitted train step of a preset (bidirectional, compute `dtype`, `remat`,
    parameters in `param_dtype`; Adam state float32) with its state and a random
    batch; `timed()` runs one step."""

    def __init__(self, preset: str, batch: int, seq: int, dtype: str, remat: str,
                 param_dtype: str = "float32"):
        config = preset_config(preset, dtype, remat, param_dtype)
        self.step, self.state, self.data = compiled_step(config, 1, batch, seq)
        mem = self.step.memory_analysis()
        self.memory = {k: getattr(mem, f"{k}_size_in_bytes", None)
                       for k in ("argument", "output", "alias", "temp")}
        self.memory["plan"] = (self.memory["argument"] + self.memory["output"]
                               - self.memory["alias"] + self.memory["temp"])
        self.timed()  # warm-up

    def timed(self) -> tuple[float, float]:
        (times, (self.state, _)) = time_call(lambda: self.step(self.state, self.data))
        return times


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def bench_preset(preset: str, args, accelerator: bool) -> list[dict]:
    batch, seq = args.batch or SHAPES[preset][0], args.seq or SHAPES[preset][1]
    dtype = "bfloat16" if accelerator else "float32"
    ceiling = metrics.MatmulTimer(dtype, 8192 if accelerator else 2048)
    cfg = model_lib.config_from_dict(preset_config(preset, dtype, "none").model)
    times, peaks, memory = {}, {}, {}

    def interleave(phase: str, calls: dict):
        """Times the ceiling and `calls` in turn; the phase's ceiling is its own."""
        calls = {f"ceiling {phase}": ceiling, **calls}
        for _ in range(args.steps):
            for k, fn in calls.items():
                for _ in range(5 if k.startswith("ceiling") else 1):  # short: more samples
                    times.setdefault(k, []).append(fn())
        return {k: phase for k in calls}

    phase_of = {}
    for attention in args.peer:   # each peer alone on the device, then freed
        from benchmarks.torch_peer import Peer
        name = f"torch {attention}"
        peer = Peer(cfg, batch, seq, attention)
        peer.step()  # warm-up
        phase_of.update(interleave(name, {name: peer.timed_step}))
        peaks[name], memory[name] = peer.peak_bytes(), None
        del peer
        Peer.release()
    runs = {}
    for p in args.param_dtype:
        for r in args.remat:
            name = f"dllm remat={r}" + ("" if p == "float32" else f" params={p}")
            runs[name] = DllmStep(preset, batch, seq, dtype, r, p)
            peaks[name] = device_peak_bytes()  # the first row's own; later rows' add theirs
            memory[name] = runs[name].memory
    phase_of.update(interleave("dllm", {k: r.timed for k, r in runs.items()}))
    med = {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
           for k, v in times.items()}
    flops = model_lib.flops_per_token(cfg, seq) * batch * seq
    rows = []
    for name in list(runs) + list(f"torch {a}" for a in args.peer):
        (wall, cpu), (c_wall, c_cpu) = med[name], med[f"ceiling {phase_of[name]}"]
        row = {"preset": preset, "run": name, "params": model_lib.param_count(cfg), "batch": batch,
               "seq_len": seq, "dtype": dtype, "step_s": wall, "tokens_per_s": batch * seq / wall,
               "mfu": flops / wall / (ceiling.flops / c_wall),
               "ceiling_flops": ceiling.flops / c_wall,
               "memory": memory[name], "device_peak_bytes": peaks[name]}
        if not accelerator:
            row.update(step_cpu_s=cpu, mfu_cpu=flops / cpu / (ceiling.flops / c_cpu))
        rows.append(row)
    return rows


def print_table(rows, accelerator: bool):
    gb = lambda b: f"{b / 1e9:7.2f}" if b else "      -"
    print(f"{'preset':>18} {'run':>24} {'B x S':>10} {'step s':>8} {'tok/s':>9} {'MFU':>6}"
          + ("" if accelerator else f" {'cpu s':>7} {'MFU cpu':>7}")
          + f" {'plan GB':>7} {'peak GB':>7}")
    for r in rows:
        plan = (r["memory"] or {}).get("plan")
        print(f"{r['preset']:>18} {r['run']:>24} {r['batch']:>4}x{r['seq_len']:<5} "
              f"{r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['mfu']:6.1%}"
              + ("" if accelerator else f" {r['step_cpu_s']:7.2f} {r['mfu_cpu']:7.1%}")
              + f" {gb(plan)} {gb(r['device_peak_bytes'])}")


def main():
    accelerator = jax.devices()[0].platform != "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="qwen2.5-coder-1.5b" if accelerator else "tiny,100m")
    parser.add_argument("--batch", type=int, default=0, help="override the preset's batch")
    parser.add_argument("--seq", type=int, default=0, help="override the preset's length")
    parser.add_argument("--remat", default="none", help="dllm rows: remat policies")
    parser.add_argument("--param_dtype", default="float32",
                        help="dllm rows: parameter dtypes, float32 and / or bfloat16")
    parser.add_argument("--peer", default="mask", help="torch peer rows: mask,nomask or ''")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    args.remat = args.remat.split(",")
    args.param_dtype = args.param_dtype.split(",")
    args.peer = [p for p in args.peer.split(",") if p]

    rows = [r for p in args.presets.split(",") for r in bench_preset(p, args, accelerator)]
    device = device_name()
    print(f"device: {device}; {datetime.date.today()}; ceiling: "
          + ", ".join(sorted({f"{r['dtype']} {r['ceiling_flops'] / 1e9:.0f} GFLOP/s"
                              for r in rows})))
    print_table(rows, accelerator)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "date": datetime.date.today().isoformat(),
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
