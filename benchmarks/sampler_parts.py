"""Where a sampler step's time goes beyond the forward pass: each part of
`sampling.propose` timed alone on the logits of one decoding step.

    python benchmarks/sampler_parts.py [--batch 1,8] [--width 257] [--vocab 151936]
                                       [--temperature 0.2 --top_p 0.95] [--json OUT]

Logits [B, W, V] (W = a 256-token block + the position left of it, V = the
qwen2.5-coder vocabulary by default) in bfloat16, random. Each part is jitted
alone and timed as the median of 20 calls after a warm-up: the softmax, top_k
at k = 16 and 256 (what a sort-based top-p prefilter would cost; the filter no
longer sorts), the whole top-p filter (a search for the cutoff), the per-position
Gumbel draws over the vocabulary, the entropy confidence, and `propose` whole (its
parts overlap: XLA fuses some of them inside propose).
"""
import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dllm import sampling  # noqa: E402


def median_seconds(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def parts(cfg: sampling.SampleConfig, mask_id: int) -> dict:
    """name -> jitted fn(logits [B, W, V], key)."""
    tempered = lambda x: x.astype(jnp.float32) / cfg.temperature
    keys = lambda x, key: sampling.position_keys(key, x.shape[:2])
    return {
        "softmax f32": lambda x, key: jax.nn.softmax(tempered(x), -1),
        **{f"top_k {k} of probs": functools.partial(
            lambda x, key, k: jax.lax.top_k(jax.nn.softmax(tempered(x), -1), k), k=k)
           for k in (16, 256)},
        "top-p filter": lambda x, key: sampling._top_p(tempered(x), cfg.top_p),
        "position keys": keys,
        "gumbel draws [B, W, V]": lambda x, key: sampling._draw(
            keys(x, key), lambda k: jax.random.gumbel(k, x.shape[-1:])),
        "entropy confidence": lambda x, key: jnp.sum(
            jax.nn.softmax(tempered(x), -1) * jax.nn.log_softmax(tempered(x), -1), -1),
        "propose (whole)": lambda x, key: sampling.propose(x, key, cfg, mask_id, None),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--width", type=int, default=257)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--alg", default="entropy", choices=sampling.ALGS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg = sampling.SampleConfig(alg=args.alg, temperature=args.temperature, top_p=args.top_p)
    device = jax.devices()[0].device_kind
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        logits = (3.0 * jax.random.normal(jax.random.key(0), (b, args.width, args.vocab))
                  ).astype(jnp.bfloat16)
        for name, fn in parts(cfg, args.vocab - 1).items():
            ms = 1e3 * median_seconds(jax.jit(fn), logits, jax.random.key(1))
            rows.append({"batch": b, "part": name, "ms": ms})
            print(f"B={b:<3} {name:>24}: {ms:8.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "date": datetime.date.today().isoformat(),
                       "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
