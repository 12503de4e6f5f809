"""The run directory: its config, its tokenizer, and the params of a checkpoint,
restored straight into shardings. Everything that reads a run (sampling,
evaluation, analysis, conversion, notebooks) goes through here and never imports
the trainer.

    run = runs.load_run("runs/sft")              # latest step, fsdp over all devices
    out = sampling.generate_text(run.params, ["def f(x):"], rng, cfg,
                                 apply_fn=run.apply_fn, tokenizer=run.tokenizer)

A run directory holds config.json, exactly one tokenizer (tokenizer.json for Hugging
Face tokenizers, tokenizer.model for sentencepiece), checkpoints/<step>/, and what
training writes beside them (metrics.jsonl, tensorboard/, samples, .lock). It may be
local or on gs:// (its files go through dllm.fs, its checkpoints through orbax).
Readers never create, clean or delete anything in it and see only committed
checkpoints, so they are safe while the run trains; a trainer holds `lock(workdir)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import socket
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from dllm import checkpoint, fs, model as model_lib, sharding
from dllm import tokenizer as tokenizer_lib

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# The one rule for a run's tokenizer: the first of these that exists.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
# Meshes for reading a run: params fsdp-sharded over every device, never replicated.
READ_MESH = dict(data=1, fsdp=-1, tensor=1)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """workdir/config.json (process 0 writes; atomically, so a reader never sees half)."""
    if jax.process_index() == 0:
        fs.makedirs(workdir)
        fs.write_text(os.path.join(workdir, CONFIG_FILE),
                      json.dumps(config.to_dict(), indent=2, default=str))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not fs.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a run directory: no {CONFIG_FILE}")
    try:
        return ml_collections.ConfigDict(json.loads(fs.read_text(path)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None


# Model keys a resumed run may change: they do not change what a checkpoint holds.
_RUNTIME_MODEL_KEYS = ("dtype", "remat", "preset", "attention", "xent_chunk")


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before a run writes anything into an existing run directory: raises ValueError
    if `config` cannot continue the run whose checkpoints are there (another stage, or
    model keys that change what a checkpoint holds), naming each differing key."""
    if not (fs.exists(os.path.join(workdir, CONFIG_FILE)) and _has_steps(workdir)):
        return
    saved = read_config(workdir)
    if "train" not in saved:
        raise ValueError(f"{workdir} holds an imported model, not a training run: start a run "
                         f"from it with --config.init.checkpoint={workdir} and a new --workdir")
    differ = [f"stage: {saved.get('stage')!r} there, {config.stage!r} here"
              ] if saved.get("stage") != config.stage else []
    for key in sorted(set(saved.model) | set(config.model)):
        there, here = saved.model.get(key), config.model.get(key)
        if key not in _RUNTIME_MODEL_KEYS and there != here:
            differ.append(f"model.{key}: {there!r} there, {here!r} here")
    if differ:
        raise ValueError(f"{workdir} holds a run whose checkpoints this config cannot continue "
                         f"({'; '.join(differ)}); resume with its settings ({CONFIG_FILE}) or "
                         "use a new --workdir. The run is left as it was.")


def _has_steps(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return fs.isdir(directory) and any(name.isdigit() for name in fs.listdir(directory))


class RunLockedError(RuntimeError):
    """Another process trains in this run directory."""


@contextlib.contextmanager
def lock(workdir: str):
    """Within: this process holds workdir/.lock, an exclusive flock whose file names the
    owner (host, pid), so a second trainer in the same run stops at once naming it. The
    kernel releases the lock when its process ends, however it ends: a killed run
    leaves no stale lock. Process 0 takes it for all the processes of its run. On gs://
    or a file system without flock (some FUSE mounts) a warning says the run is unguarded."""
    if jax.process_index() != 0:
        yield
        return
    if fs.is_remote(workdir):
        logging.warning("%s is on an object store: no lock stops a second trainer", workdir)
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            raise RunLockedError(f"{workdir} is in use by {owner} (lock {path}); wait for it "
                                 "to finish or stop it, or use another --workdir") from None
        except OSError as e:
            logging.warning("cannot lock %s (%s): nothing stops a second trainer", path, e)
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)   # releases the lock


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


def save_tokenizer(tok: tokenizer_lib.Tokenizer, workdir: str, source: str) -> None:
    """Keeps `tok` in the run directory (process 0 writes), so the run is self-contained.
    A different tokenizer already there (the run was trained with it) raises ValueError
    naming both; `source` says where `tok` came from."""
    name, contents = tok.to_file()
    try:
        existing = tokenizer_path(workdir)
    except FileNotFoundError:
        if jax.process_index() == 0:
            fs.makedirs(workdir)
            fs.write_bytes(os.path.join(workdir, name), contents)
        return
    if tokenizer_lib.load_tokenizer(existing).checksum() != tok.checksum():
        raise ValueError(f"{existing} is not the tokenizer this config uses ({source}): the "
                         "run was trained with it; resume with it or use a new --workdir")


def max_len(config: ml_collections.ConfigDict) -> int | None:
    """The longest sequence the run's model is for: the data.seq_len it was trained at,
    else (an imported model) its source's max_position_embeddings; None if unknown."""
    if "data" in config:
        return int(config.data.seq_len)
    return config.get("hf", {}).get("max_position_embeddings")


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
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None, read_only=True)
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

    @property
    def max_len(self) -> int | None:
        """Prompt + generated tokens may not exceed this (see `max_len`)."""
        return max_len(self.config)

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
