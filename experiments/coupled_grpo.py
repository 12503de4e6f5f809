"""coupled-GRPO (DiffuCoder's RL stage): rollouts from the current policy, rewards
from executing the completions against the task's tests, a clipped-ratio policy loss
on diffusion log-probability estimates (see dllm/grpo.py).

  tiny            the synthetic task families (dllm.tasks: RL on "synthetic:rl", held
                  out "synthetic:heldout") on a tiny model warmed up on "synthetic:sft"
                  by experiments/sft.py:tasks_tiny (three disjoint sets of constants);
                  without --config.init.checkpoint the warm-up runs first (in
                  WORKDIR/warmup), so one command goes end to end.
  decoupled_tiny  tiny with independent masks at the same number of forward passes
  full_mask_tiny  tiny with the completion fully masked (one pass)
  d1_tiny         tiny with d1's estimator (full mask + 15% random prompt masking)
  7b              the paper's recipe from DiffuCoder-7B-Instruct weights
                  (--config.init.hf_dir=DIR) on AceCode-hard problems
                  (--config.grpo.tasks=FILE.jsonl, task_id / prompt / entry_point /
                  tests), HumanEval held out.

Each optimizer step trains on train.batch_size completions (grpo.generations per
prompt); one rollout serves grpo.iterations (mu) steps, each with fresh masks.
"""
from dllm import grpo
from dllm.config import base_config

TINY_ESTIMATORS = {"tiny": "coupled", "decoupled_tiny": "decoupled",
                   "full_mask_tiny": "full_mask", "d1_tiny": "d1"}


def tiny_config(estimator: str):
    c = base_config("tiny")
    c.stage = "grpo"
    c.model.vocab_size = 512
    c.init.warmup = "experiments/sft.py:tasks_tiny"
    c.grpo = grpo.default_config()
    c.grpo.update(estimator=estimator, generations=8, tasks="synthetic:rl",
                  eval_tasks="synthetic:heldout", eval_temperature=0.0, max_prompt_len=128,
                  timeout=2.0)
    # 4 prompts x 8 completions per step; 240 steps draw each family ~64 times (120
    # steps: held-out +0.110 and +0.034 from the seed-0 and seed-1 warm-ups; 240: +0.126
    # and +0.093, benchmarks/RESULTS.md).
    c.train.update(steps=240, batch_size=32, lr=2e-4, warmup_steps=5, min_lr_ratio=0.1,
                   weight_decay=0.0, b1=0.9, b2=0.99, grad_clip=1.0, log_every=2,
                   eval_every=30)
    c.checkpoint.update(every=30, keep=2)
    # Rollouts: the recipe's decoding (entropy order, one token per step, top-p 0.95,
    # temperature 1.2) at 32 tokens. One block spanning the completion decodes exactly
    # as no blocks do, but proposes tokens only there (not at every prompt position).
    c.sample.update(max_new_tokens=32, steps=32, block_length=32, alg="entropy", top_p=0.95,
                    temperature=1.2,
                    prompt="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\nWrite a Python function `add(x)` that returns "
                           "`x` plus 5.\nTest cases: assert add(1) == 6<|im_end|>\n"
                           "<|im_start|>assistant\n")
    return c


def get_config(arg: str = ""):
    if arg in TINY_ESTIMATORS:
        return tiny_config(TINY_ESTIMATORS[arg])
    if arg == "7b":
        c = base_config("diffucoder-7b")
        c.stage = "grpo"
        c.model.update(dtype="bfloat16", remat="full")
        c.grpo = grpo.default_config()
        # G = 10, mu = 2, eps 0.5, beta 0.01, ref <- 0.4 ref + 0.6 theta every 64 steps,
        # leave-one-out advantages without std scaling: all GrpoConfig defaults.
        c.grpo.update(eval_tasks="humaneval", eval_style="instruct", eval_temperature=0.4,
                      max_prompt_len=200, timeout=5.0)
        # 8 prompts x 10 completions per step in 2 micro-batches (the release: 5 per GPU x
        # 2 accumulation x 8 GPUs); one epoch over ~21K hard problems = 21K / 8 x mu steps.
        steps = 5_250
        c.train.update(steps=steps, batch_size=80, microbatches=2, lr=1e-6, warmup_steps=1,
                       min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=0.2,
                       log_every=10, eval_every=500)
        c.checkpoint.update(every=250, keep=3)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.data.seq_len = 2048  # the context of DiffuCoder's instruction tuning
        # Rollouts: 256 tokens in 256 steps, entropy order, top-p 0.95, temperature 1.2
        # (the paper; the released yaml uses 1.0); one block spanning the completion (the
        # same decoding as none, proposals only there).
        c.sample.update(max_new_tokens=256, steps=256, block_length=256, alg="entropy",
                        top_p=0.95, temperature=1.2)
        return c
    raise ValueError(f"experiments/coupled_grpo.py: variant {arg!r}; pass one of "
                     f"{', '.join(TINY_ESTIMATORS)}, 7b after a colon "
                     "(--config=experiments/coupled_grpo.py:tiny)")
