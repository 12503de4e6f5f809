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

`validate(config)` checks all of it before a run writes anything.
"""
import dataclasses
import os

import jax
import ml_collections

from dllm import data, elbo, fs, model, sampling, sharding
from dllm.stage import STAGES


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


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the whole config before a run writes anything: each section's keys and
    allowed values, the stage, the step counts, the mesh against the devices and the
    global batch against the mesh, and that the files it names exist. Raises ValueError,
    KeyError or FileNotFoundError naming the key."""
    if config.stage not in STAGES:
        raise ValueError(f"stage={config.stage!r}; allowed: {sorted(STAGES)}")
    model.config_from_dict(config.model)
    elbo.elbo_config_from_dict(config.loss)
    sampling.sample_config_from_dict(config.sample)
    data.validate_config(config.data)
    tc = config.train
    for key, low in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("eval_every", 0),
                     ("eval_batches", 1), ("eval_samples", 1), ("warmup_steps", 0),
                     ("microbatches", 1)):
        if tc[key] < low:
            raise ValueError(f"train.{key}={tc[key]}; must be >= {low}")
    if config.checkpoint.every < 1 or (config.checkpoint.keep or 1) < 1:
        raise ValueError(f"checkpoint.every={config.checkpoint.every} and checkpoint.keep="
                         f"{config.checkpoint.keep} must be >= 1")
    if config.sample.max_new_tokens >= config.data.seq_len:
        raise ValueError(f"sample.max_new_tokens={config.sample.max_new_tokens} does not fit "
                         f"the context the model is trained at (data.seq_len="
                         f"{config.data.seq_len})")
    _check_batch(config)
    _check_init(config.init)


def _check_batch(config) -> None:
    """The global batch splits over the processes and, in each microbatch, over the
    data-parallel devices (mesh data x fsdp)."""
    mesh = sharding.make_mesh(config.mesh)
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    batch, micro = config.train.batch_size, config.train.microbatches
    if batch % jax.process_count():
        raise ValueError(f"train.batch_size={batch} is not a multiple of the "
                         f"{jax.process_count()} processes")
    if batch % (micro * parallel):
        raise ValueError(
            f"train.batch_size={batch} does not split into train.microbatches={micro} x "
            f"{parallel} data-parallel devices (mesh data {mesh.shape['data']} x fsdp "
            f"{mesh.shape['fsdp']}); use a multiple of {micro * parallel}")


def _check_init(init) -> None:
    if init.checkpoint and init.hf_dir:
        raise ValueError("init.checkpoint and init.hf_dir are both set; set one")
    for key, what in (("checkpoint", "a run directory"),
                      ("hf_dir", "a Hugging Face model directory")):
        if init[key] and not fs.exists(os.path.join(init[key], "config.json")):
            raise FileNotFoundError(f"init.{key}={init[key]!r} is not {what} (no config.json)")
