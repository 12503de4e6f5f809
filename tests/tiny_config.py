"""A tiny run for the subprocess tests (kill -9, SIGTERM, two processes): seconds per
step on a CPU.

  python -m dllm.main --config=tests/tiny_config.py --workdir=DIR
"""
from dllm import config as config_lib


def get_config(arg: str = ""):
    del arg
    c = config_lib.base_config()
    c.model.update(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp=128,
                   vocab_size=512)
    c.data.update(source="stdlib", seq_len=64, vocab_size=512, max_documents=30,
                  eval_fraction=0.1)
    c.train.update(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0)
    c.checkpoint.update(every=4, keep=5)
    c.sample.update(max_new_tokens=4)
    return c
