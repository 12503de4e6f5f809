"""Data speed: tokens/s of preparation, of the training-time reader, and of the train
step it must keep up with; the reader's memory.

    python benchmarks/data.py [--vocab_size=4096] [--batches=400] [--json OUT]

1. Preparation: `dllm.prepare.prepare` of the Python standard library (~1800 files)
   with a sentencepiece BPE trained beforehand, in `--workers` processes.
2. Reader: `data.make_dataset` over the prepared array, "windows" and "documents"
   packing, at the 100m preset's benchmark shape (4 x 512, benchmarks/train_step.py)
   and at the 7B recipes' context (4 x 4096); the best of `--repeats` timed runs of
   `--batches` batches after one warm-up batch, and the resident memory the reader added.
3. The real jitted train step of the 100m preset at that shape (train_step.py's
   compiled_step, float32, no remat; time_steps: the median of `--step_repeats`
   steps after a warm-up), on this machine's default device.
Margin = reader tokens/s / train-step tokens/s (the target is >= 10).
"""
import argparse
import json
import os
import tempfile
import time

from dllm import data, prepare
from dllm import tokenizer as tokenizer_lib
from train_step import SHAPES, compiled_step, device_name, preset_config, time_steps


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bench_prepare(root: str, vocab_size: int, workers: int) -> dict:
    docs = data.load_documents(data.default_config())   # the whole stdlib, for the BPE
    tok = tokenizer_lib.train_sentencepiece(docs, vocab_size, os.path.join(root, "tok.model"))
    t0 = time.perf_counter()
    meta = prepare.prepare("stdlib", "", os.path.join(root, "stdlib"), tokenizer=tok.path,
                           workers=workers, eval_fraction=0.01)
    seconds = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    return {"workers": workers, "documents": meta["records"], "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds}


def bench_reader(path: str, tok, packing: str, batch: int, seq_len: int, batches: int,
                 repeats: int) -> dict:
    cfg = data.default_config()
    cfg.update(source="prepared", path=path, seq_len=seq_len, packing=packing)
    before, best = rss_bytes(), float("inf")
    for seed in range(repeats):
        it = iter(data.make_dataset(cfg, tok, split="train", batch_size=batch, seed=seed))
        next(it)                                    # warm-up: threads, first reads
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        best = min(best, time.perf_counter() - t0)
    return {"packing": packing, "batch": batch, "seq_len": seq_len, "batches": batches,
            "tokens_per_s": batches * batch * seq_len / best,
            "rss_added_bytes": rss_bytes() - before}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step_repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        prep = bench_prepare(root, args.vocab_size, args.workers)
        path = os.path.join(root, "stdlib")
        tok = tokenizer_lib.load_tokenizer(os.path.join(path, "tokenizer.model"))
        batch, seq_len = SHAPES["100m"]
        readers = [bench_reader(path, tok, p, batch, s, args.batches * seq_len // s,
                                args.repeats)
                   for s in (seq_len, 4096) for p in ("windows", "documents")]
    step_fn, state, tokens = compiled_step(preset_config("100m", "float32", "none"), 1,
                                           batch, seq_len)
    step_s, _ = time_steps(step_fn, state, tokens, args.step_repeats)
    step = {"batch": batch, "seq_len": seq_len, "step_s": step_s,
            "tokens_per_s": batch * seq_len / step_s}
    device = device_name()
    print(f"device: {device}")
    print(f"preparation: {prep['documents']} stdlib files, {prep['tokens'] / 1e6:.1f}M tokens "
          f"(BPE {args.vocab_size}) in {prep['seconds']:.1f} s with {prep['workers']} "
          f"worker(s): {prep['tokens_per_s'] / 1e3:.0f}k tokens/s")
    print(f"train step (100m, {step['batch']} x {step['seq_len']}): "
          f"{step['tokens_per_s']:.0f} tokens/s")
    print(f"{'reader':>10} {'B x S':>9} {'tokens/s':>12} {'margin':>10} {'RSS added MB':>13}")
    for r in readers:   # the step's tokens/s at its own shape (4 x 512)
        r["margin"] = r["tokens_per_s"] / step["tokens_per_s"]
        print(f"{r['packing']:>10} {r['batch']:>4}x{r['seq_len']:<4} {r['tokens_per_s']:12.0f} "
              f"{r['margin']:9.0f}x {r['rss_added_bytes'] / 2**20:13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "preparation": prep, "train_step": step,
                       "readers": readers}, f, indent=2)


if __name__ == "__main__":
    main()
