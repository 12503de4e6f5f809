"""coupled-GRPO log-probability estimators: variance and cost, and the time split of
coupled-GRPO iterations.

    python benchmarks/grpo_estimators.py --workdir=RUN [--draws 64] [--gradient_batches 3]
        [--json OUT]
    python benchmarks/grpo_estimators.py --split_only --shape=qwen2.5-coder-1.5b [--json OUT]

1. Variance (needs --workdir, a run trained on the synthetic tasks, e.g. the warm-up
   of experiments/coupled_grpo.py:tiny): for held-out tasks, the reference solution
   as the completion; each estimator's per-sequence log-likelihood (its token values
   summed over the completion through <|im_end|>) under `--draws` mask seeds. Reported:
   the variance over draws (mean over sequences), the mean estimate, forward passes per
   estimate and the time of one estimate of the batch. Estimators are compared at equal
   passes: coupled vs decoupled with the fully masked pass (3 passes, the released
   code) and without (2 passes, the paper's text); full_mask and d1 use 1 pass.
2. Gradient noise (needs --workdir): rollouts of --gradient_batches batches of 16 RL
   tasks x G = 8, decoded as experiments/coupled_grpo.py:tiny's rollouts and scored (a
   batch whose groups all have equal rewards has no gradient: the next one replaces
   it, and the count is reported); the GRPO loss gradient (mu = 1, no KL) under
   --gradient_draws mask seeds. Reported per estimator: the share of one draw's squared
   norm that is mask noise, the cosine between a draw and the batch's mean gradient,
   the cosine between the mean gradients of different batches (how much a step depends
   on the draw), and the cosine with the instruction-tuning gradient of the same
   prompts' reference solutions (the direction that transfers).
3. Time split: a short coupled-GRPO run (train_and_evaluate, in a temporary directory)
   and its rollout / scoring / old+ref log-prob / update seconds per optimizer step,
   from the steps after the first rollout (which compiles). With --workdir it starts
   from that run; otherwise from random weights of --shape (G = 10; nothing a random
   model writes gets executed, so scoring time is near zero there).
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from dllm import config as config_lib
from dllm import grpo, model as model_lib, rewards, runs, sampling, tasks, train


def device_name() -> str:
    d = jax.local_devices()[0]
    if d.platform != "cpu":
        return f"{d.device_kind} x{jax.local_device_count()}"
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores, cpu"


def solution_batch(run, chosen: list, width: int, n: int) -> dict:
    """Prompts + reference solutions (then <|im_end|>, pads) of tasks `chosen`."""
    tok = run.tokenizer
    prompts = [tok.encode(p) for p in grpo.prompts(chosen, "diffucoder", tok)]
    answers = [tok.encode(r) + [tok.im_end_id] for _, r in tasks.sft_pairs(chosen)]
    prompt_tokens, prompt_valid = sampling.left_pad(prompts, width, tok.pad_id)
    completion = np.full((len(chosen), n), tok.pad_id, np.int32)
    for i, a in enumerate(answers):
        completion[i, :min(len(a), n)] = a[:n]
    return grpo.completion_batch(np.concatenate([prompt_tokens, completion], 1), prompt_valid,
                                 tok.im_end_id)


ESTIMATORS = [("coupled", True), ("decoupled", True), ("coupled", False),
              ("decoupled", False), ("full_mask", True), ("d1", True)]


def variance_table(workdir: str, draws: int, n_tasks: int) -> list[dict]:
    run = runs.load_run(workdir)
    config = run.config
    width = config.grpo.max_prompt_len if "grpo" in config else 128
    n = config.sample.max_new_tokens if "grpo" in config else 32
    batch = solution_batch(run, tasks.synthetic_tasks("heldout")[::3][:n_tasks], width, n)
    rows = []
    for estimator, full_pass in ESTIMATORS:
        cfg = grpo.GrpoConfig(estimator=estimator, full_pass=full_pass)
        fn = jax.jit(lambda p, b, s, cfg=cfg: grpo.sequence_logps(
            p, b, s, apply_fn=run.apply_fn, cfg=cfg, mask_id=run.tokenizer.mask_id))
        seeds = np.arange(draws)
        estimates = np.asarray(jax.block_until_ready(fn(run.params, batch, seeds)), np.float64)
        start = time.perf_counter()
        jax.block_until_ready(fn(run.params, batch, seeds))
        per_estimate = (time.perf_counter() - start) / draws
        rows.append({"estimator": estimator, "full_pass": full_pass, "passes": cfg.passes,
                     "variance": float(estimates.var(0, ddof=1).mean()),
                     "mean_estimate": float(estimates.mean()),
                     "ms_per_estimate": 1e3 * per_estimate, "sequences": len(batch["row"]),
                     "draws": draws})
    return rows


def gradient_table(workdir: str, n_batches: int, draws: int, prompts: int = 16) -> list[dict]:
    run = runs.load_run(workdir)
    tok, c = run.tokenizer, config_lib.load_experiment("experiments/coupled_grpo.py:tiny")
    g, width, n = c.grpo.generations, c.grpo.max_prompt_len, c.sample.max_new_tokens
    suite = tasks.synthetic_tasks("rl")
    sample_cfg = sampling.sample_config_from_dict(c.sample)
    rollouts = []                 # (GRPO batch, instruction-tuning batch), shared by estimators
    skipped = 0                   # batches whose every group was unanimous (zero gradient)
    for i in range(4 * n_batches):
        if len(rollouts) == n_batches:
            break
        chosen = [suite[j] for j in np.random.default_rng(i).choice(len(suite), prompts, False)]
        # The rollouts' layout: prompts left-truncated and padded to exactly `width`.
        out = sampling.generate_text(
            run.params, [p for p in grpo.prompts(chosen, "diffucoder", tok) for _ in range(g)],
            jax.random.PRNGKey(i), sample_cfg, apply_fn=run.apply_fn, tokenizer=tok,
            multiple=width, max_len=width + n, truncate_prompts=True)
        scored = rewards.compute_rewards(out.texts, [t.tests for t in chosen for _ in range(g)],
                                         grpo.reward_config(c.grpo))
        batch = grpo.completion_batch(np.asarray(out.decoded.tokens), out.prompt_valid,
                                      tok.im_end_id)
        batch["advantages"] = grpo.group_advantages(scored.total, g).astype(np.float32)
        if not batch["advantages"].any():
            skipped += 1
            continue
        sft = solution_batch(run, chosen, width, n)
        sft["advantages"] = np.ones(prompts, np.float32)
        rollouts.append((batch, sft))
    if len(rollouts) < n_batches:
        raise RuntimeError(f"{workdir}: only {len(rollouts)} of {4 * n_batches} rollout batches "
                           "have a group of unequal rewards; the model passes or fails every "
                           "task in every sample")
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    rows = []
    for estimator, full_pass in ESTIMATORS[:2] + ESTIMATORS[4:]:
        cfg = grpo.GrpoConfig(estimator=estimator, full_pass=full_pass, iterations=1, beta=0.0)
        grad = jax.jit(jax.grad(lambda p, b, cfg=cfg: grpo.grpo_loss(
            p, b, None, 0, apply_fn=run.apply_fn, cfg=cfg, mask_id=tok.mask_id)[0]))
        draws_of = lambda b: np.stack([flat(grad(run.params, {
            **b, "mask_seed": np.full(len(b["row"]), seed, np.int32)})).astype(np.float64)
            for seed in range(draws)])
        noise, to_mean, to_sft, means, sft_means = [], [], [], [], []
        for batch, sft in rollouts:
            gs = draws_of(batch)
            mean = gs.mean(0)
            noise.append(((gs - mean) ** 2).sum(1).mean() / (gs ** 2).sum(1).mean())
            to_mean.append(np.mean([cos(x, mean) for x in gs]))
            sft_means.append(draws_of(sft).mean(0))
            to_sft.append(cos(mean, sft_means[-1]))
            means.append(mean)
        between = lambda m: float(np.mean([cos(m[i], m[j]) for i in range(len(m))
                                           for j in range(i + 1, len(m))]))
        rows.append({"estimator": estimator, "full_pass": full_pass, "passes": cfg.passes,
                     "mask_noise_share": float(np.mean(noise)),
                     "cos_draw_to_mean": float(np.mean(to_mean)),
                     "cos_between_batches": between(means),
                     "cos_between_batches_instruction_tuning": between(sft_means),
                     "cos_to_instruction_tuning": [round(x, 3) for x in to_sft],
                     "batches": n_batches, "skipped_batches": skipped, "draws": draws,
                     "rows": prompts * g})
    return rows


def split_config(workdir: str | None, shape: str, steps: int, prompts: int):
    """A short coupled-GRPO run: from `workdir`'s params (tiny) or random `shape` weights."""
    c = config_lib.load_experiment("experiments/coupled_grpo.py:tiny")
    c.init.warmup = ""
    c.train.update(steps=steps, eval_every=0, log_every=1, warmup_steps=1)
    c.checkpoint.update(every=10_000, keep=1)
    if workdir:
        c.init.checkpoint = workdir
        c.train.batch_size = prompts * c.grpo.generations
        return c
    # remat as the 7B recipe: without it the 3-pass loss of 20 x 384 tokens needs ~124 GB.
    c.model.update(model_lib.preset(shape, causal=False, dtype="bfloat16", remat="full"))
    c.grpo.update(generations=10, max_prompt_len=128)
    c.train.batch_size = prompts * 10
    c.sample.update(max_new_tokens=256, steps=256, block_length=256)
    c.data.seq_len = c.grpo.max_prompt_len + c.sample.max_new_tokens
    return c


