"""Decoding speed: tokens/s and model calls per generated token for one-per-step,
block, threshold (tau 0.9) and threshold + KV cache decoding, the sampler's
overhead over the bare forward passes, and memory.

    python benchmarks/decode.py [--presets tiny,100m] [--batch 4] [--workdir RUN]
                                [--alg entropy --temperature 0.2 --top_p 0.95]
                                [--modes one_per_step,threshold_cache] [--json OUT]
                                [--profile DIR]

On CPU the presets run in float32; on a GPU / TPU the default is the
qwen2.5-coder-1.5b shape made bidirectional, in bfloat16 weights, at batches 1 and 8,
prompt 64 + 256 new tokens, entropy rule, temperature 0.2, top-p 0.95 (the issue's
H200 case). A preset runs with random weights (no confidence ever reaches tau = 0.9,
so the threshold rule commits one token per step there and its speed-up is the
cache's alone); `--workdir` adds a trained run, whose confidences are real.
Memory: XLA's plan of the compiled one-per-step and threshold + cache generate
(arguments + outputs + temporaries) and the device's peak where it reports one.

overhead_ratio = time(generate, S steps) / (S x time(one forward of the same batch))
speedup_threshold_cache = tokens/s(threshold + cache) / tokens/s(one per step)
"""
import argparse
import collections
import dataclasses
import datetime
import functools
import glob
import gzip
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dllm import model as model_lib, runs, sampling  # noqa: E402

CODE_PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n",
                "class Stack:\n    def __init__(self):\n", "def parse_args(argv):\n"]


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name")]
    name = names[0] if names else platform.processor()
    return f"{name}, {os.cpu_count()} cores, {jax.local_devices()[0].platform}"


MODES = ("one_per_step", "block", "threshold", "threshold_cache")
PLANNED = ("one_per_step", "threshold_cache")   # modes whose XLA memory plan is reported


def interleaved_times(calls: dict, reps: int):
    """Per-call wall and CPU seconds of each fn(*args) in `calls` {name: (fn, args,
    repeat)}: called once (compiling), then each called `repeat` times back to back, in
    turn, `reps` times (so that a shared machine's load falls on all alike); the
    fastest rep of each. CPU time (this process) is what other processes' load cannot
    inflate. fn is called as a user would (generate with concrete prompts, which lets
    one-block decoding skip the prompt). Returns ({name: (wall, cpu)}, {name: output},
    {name: XLA's planned bytes of jit(fn)})."""
    plans = {}
    for k, (fn, args, _) in calls.items():
        if k in PLANNED:   # one more compile each: only the modes the table reports
            m = jax.jit(fn).lower(*args).compile().memory_analysis()
            plans[k] = (m.argument_size_in_bytes + m.output_size_in_bytes
                        - m.alias_size_in_bytes + m.temp_size_in_bytes)
        jax.block_until_ready(fn(*args))
    best, outs = {k: (float("inf"), float("inf")) for k in calls}, {}
    for _ in range(reps):
        for k, (fn, args, repeat) in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeat):
                outs[k] = jax.block_until_ready(fn(*args))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[k] = (min(best[k][0], wall / repeat), min(best[k][1], cpu / repeat))
    return best, outs, plans


def setup(name: str, batch: int, prompt_len: int, workdir: str | None, dtype: str):
    """(model, params, prompts [B, P], valid [B, P], mask_id) for a preset with random
    weights (bidirectional, parameters and compute in `dtype`) and random prompts of
    prompt_len, or for a trained run with left-padded code prompts."""
    if workdir is None:
        cfg = model_lib.ModelConfig(**{**model_lib.PRESETS[name], "causal": False,
                                       "dtype": dtype, "param_dtype": dtype})
        model = model_lib.Transformer(cfg)
        params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])(
            jax.random.key(0))
        mask_id = cfg.vocab_size - 1
        prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, mask_id)
        return model, params, prompts, jnp.ones(prompts.shape, bool), mask_id
    run = runs.load_run(workdir)
    texts = [CODE_PROMPTS[i % len(CODE_PROMPTS)] for i in range(batch)]
    prompts, valid = sampling.encode_prompts(run.tokenizer, texts)
    return run.model, run.params, jnp.asarray(prompts), jnp.asarray(valid), run.tokenizer.mask_id


