"""Stage 3: instruction tuning (conditional ELBO: the prompt is never masked).

Responses are padded with <|dlm_pad|> to a fixed length and the pads are trained on,
as in DiffuCoder; `--config.loss.train_on_pad=False` is the "flexible padding" variant.

  tiny        ~200 synthetic Python instructions (experiments/data/sft_tiny.jsonl), from
              scratch or from a Stage-1/2 run with --config.init.checkpoint=RUN_DIR.
  tasks_tiny  the instruction-tuning split of the synthetic task families (dllm.tasks,
              "synthetic:sft") in DiffuCoder's RL prompt format: the warm-up that
              experiments/coupled_grpo.py:tiny starts from.
  7b    the paper's recipe: 436K instruction pairs, length 2048, 5 epochs, LR 1e-5,
        warmup ratio 0.1, cosine to 10% (global batch 256, an assumption: 8.4k steps of
        the 5 x ~432K training pairs, after which the data ends). Reads the pairs
        ({"prompt", "response"} or {"messages"} jsonl) prepared once with the base run's
        tokenizer:
          python -m dllm.prepare --source=sft --path=instruct.jsonl \\
              --out=gs://YOUR_BUCKET/dllm/sft/instruct --tokenizer=RUN_DIR/tokenizer.json
"""
from dllm.config import base_config


def get_config(arg: str = ""):
    if arg == "tiny":
        c = base_config("tiny")
        c.model.vocab_size = 512
        c.data.update(source="sft", path="experiments/data/sft_tiny.jsonl", seq_len=128,
                      vocab_size=512, eval_fraction=0.15)   # 18 pairs: one eval batch
        c.train.update(steps=300, batch_size=16, lr=2e-3, b2=0.98, warmup_steps=30,
                       log_every=50, eval_every=300)
        c.checkpoint.update(every=100, keep=2)
        c.sample.prompt = "<|im_start|>user\nWrite a function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"
        return c
    if arg == "tasks_tiny":
        c = base_config("tiny")
        c.model.vocab_size = 512
        # Rows in the layout of coupled_grpo.py:tiny's rollouts (prompts left-padded to
        # 128 tokens, 32 completion tokens): a tiny model does not carry what it learns
        # at one canvas length over to another.
        c.data.update(source="tasks", path="synthetic:sft", seq_len=160, sft_response_len=32,
                      vocab_size=512, eval_fraction=0.045)  # 35 of the 772 sft tasks
        # Copying a constant the model never wrote (two sentencepiece pieces, "▁13" "7")
        # is learnt late and suddenly: the training loss plateaus near 0.1, then falls
        # (after step 3000 at seed 0), and only then do held-out tasks pass. 3000-step
        # warm-ups crossed it in three of seven tries (seeds, tokenizers, weight decay);
        # these 6000 steps at weight decay 0.1 (27 min on 2 idle cores) crossed it at
        # seeds 0, 1 and 2 (benchmarks/RESULTS.md).
        c.train.update(steps=6000, batch_size=32, lr=3e-3, b2=0.98, warmup_steps=50,
                       weight_decay=0.1, log_every=50, eval_every=6000)
        c.checkpoint.update(every=500, keep=1)
        c.sample.update(max_new_tokens=32, steps=32, alg="entropy")
        c.sample.prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                           "<|im_start|>user\nWrite a Python function `add(x)` that returns "
                           "`x` plus 5.\nTest cases: assert add(1) == 6<|im_end|>\n"
                           "<|im_start|>assistant\n")
        return c
    if arg == "7b":
        c = base_config("7b")
        c.model.update(dtype="bfloat16", remat="full")
        c.data.update(source="prepared", packing="sft", seq_len=2048)
        c.data.mixture = dict(instruct=dict(path="gs://YOUR_BUCKET/dllm/sft/instruct", epochs=5))
        steps = 8_400
        c.train.update(steps=steps, batch_size=256, lr=1e-5, warmup_steps=steps // 10,
                       min_lr_ratio=0.1, weight_decay=0.0, log_every=10, eval_every=1000)
        c.checkpoint.update(every=500, keep=3)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.sample.update(max_new_tokens=256, temperature=0.3)
        return c
    raise ValueError(f"experiments/sft.py: variant {arg!r}; pass one of tiny, tasks_tiny, 7b "
                     "after a colon (--config=experiments/sft.py:tiny)")
