"""Tiny coupled-GRPO runs for the subprocess tests (kill -9 resume, reward rises): a
tiny model briefly instruction-tuned on a few tasks' reference solutions (an SFT
jsonl), then GRPO on those tasks from it; seconds per step on a CPU.

  python -m dllm.main --config=tests/tiny_grpo_config.py:warmup --workdir=WARM \
      --config.data.path=PAIRS.jsonl
  python -m dllm.main --config=tests/tiny_grpo_config.py:grpo --workdir=DIR \
      --config.init.checkpoint=WARM --config.grpo.tasks=TASKS.jsonl \
      --config.grpo.eval_tasks=TASKS.jsonl
"""
from dllm import config as config_lib

def get_config(arg: str = "grpo"):
    if arg == "warmup":
        c = config_lib.load_experiment("experiments/sft.py:tasks_tiny")
        # The layout of the GRPO runs' rollouts below: 112 prompt + 24 completion tokens.
        c.data.update(source="sft", eval_fraction=0.0, seq_len=136, sft_response_len=24)
        # Weight decay 0.01, not tasks_tiny's 0.1: the reward test below was sized on it.
        c.train.update(steps=200, batch_size=16, lr=3e-3, warmup_steps=10, eval_every=0,
                       weight_decay=0.01, log_every=40)
        c.checkpoint.update(every=200, keep=1)
    elif arg == "grpo":
        c = config_lib.load_experiment("experiments/coupled_grpo.py:tiny")
        c.init.warmup = ""
        # Evaluated at steps 0 and 12 on the training tasks (--config.grpo.eval_tasks),
        # 8 samples each with the same random numbers both times: the change in
        # eval_reward is the policy's, not the sampling noise's.
        c.grpo.update(generations=8, max_prompt_len=112, timeout=1.0, eval_samples=8,
                      eval_temperature=0.8)
        # 4 prompts x 8 completions; 6 rollouts of 2 inner iterations.
        c.train.update(steps=12, batch_size=32, lr=5e-4, warmup_steps=1, log_every=1,
                       eval_every=12)
        c.checkpoint.update(every=3, keep=10)
        # Temperature 0.8, not the recipe's 1.2: in 6 rollouts of 32 completions a tiny
        # model's improvement must stand out of the sampling noise.
        c.sample.update(max_new_tokens=24, steps=24, block_length=24, temperature=0.8)
    else:
        raise ValueError(f"unknown variant {arg!r}; allowed: warmup, grpo")
    return c