def modes(n: int, block: int, args) -> dict[str, sampling.SampleConfig]:
    """The SampleConfig of each mode in args.modes."""
    base = sampling.SampleConfig(max_new_tokens=n, steps=n, alg=args.alg, schedule="even",
                                 temperature=args.temperature, top_p=args.top_p)
    threshold = dataclasses.replace(base, block_length=block, parallel="threshold",
                                    threshold=0.9)
    every = {"one_per_step": base,
             "block": dataclasses.replace(base, block_length=block),
             "threshold": threshold,
             "threshold_cache": dataclasses.replace(threshold, cache=True)}
    return {k: every[k] for k in args.modes}


def bench(name, args, batch: int, workdir=None) -> dict:
    model, params, prompts, valid, mask_id = setup(name, batch, args.prompt_len, workdir,
                                                   args.dtype)
    apply_fn = model_lib.model_apply(model)
    n, b = args.new_tokens, batch
    canvas = jnp.concatenate([prompts, jnp.full((b, n), mask_id, prompts.dtype)], 1)
    canvas_valid = jnp.concatenate([valid, jnp.ones((b, n), bool)], 1)
    configs = modes(n, args.block, args)
    # n forwards back to back: as long a measurement as a generate of n steps.
    calls = {"forward": (jax.jit(apply_fn), (params, canvas, canvas_valid), n)}
    for mode, cfg in configs.items():
        run = functools.partial(sampling.generate, cfg=cfg, apply_fn=apply_fn, mask_id=mask_id,
                                valid=valid)
        calls[mode] = (run, (params, prompts, jax.random.key(0)), 1)
    times, outs, plans = interleaved_times(calls, args.reps)
    if args.profile:   # one more one-per-step generate, traced (TensorBoard / Perfetto)
        fn, fn_args, _ = calls["one_per_step"]
        trace_dir = os.path.join(args.profile, f"{os.path.basename(name)}_b{b}")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            jax.block_until_ready(fn(*fn_args))
        print_top_ops(trace_dir)
    stats = jax.devices()[0].memory_stats() or {}
    row = {"model": name, "batch": b, "new_tokens": n, "block_length": args.block,
           "forward_s": times["forward"][0], "forward_cpu_s": times["forward"][1],
           "plan_bytes": plans, "device_peak_bytes": stats.get("peak_bytes_in_use"),
           "modes": {}}
    for mode, cfg in configs.items():
        (t, cpu), out = times[mode], outs[mode]
        steps = float(np.mean(out.steps))
        row["modes"][mode] = {"seconds": t, "cpu_seconds": cpu, "tokens_per_s": b * n / t,
                              "calls_per_token": steps / n,
                              "full_forwards_per_token": (int(out.refreshes) if cfg.cache
                                                          else steps) / n}
        print(f"  {name:>8} {mode:>16}: {b * n / t:9.1f} tok/s  {steps / n:.3f} calls/token",
              flush=True)
    m = row["modes"]
    row["overhead_ratio"] = m["one_per_step"]["seconds"] / (n * row["forward_s"])
    row["overhead_ratio_cpu"] = m["one_per_step"]["cpu_seconds"] / (n * row["forward_cpu_s"])
    if "threshold_cache" in m:
        row["speedup_threshold_cache"] = (m["threshold_cache"]["tokens_per_s"]
                                          / m["one_per_step"]["tokens_per_s"])
        row["speedup_threshold_cache_cpu"] = (m["one_per_step"]["cpu_seconds"]
                                              / m["threshold_cache"]["cpu_seconds"])
    if "threshold" in m:
        row["speedup_threshold"] = (m["threshold"]["tokens_per_s"]
                                    / m["one_per_step"]["tokens_per_s"])
    if {"threshold", "threshold_cache"} <= set(m):
        gen = slice(prompts.shape[1], None)
        row["cache_agreement"] = float(jnp.mean(outs["threshold_cache"].tokens[:, gen]
                                                == outs["threshold"].tokens[:, gen]))
    return row


