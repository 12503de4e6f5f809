"""Import time and peak host memory of dllm.convert on a synthetic ~1B-parameter bf16
checkpoint in 4 safetensors shards (random weights, written to --dir, default /tmp).

    python benchmarks/convert.py [--dir /tmp/dllm_bench_convert] [--json OUT]

Each measurement runs in a fresh process: peak RSS (ru_maxrss) minus the RSS of that
process after importing jax and dllm is the import's own host memory. Target: under
1.3 x the largest shard + the output arrays (on CPU the device arrays are host memory).
The shards are usually in the page cache (just written), so time is CPU-bound.
"""
import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

# ~1.04B parameters: 20 layers of a 2048-wide Qwen2 block, 32k vocab, untied head.
MODEL = dict(vocab_size=32768, hidden=2048, layers=20, heads=16, kv_heads=4, head_dim=128,
             mlp=5632, rope_theta=1e6, rms_eps=1e-6, tie_embeddings=False,
             dtype="bfloat16", param_dtype="bfloat16")
SHARDS = 4


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.machine()


def write_checkpoint(directory: str):
    """Random bf16 tensors in HF names and shapes, 4 shards of about equal size + index."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from dllm import convert, model as model_lib
    cfg = model_lib.ModelConfig(**MODEL)
    table = convert.tensor_table(cfg)
    total = sum(math.prod(s.hf_shape) for s in table.values()) * 2
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors" for i in range(SHARDS)]
    shard, size, weight_map, i = {}, 0, {}, 0
    for name, slot in table.items():
        shard[name] = (rng.standard_normal(slot.hf_shape, np.float32) * 0.02).astype(
            ml_dtypes.bfloat16)
        weight_map[name] = names[i]
        size += shard[name].nbytes
        if size >= total / SHARDS * (i + 1) or name == list(table)[-1]:
            save_file(shard, os.path.join(directory, names[i]), metadata={"format": "pt"})
            shard, i = {}, i + 1
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    hf_config = convert.hf_config_from_model(cfg, "DreamModel")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f)


def measure(directory: str) -> dict:
    """In this (fresh) process: time and peak RSS of load_hf_params."""
    import jax

    from dllm import convert, model as model_lib
    jax.devices()  # start the backend before the baseline
    cfg = model_lib.ModelConfig(**MODEL)
    baseline = _rss_bytes()
    start = time.perf_counter()
    params = convert.load_hf_params(directory, cfg)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shards = [os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
              if f.endswith(".safetensors")]
    return dict(seconds=seconds, baseline_bytes=baseline, peak_bytes=peak,
                output_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
                largest_shard_bytes=max(shards), checkpoint_bytes=sum(shards),
                params=model_lib.param_count(cfg))


def read_seconds(directory: str) -> float:
    """Plain sequential read of the shards (a floor for the import time)."""
    start = time.perf_counter()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                while f.read(1 << 26):
                    pass
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/dllm_bench_convert")
    parser.add_argument("--json", default=None)
    parser.add_argument("--step", choices=["write", "measure"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "write":
        return write_checkpoint(args.dir)
    if args.step == "measure":
        return print(json.dumps(measure(args.dir)))
    # Each step in its own process, so that ru_maxrss is the import's alone.
    if not os.path.exists(os.path.join(args.dir, "model.safetensors.index.json")):
        subprocess.run([sys.executable, __file__, "--dir", args.dir, "--step", "write"],
                       check=True)
    r = json.loads(subprocess.run([sys.executable, __file__, "--dir", args.dir, "--step",
                                   "measure"], check=True, capture_output=True,
                                  text=True).stdout.splitlines()[-1])
    r["read_seconds"] = read_seconds(args.dir)
    gib = 2**30
    used = r["peak_bytes"] - r["baseline_bytes"]
    target = 1.3 * r["largest_shard_bytes"] + r["output_bytes"]
    device = f"{_cpu_model()} x{os.cpu_count()} cores"
    print(f"device: {device}; checkpoint: {r['params'] / 1e9:.2f}B params bf16, {SHARDS} "
          f"shards, largest {r['largest_shard_bytes'] / gib:.2f} GiB")
    print(f"{'figure':<34}{'value':>10}{'ceiling':>10}{'ratio':>8}")
    print(f"{'import host memory (GiB)':<34}{used / gib:>10.2f}{target / gib:>10.2f}"
          f"{used / target:>8.2f}")
    print(f"{'  (peak RSS, baseline) (GiB)':<34}{r['peak_bytes'] / gib:>10.2f}"
          f"{r['baseline_bytes'] / gib:>10.2f}")
    print(f"{'import time (s) vs plain read':<34}{r['seconds']:>10.2f}"
          f"{r['read_seconds']:>10.2f}{r['seconds'] / r['read_seconds']:>8.1f}")
    print(f"{'import throughput (GiB/s)':<34}{r['checkpoint_bytes'] / gib / r['seconds']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**r, "device": device, "target_bytes": target}, f, indent=2)


if __name__ == "__main__":
    main()
