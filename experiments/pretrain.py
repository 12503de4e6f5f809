"""Stage 1: adaptation pretraining (unconditional ELBO on code).

  tiny  one CPU, a few minutes: a ~1M-parameter MDM on the Python standard library,
        with its own 512-token sentencepiece BPE (a larger vocabulary is too sparse for
        this model and budget: at 2048 tokens the loss sits at the unigram plateau).
  adapt Stage 1 from an autoregressive checkpoint on one host: Qwen2.5-Coder-0.5B
        (--config.init.hf_dir=DIR, its tokenizer is used), attention annealed from
        causal to full over the first 1000 steps, on the standard library.
  7b    the paper's recipe: DiffuCoder-7B shape, context 4096, global batch 160
        (2 per GPU x 80 GPUs), 100k steps (65B tokens), Adam peak LR 2e-5, 20k warmup,
        cosine to 10%; 1% of batches truncated to a random length and 1% with a random
        clean prefix; attention annealed from causal to full over 10k steps when
        starting from Qwen2.5-Coder-7B (DiffuLLaMA). Reads three corpora prepared once
        with Qwen2.5-Coder-7B's tokenizer (set the paths to yours):
          python -m dllm.prepare --source=jsonl --path='code/*.jsonl.gz' \\
              --out=gs://YOUR_BUCKET/dllm/stage1/code --tokenizer=Qwen2.5-Coder-7B
        and likewise text and math; mixed as code 78%, code-related text 20%, math 2%
        with sample weight 3 (the paper's corpus).

  python -m dllm.main --config=experiments/pretrain.py:tiny --workdir=runs/pretrain
"""
from dllm.config import base_config


def get_config(arg: str = ""):
    if arg == "tiny":
        c = base_config("tiny")
        c.model.vocab_size = 512
        c.data.update(source="stdlib", seq_len=128, vocab_size=512, max_documents=400,
                      eval_fraction=0.02)
        c.train.update(steps=1000, batch_size=16, lr=2e-3, b2=0.98, warmup_steps=50,
                       log_every=50, eval_every=500)
        c.checkpoint.update(every=250, keep=2)
        return c
    if arg == "adapt":
        c = base_config("qwen2.5-coder-0.5b")
        c.model.update(causal=False, dtype="bfloat16", remat="full")
        c.data.update(source="stdlib", seq_len=512, eval_fraction=0.01)
        c.loss.update(truncate_prob=0.01, prefix_prob=0.01, anneal_steps=1_000)
        c.train.update(steps=5_000, batch_size=8, lr=2e-5, warmup_steps=500, min_lr_ratio=0.1,
                       weight_decay=0.0, log_every=10, eval_every=500)
        c.checkpoint.update(every=500, keep=2)
        c.sample.update(max_new_tokens=128)
        return c
    if arg == "7b":
        # Adapts Qwen2.5-Coder-7B: pass --config.init.hf_dir=DIR.
        c = base_config("7b")
        c.model.update(dtype="bfloat16", remat="full")
        c.data.update(source="prepared", seq_len=4096, packing="windows")
        c.data.mixture = dict(
            code=dict(path="gs://YOUR_BUCKET/dllm/stage1/code", weight=0.78),
            text=dict(path="gs://YOUR_BUCKET/dllm/stage1/text", weight=0.20),
            math=dict(path="gs://YOUR_BUCKET/dllm/stage1/math", weight=0.02, sample_weight=3.0))
        c.loss.update(truncate_prob=0.01, prefix_prob=0.01, anneal_steps=10_000)
        c.train.update(steps=100_000, batch_size=160, lr=2e-5, warmup_steps=20_000,
                       min_lr_ratio=0.1, weight_decay=0.0, b2=0.999, log_every=10,
                       eval_every=5000)
        c.checkpoint.update(every=1000, keep=3)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.sample.update(max_new_tokens=256)
        return c
    raise ValueError(f"experiments/pretrain.py: variant {arg!r}; pass one of tiny, adapt, 7b "
                     "after a colon (--config=experiments/pretrain.py:tiny)")
