"""What the analyses cost: decoding with the sampler's per-step confidence trace
(generate(trace=True), for heatmaps) against without it (the default path), the
first-step confidence forward of the entropy sink, and local / global AR-ness@1..10 of
many decodings on the host.

    python benchmarks/trace.py [--preset 7b --dtype bfloat16] [--batch 8] [--json OUT]

Random weights and random prompts; DiffuCoder's decoding (entropy rule, one token per
step). trace_ratio = time(generate with trace) / time(generate); `same_tokens`: both
decode the same tokens.
"""
import argparse
import datetime
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from decode import cpu_name, interleaved_times
from dllm import analysis, sampling
from dllm import model as model_lib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--orders", type=int, default=1640, help="decodings for AR-ness "
                        "(1640 = HumanEval x 10)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cfg = model_lib.ModelConfig(**{**model_lib.PRESETS[args.preset], "dtype": args.dtype,
                                   "param_dtype": args.dtype})
    model = model_lib.Transformer(cfg)
    params = jax.jit(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])(
        jax.random.key(0))
    apply_fn = model_lib.model_apply(model)
    b, n, mask_id = args.batch, args.new_tokens, cfg.vocab_size - 1
    prompts = jax.random.randint(jax.random.key(1), (b, args.prompt_len), 0, mask_id)
    valid = jnp.ones(prompts.shape, bool)
    sample = sampling.SampleConfig(max_new_tokens=n, steps=n, alg="entropy")
    gen = lambda trace: functools.partial(sampling.generate, cfg=sample, apply_fn=apply_fn,
                                          mask_id=mask_id, valid=valid, trace=trace)
    first = functools.partial(analysis.first_step_confidence, apply_fn=apply_fn,
                              mask_id=mask_id, length=n)
    times, outs = interleaved_times({
        "generate": (gen(False), (params, prompts, jax.random.key(2)), 1),
        "generate_trace": (gen(True), (params, prompts, jax.random.key(2)), 1),
        "first_step_confidence": (first, (params, prompts, valid), 1)}, args.reps)

    order = np.asarray(outs["generate"].order)[:, args.prompt_len:]
    orders = np.resize(order, (args.orders, n))  # the batch's orders, repeated
    start = time.perf_counter()
    analysis.local_ar_ness(orders, range(1, 11))
    analysis.global_ar_ness(orders, range(1, 11))
    ar_s = time.perf_counter() - start

    row = {"preset": args.preset, "dtype": args.dtype, "batch": b, "prompt_len": args.prompt_len,
           "new_tokens": n, **{f"{k}_s": v[0] for k, v in times.items()},
           "trace_ratio": times["generate_trace"][0] / times["generate"][0],
           "trace_mb": outs["generate_trace"].trace.size * 4 / 2**20,
           "same_tokens": bool((outs["generate"].tokens == outs["generate_trace"].tokens).all()),
           "ar_ness_s": ar_s, "orders": args.orders}
    device = cpu_name() if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
    print(f"device: {device}; {args.preset} ({args.dtype}), batch {b}, prompt {args.prompt_len}, "
          f"{n} tokens in {n} steps, entropy rule")
    print(f"{'generate s':>11} {'+ trace s':>10} {'ratio':>6} {'trace MB':>9} {'same':>5} "
          f"{'first step s':>13} {'AR-ness s':>10} ({args.orders} orders, k = 1..10)")
    print(f"{row['generate_s']:11.3f} {row['generate_trace_s']:10.3f} {row['trace_ratio']:6.3f} "
          f"{row['trace_mb']:9.1f} {str(row['same_tokens']):>5} "
          f"{row['first_step_confidence_s']:13.4f} {ar_s:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "date": datetime.date.today().isoformat(),
                       "args": vars(args), "results": [row]}, f, indent=2)


if __name__ == "__main__":
    main()
