"""coupled-GRPO on a bandit with a known optimum: does the update raise the reward?

    python benchmarks/grpo_bandit.py [--steps 40] [--seeds 0,1] [--temperature 1.0]
        [--top_p 1.0] [--lr 1e-3] [--json OUT]

The real stage (`grpo.make_stage`: rollouts with the compiled sampler, leave-one-out
advantages, old / reference log-probs per inner iteration, the clipped loss + KL,
reference mixing; `train.make_train_step` with `train.make_optimizer`) on a task
whose reward needs no sandbox. A tiny random-init bidirectional model (vocabulary 16:
12 letters, <|im_end|>, EOS, pad, mask) completes one fixed 4-token prompt with
N = 6 tokens (entropy order, one token per step); the reward is the fraction of
the N positions holding one of the letters a, b, c (ids 0-2) before the completion
ends (its first <|im_end|>, EOS or pad). The optimum is 1; a uniform policy scores
~0.2. Only the scoring is replaced (`BanditRollouts.score`).

Printed: per estimator (mean over seeds), at optimizer steps 1, 5, 10, ... the mean
reward of the rollout (4 prompts x G = 8) the step trains on, the means over steps
1-6 and over the last 10, and the seconds taken. "reinforce" is plain REINFORCE on
the full-mask log-probabilities (full_mask, one iteration per rollout, no KL: the
loss's gradient is then -mean(A * grad logp)).
"""
import argparse
import datetime
import json
import platform
import tempfile
import time

import jax
import numpy as np

from dllm import grpo, model as model_lib, rewards, sharding, tasks, train
from dllm.config import base_config
from dllm.stage import StageContext

N = 6                       # completion tokens
GOOD = "abc"                # rewarded letters (ids 0, 1, 2)
LETTERS = 12

# name -> config.grpo overrides
VARIANTS = {
    "coupled": dict(estimator="coupled"),
    "coupled_no_full": dict(estimator="coupled", full_pass=False),
    "decoupled": dict(estimator="decoupled"),
    "full_mask": dict(estimator="full_mask"),
    "d1": dict(estimator="d1"),
    "reinforce": dict(estimator="full_mask", iterations=1, beta=0.0),
}


class BanditTokenizer:
    """Letters a.. for ids 0..11, then <|im_end|>, EOS, pad, mask; every prompt text
    encodes to the same 4 ids."""
    im_end_id, eos_id, pad_id, mask_id = LETTERS, LETTERS + 1, LETTERS + 2, LETTERS + 3
    vocab_size = LETTERS + 4

    def encode(self, text: str) -> list[int]:
        del text
        return [1, 2, 3, 4]

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + int(i)) for i in ids if int(i) < LETTERS)

    def apply_chat_template(self, messages, add_generation_prompt: bool) -> str:
        del messages, add_generation_prompt
        return ""


class BanditRollouts(grpo.Rollouts):
    """The stage's rollouts, scored by the bandit's reward instead of the sandbox."""

    def score(self, texts, task_rows) -> rewards.Rewards:
        del task_rows
        total = np.array([sum(ch in GOOD for ch in t) / N for t in texts])
        return rewards.Rewards(total=total, format=np.zeros_like(total), execution=total,
                               results=[None] * len(texts))


def bandit_config(variant: str, steps: int, lr: float, temperature: float, top_p: float,
                  seed: int):
    c = base_config("tiny")
    c.stage, c.seed = "grpo", seed
    c.model.update(vocab_size=BanditTokenizer.vocab_size, hidden=32, layers=2, heads=2,
                   kv_heads=1, head_dim=16, mlp=64)
    c.grpo = grpo.default_config()
    c.grpo.update(generations=8, max_prompt_len=4, **VARIANTS[variant])
    c.train.update(steps=steps, batch_size=32, lr=lr, warmup_steps=0, min_lr_ratio=1.0,
                   weight_decay=0.0, grad_clip=1.0, eval_every=0)
    c.sample.update(max_new_tokens=N, steps=N, block_length=N, alg="entropy",
                    temperature=temperature, top_p=top_p)
    return c


def run_bandit(variant: str = "coupled", steps: int = 40, lr: float = 1e-3,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> np.ndarray:
    """[steps]: at each optimizer step, the mean reward of the rollout it trains on
    (a rollout serves grpo.iterations steps)."""
    c = bandit_config(variant, steps, lr, temperature, top_p, seed)
    model = model_lib.Transformer(model_lib.config_from_dict(c.model))
    mesh, rules = sharding.make_mesh(c.mesh), sharding.rules_from_config(c.mesh)
    ctx = StageContext(config=c, workdir=tempfile.mkdtemp(), model=model,
                       tokenizer=BanditTokenizer(), mesh=mesh, rules=rules,
                       apply_fn=model_lib.model_apply(model))
    # One task (its prompt encodes to the bandit's prompt; its test is never run).
    task = tasks.Task("bandit", "bandit", "f", ("assert False",))
    batches = BanditRollouts(ctx, grpo.grpo_config_from_dict(c.grpo), [task])
    stage = grpo.make_stage(ctx, batches)
    tx, _ = train.make_optimizer(c.train)
    state, shardings = train.init_state(model, tx, seed, mesh, rules, stage.init_extra)
    mu = c.grpo.iterations
    curve = []
    with sharding.activate(mesh, rules):
        step_fn = train.jit_train_step(
            train.make_train_step(stage.loss_fn, tx, 1, stage.update_extra), shardings, mesh)
        for step in range(1, steps + 1):
            state, _ = step_fn(state, sharding.global_batch(batches.next(state), mesh))
            if step % mu == 0:
                curve += [batches.metrics(step)["reward"]] * mu
    return np.array(curve)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for variant in args.variants.split(","):
        t = time.perf_counter()
        curves = [run_bandit(variant, args.steps, args.lr, args.temperature, args.top_p, s)
                  for s in seeds]
        results[variant] = {"curve": np.mean(curves, 0).tolist(),
                            "seconds": time.perf_counter() - t}
    shown = sorted({1} | set(range(5, args.steps + 1, 5)))
    print(f"mean reward of the rollout trained on at each step (4 prompts x G = 8; mean "
          f"of seeds {args.seeds}; lr {args.lr}, temperature {args.temperature}, top-p "
          f"{args.top_p}; optimum 1.0)")
    print(f"{'variant':16s}" + "".join(f"{'s' + str(i):>6s}" for i in shown)
          + f"{'s1-6':>7s}{'last10':>7s}{'s':>6s}")
    for variant, r in results.items():
        c = np.asarray(r["curve"])
        print(f"{variant:16s}" + "".join(f"{c[i - 1]:6.2f}" for i in shown)
              + f"{c[:6].mean():7.2f}{c[-10:].mean():7.2f}{r['seconds']:6.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": platform.processor() or platform.machine(),
                       "date": datetime.date.today().isoformat(), "args": vars(args),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
