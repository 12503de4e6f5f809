"""The run directory: its config, its tokenizer, and the params of a checkpoint,
restored straight into shardings. Everything that reads a run (sampling,
evaluation, analysis, conversion, notebooks) goes through here and never imports
the trainer.

    run = runs.load_run("runs/sft")              # latest step, fsdp over all devices
    out = sampling.generate_text(run.params, ["def f(x):"], rng, cfg,
                                 apply_fn=run.apply_fn, tokenizer=run.tokenizer)

A run directory holds config.json, exactly one tokenizer (tokenizer.json for Hugging
Face tokenizers, tokenizer.model for sentencepiece), checkpoints/<step>/, and what
training writes beside them (metrics.jsonl, tensorboard/, samples). It may be local or
on gs:// (its files go through dllm.fs, its checkpoints through orbax).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from dllm import checkpoint, fs, model as model_lib, sharding
from dllm import tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
# The one rule for a run's tokenizer: the first of these that exists.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Meshes for reading a run: params fsdp-sharded over every device, never replicated.
READ_MESH = dict(data=1, fsdp=-1, tensor=1)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """workdir/config.json (process 0 writes)."""
    if jax.process_index() == 0:
        fs.makedirs(workdir)
        fs.write_text(os.path.join(workdir, CONFIG_FILE),
                      json.dumps(config.to_dict(), indent=2, default=str))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a run directory: no {CONFIG_FILE}")
    return ml_collections.ConfigDict(json.loads(fs.read_text(path)))


def tokenizer_path(workdir: str) -> str:
    """The run's tokenizer file: the first of TOKENIZER_FILES in it."""
    for name in TOKENIZER_FILES:
        path = os.path.join(workdir, name)
        if fs.exists(path):
            return path
    raise FileNotFoundError(f"run directory {workdir!r} holds no tokenizer "
                            f"({' or '.join(TOKENIZER_FILES)})")


def load_tokenizer(workdir: str) -> tokenizer_lib.Tokenizer:
    return tokenizer_lib.load_tokenizer(tokenizer_path(workdir))


def param_shardings(model_cfg: model_lib.ModelConfig, mesh: Mesh,
                    rules=sharding.DEFAULT_RULES):
    """NamedShardings of the params on `mesh`, from their logical axis names."""
    return sharding.logical_shardings(model_lib.abstract_params(model_cfg), mesh, rules)


def restore_params(workdir: str, step: int | None = None, mesh: Mesh | None = None,
                   rules=sharding.DEFAULT_RULES, model_cfg: model_lib.ModelConfig | None = None):
    """(ModelConfig, params) of the run's checkpoint `step` (default: latest), each
    array restored straight into its sharding on `mesh` (default: fsdp over every
    device), so a 7B run never needs a replicated copy. model_cfg: the shapes and
    dtypes to restore into (default: the run's own; a run starting from another
    passes its own, and a shape mismatch names the parameter)."""
    cfg = model_cfg or model_lib.config_from_dict(read_config(workdir).model)
    mesh = mesh or sharding.make_mesh(READ_MESH)
    abstract = sharding.abstract_arrays(nn.unbox(model_lib.abstract_params(cfg)),
                                        param_shardings(cfg, mesh, rules))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
    try:
        params = ckpt.restore_params(abstract, step)
    finally:
        ckpt.close()
    return cfg, params


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the run's complete checkpoints, ascending ([] when none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained run, ready to decode or score."""
    workdir: str
    config: ml_collections.ConfigDict
    model: model_lib.Transformer
    params: Any
    tokenizer: tokenizer_lib.Tokenizer
    mesh: Mesh

    @functools.cached_property
    def apply_fn(self) -> Callable:
        """model_lib.model_apply(self.model): one object per run (no recompiles)."""
        return model_lib.model_apply(self.model)


def load_run(workdir: str, step: int | None = None, mesh: Mesh | None = None) -> Run:
    """The run's config, model, tokenizer and the params of `step` (default: latest),
    sharded on `mesh` (default: fsdp over every device)."""
    mesh = mesh or sharding.make_mesh(READ_MESH)
    config = read_config(workdir)
    tok = load_tokenizer(workdir)
    cfg, params = restore_params(workdir, step, mesh)
    return Run(workdir, config, model_lib.Transformer(cfg), params, tok, mesh)