def _decode_known_ids(decode):
    """Random weights emit ids beyond the synthetic tasks' 512-piece tokenizer (the
    model keeps the shape's vocabulary, whose logits and top-p cost are part of the
    split): those ids decode as nothing."""
    def wrapped(self, ids):
        return decode(self, [i for i in list(ids) if i < self.vocab_size])
    return wrapped


def time_split(workdir: str | None, shape: str, steps: int, prompts: int) -> dict:
    config = split_config(workdir, shape, steps, prompts)
    if not workdir:
        from dllm import tokenizer as tokenizer_lib
        cls = tokenizer_lib.SentencePieceTokenizer
        cls.decode = _decode_known_ids(cls.decode)
    with tempfile.TemporaryDirectory() as tmp:
        if not workdir:   # a tokenizer for the synthetic tasks (the model's vocab is larger)
            tok_cfg = config_lib.load_experiment("experiments/sft.py:tasks_tiny").data
            from dllm import data
            data.get_tokenizer(tok_cfg, tmp)
            config.data.tokenizer = os.path.join(tmp, "tokenizer.model")
        train.train_and_evaluate(config, os.path.join(tmp, "run"))
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    mu = config.grpo.iterations
    later = [r for r in rows if r["step"] > mu]        # after the first (compiling) rollout
    keys = ("rollout_s", "scoring_s", "logp_s", "update_s")
    split = {k: sum(r.get(k, 0.0) for r in later) / len(later) for k in keys}
    split.update(total_s=sum(split.values()), steps_timed=len(later),
                 rows=config.train.batch_size, generations=config.grpo.generations,
                 new_tokens=config.sample.max_new_tokens, prompt_len=config.grpo.max_prompt_len,
                 model=workdir or shape,
                 params=model_lib.param_count(model_lib.config_from_dict(config.model)))
    return split


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="trained tiny run (synthetic tasks)")
    parser.add_argument("--draws", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--gradient_batches", type=int, default=3, help="0 = skip part 2")
    parser.add_argument("--gradient_draws", type=int, default=4)
    parser.add_argument("--shape", default="qwen2.5-coder-1.5b")
    parser.add_argument("--split_steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--split_only", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"device": device_name(), "date": datetime.date.today().isoformat(),
           "jax": jax.__version__}
    if args.workdir and not args.split_only:
        out["variance"] = variance_table(args.workdir, args.draws, args.tasks)
        print(f"{out['device']}, {out['date']}: per-sequence log-likelihood over "
              f"{args.draws} mask draws, {args.tasks} held-out reference solutions")
        print("| estimator | full pass | passes | variance | mean estimate | ms / estimate |")
        print("|---|---|---|---|---|---|")
        for r in out["variance"]:
            print(f"| {r['estimator']} | {r['full_pass']} | {r['passes']} | {r['variance']:.3f} "
                  f"| {r['mean_estimate']:.2f} | {r['ms_per_estimate']:.1f} |")
        by = {(r["estimator"], r["full_pass"]): r["variance"] for r in out["variance"]}
        for full in (True, False):
            ratio = by[("coupled", full)] / by[("decoupled", full)]
            out[f"coupled_over_decoupled_variance_full_pass_{full}"] = ratio
            print(f"coupled / decoupled variance (full pass {full}): {ratio:.3f}")
    if args.workdir and not args.split_only and args.gradient_batches:
        out["gradients"] = gradient_table(args.workdir, args.gradient_batches,
                                          args.gradient_draws)
        print(f"GRPO loss gradients (mu = 1, no KL) of {args.gradient_batches} rollout batches "
              f"x {args.gradient_draws} mask draws (skipped, every group unanimous: "
              f"{out['gradients'][0]['skipped_batches']})")
        print("| estimator | full pass | passes | mask-noise share of a draw | cos(draw, batch "
              "mean) | cos between batches (instruction tuning's) | cos to instruction tuning, "
              "per batch |")
        print("|---|---|---|---|---|---|---|")
        for r in out["gradients"]:
            print(f"| {r['estimator']} | {r['full_pass']} | {r['passes']} | "
                  f"{r['mask_noise_share']:.3f} | {r['cos_draw_to_mean']:.3f} | "
                  f"{r['cos_between_batches']:+.3f} "
                  f"({r['cos_between_batches_instruction_tuning']:+.3f}) "
                  f"| {r['cos_to_instruction_tuning']} |")
    split = time_split(args.workdir if args.workdir else None, args.shape, args.split_steps,
                       args.prompts)
    out["time_split"] = split
    print(f"time per optimizer step ({split['model']}, {split['params'] / 1e6:.1f}M params, "
          f"{split['rows']} rows = G {split['generations']} x {split['rows'] // split['generations']}"
          f" prompts, {split['new_tokens']} new tokens, mean of {split['steps_timed']} steps):")
    print("| rollout s | scoring s | old+ref logp s | update s | total s |")
    print("|---|---|---|---|---|")
    print(f"| {split['rollout_s']:.2f} | {split['scoring_s']:.2f} | {split['logp_s']:.2f} | "
          f"{split['update_s']:.2f} | {split['total_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