def print_top_ops(trace_dir: str, top: int = 15):
    """Prints, for each thread of each device lane of the perfetto trace under trace_dir
    (on a GPU: a stream's kernels, XLA's ops, XLA's modules), the names that took the most
    time in all (summed over calls), with their share of that thread's busy time: where a
    traced generate's time goes, without TensorBoard."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        print(f"  no perfetto_trace.json.gz under {trace_dir}")
        return
    with gzip.open(paths[0]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {(e["name"], e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    busy = collections.defaultdict(collections.Counter)
    calls = collections.Counter()
    for e in events:
        lane = names.get(("process_name", e.get("pid"), None), "")
        if e.get("ph") == "X" and "dur" in e and "/device:" in lane:
            thread = f"{lane} {names.get(('thread_name', e['pid'], e.get('tid')), e.get('tid'))}"
            busy[thread][e["name"]] += e["dur"]
            calls[thread, e["name"]] += 1
    if not busy:
        print(f"  {paths[0]}: no device lanes (a CPU run traces the host only)")
    for thread, ops in busy.items():
        total = sum(ops.values())
        print(f"  {thread}: {total / 1e3:.1f} ms busy in {sum(calls[thread, k] for k in ops)} "
              "events")
        for op, us in ops.most_common(top):
            print(f"    {us / 1e3:9.2f} ms {100 * us / total:5.1f}% {calls[thread, op]:6d}x  "
                  f"{op[:100]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    accelerator = jax.devices()[0].platform != "cpu"
    gpu_case = dict(presets="qwen2.5-coder-1.5b", batch="1,8", prompt_len=64, alg="entropy",
                    temperature=0.2, top_p=0.95, dtype="bfloat16")
    cpu_case = dict(presets="tiny,100m", batch="4", prompt_len=16, alg="maskgit_plus",
                    temperature=0.0, top_p=1.0, dtype="float32")
    default = gpu_case if accelerator else cpu_case
    parser.add_argument("--presets", default=default["presets"])
    parser.add_argument("--workdir", default=None, help="also benchmark this trained run")
    parser.add_argument("--batch", default=default["batch"], help="batch sizes, e.g. 1,8")
    parser.add_argument("--prompt_len", type=int, default=default["prompt_len"])
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--alg", default=default["alg"], choices=sampling.ALGS)
    parser.add_argument("--temperature", type=float, default=default["temperature"])
    parser.add_argument("--top_p", type=float, default=default["top_p"])
    parser.add_argument("--dtype", default=default["dtype"], choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"decoding modes to time, one_per_step first; of {MODES}")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--profile", default=None,
                        help="also write a jax.profiler trace of one one-per-step generate here")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if args.modes[0] != "one_per_step" or not set(args.modes) <= set(MODES):
        parser.error(f"--modes {args.modes}: one_per_step first, then any of {MODES[1:]}")

    device = cpu_name() if not accelerator else f"{jax.devices()[0].device_kind}"
    print(f"device: {device} ({jax.device_count()} device(s)), alg={args.alg}, "
          f"temperature={args.temperature}, top_p={args.top_p}, {args.dtype}")
    batches = [int(b) for b in args.batch.split(",")]
    rows = [bench(p, args, b) for p in args.presets.split(",") if p for b in batches]
    if args.workdir:
        rows += [bench(f"run:{args.workdir}", args, b, args.workdir) for b in batches]
    print(f"\n{'model':>12} {'B':>3} {'fwd ms':>8} {'overhead':>11} {'1/step tok/s':>13} "
          f"{'block':>8} {'thr 0.9':>8} {'thr+cache':>10} {'speedup':>12} {'agree':>6} "
          f"{'plan GB':>8}   (wall / cpu)")
    for r in rows:
        m = r["modes"]
        speedup = (f"{r['speedup_threshold_cache']:5.2f}x/{r['speedup_threshold_cache_cpu']:4.2f}x"
                   if "speedup_threshold_cache" in r else f"{'-':>12}")
        agree = f"{r['cache_agreement']:6.1%}" if "cache_agreement" in r else f"{'-':>6}"
        print(f"{r['model'][-12:]:>12} {r['batch']:>3} {1e3 * r['forward_s']:8.1f} "
              f"{r['overhead_ratio']:5.2f}/{r['overhead_ratio_cpu']:4.2f} "
              + " ".join(f"{m[k]['tokens_per_s']:{w}.1f}" if k in m else f"{'-':>{w}}"
                         for k, w in (("one_per_step", 13), ("block", 8), ("threshold", 8),
                                      ("threshold_cache", 10)))
              + f" {speedup} {agree} {r['plan_bytes']['one_per_step'] / 1e9:8.3f}")
    print("targets: overhead <= 1.15; threshold + cache >= 4x one-per-step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "date": datetime.date.today().isoformat(),
                       "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
