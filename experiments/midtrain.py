"""Stage 2: mid-training (annealing on higher-quality code; same unconditional ELBO).

Starts from a Stage-1 run (`--config.init.checkpoint=RUN_DIR`, whose tokenizer is
reused unless data.tokenizer is set).

  tiny  continues `experiments/pretrain.py:tiny` at a lower LR on a smaller, curated
        slice of the standard library (the json, email, asyncio and collections
        packages).
  7b    the paper's recipe: 16B tokens of annealing code data x 4 epochs, LR 1e-5,
        2k warmup, cosine to 10%: 97.6k steps at 160 x 4096 tokens, after which the
        data ends. Reads a corpus prepared once with the Stage-1 run's tokenizer:
          python -m dllm.prepare --source=jsonl --path='anneal/*.jsonl.gz' \\
              --out=gs://YOUR_BUCKET/dllm/stage2/anneal --tokenizer=RUN_DIR/tokenizer.json
"""
from dllm.config import base_config


def get_config(arg: str = ""):
    if arg == "tiny":
        c = base_config("tiny")
        c.model.vocab_size = 512
        c.data.update(source="stdlib", seq_len=128, vocab_size=512,
                      path="json/*.py,email/*.py,asyncio/*.py,collections/*.py")
        c.train.update(steps=300, batch_size=16, lr=1e-3, b2=0.98, warmup_steps=30,
                       log_every=50, eval_every=300)
        c.checkpoint.update(every=100, keep=2)
        c.init.checkpoint = "runs/pretrain"
        return c
    if arg == "7b":
        c = base_config("7b")
        c.model.update(dtype="bfloat16", remat="full")
        c.data.update(source="prepared", seq_len=4096, packing="windows")
        c.data.mixture = dict(anneal=dict(path="gs://YOUR_BUCKET/dllm/stage2/anneal", epochs=4))
        c.train.update(steps=97_500, batch_size=160, lr=1e-5, warmup_steps=2_000,
                       min_lr_ratio=0.1, weight_decay=0.0, log_every=10, eval_every=5000)
        c.checkpoint.update(every=1000, keep=3)
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        return c
    raise ValueError(f"experiments/midtrain.py: variant {arg!r}; pass one of tiny, 7b "
                     "after a colon (--config=experiments/midtrain.py:tiny)")
