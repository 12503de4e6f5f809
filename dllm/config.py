"""The keys every stage config has, with their defaults. `experiments/<stage>.py`
starts from `base_config()` and sets what its stage and variant need.

Keys (scripts and docs rely on these names):
  seed                  int
  stage                 the stage trained: elbo (pretraining / mid-training / SFT, dllm.elbo)
                        | grpo (coupled-GRPO, dllm.grpo)
  model.*               dllm.model.ModelConfig fields (see `model.preset`), plus `preset`
  data.*                dllm.data fields: source, path, seq_len, ... (see dllm/data.py)
  loss.*                dllm.elbo.ElboConfig fields: schedule, train_on_pad, anneal_steps, ...
  train.steps, batch_size (global), lr (peak), warmup_steps, min_lr_ratio (cosine floor
        as a fraction of lr), weight_decay (AdamW's; kernels and embeddings only, not
        biases and norm scales, as HF's trainers), b1, b2, grad_clip, log_every,
        eval_every (0 = never; else also at step 0), eval_batches, eval_samples (MC
        samples of the held-out NELBO), microbatches (gradient accumulation: the global
        batch is split into this many slices, one in memory at a time; 1 = off)
  checkpoint.every, keep
  mesh.data, fsdp, tensor    device-mesh sizes within a slice; one may be -1 (all
                        remaining devices)
  mesh.dcn.data, fsdp, tensor   sizes across slices (multi-slice TPU; processes where
                        devices have no slice); one may be -1 (all slices); default 1
  mesh.rules            (logical axis, mesh axes) pairs: batch over data+fsdp, embed
                        over fsdp, heads / kv_heads / mlp / vocab over tensor
  distributed.coordinator_address   "host:port" of process 0 for multi-process runs
                        outside a detected cluster; "" = auto-detect (TPU VMs, SLURM,
                        ...) or one process; with num_processes, process_id, timeout_s
  sample.*              every dllm.sampling.SampleConfig field (decoding settings for every
                        place the stage generates: --config.sample.alg=entropy ...) and
                        `prompt`, the code prompt completed at the end of training
  init.checkpoint       a run directory whose latest params start this run ("" = none)
  init.hf_dir           or a Hugging Face model directory (Qwen2 / Dream safetensors) whose
                        weights and tokenizer start it; model.* must match its config.json
"""
import dataclasses

import ml_collections

from dllm import data, elbo, model, sampling, sharding


def base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = "elbo"
    c.model = model.preset(preset)
    c.model.preset = preset
    c.data = data.default_config()
    c.loss = dataclasses.asdict(elbo.ElboConfig())
    c.train = dict(steps=1000, batch_size=16, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1,
                   weight_decay=0.01, b1=0.9, b2=0.999, grad_clip=1.0, log_every=50,
                   eval_every=0, eval_batches=4, eval_samples=4, microbatches=1)
    c.checkpoint = dict(every=500, keep=2)
    c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn=dict(data=1, fsdp=1, tensor=1),
                  rules=sharding.DEFAULT_RULES)
    c.distributed = dict(coordinator_address="", num_processes=1, process_id=0, timeout_s=300)
    c.sample = dict(prompt="def fibonacci(n):\n", **dataclasses.asdict(sampling.SampleConfig()))
    c.sample.max_new_tokens = 48
    c.init = dict(checkpoint="", hf_dir="")
    return c
