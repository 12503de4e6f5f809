"""Checkpoints: an orbax CheckpointManager holding the train state (params,
optimizer state, step, rng) and the data iterator's state, saved together under
DIR/checkpoints/<step>/. Saves are asynchronous and every process writes its own
shards; orbax commits a step atomically, so a run killed mid-save (kill -9) resumes
from the previous complete step. A preemption notice (SIGTERM, what a TPU VM gets
before it is reclaimed) is honoured at the next step boundary: all processes save
that step and stop.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import orbax.checkpoint as ocp

from dllm import fs

_SIGTERM = threading.Event()


@contextlib.contextmanager
def catch_sigterm():
    """Within: SIGTERM sets a flag (read by `Checkpointer.reached_preemption`) instead
    of killing the process. Under jax.distributed, JAX's preemption service catches it
    instead and agrees on a step with the other processes, so nothing is installed."""
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal needs it
    if jax.distributed.is_initialized() or not in_main_thread:
        yield
        return
    _SIGTERM.clear()
    previous = signal.signal(signal.SIGTERM, lambda *_: _SIGTERM.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Checkpointer:
    """Save every `every` steps, keep the newest `keep`."""

    def __init__(self, directory: str, every: int, keep: int):
        self.every = every
        self.manager = ocp.CheckpointManager(
            directory if fs.is_remote(directory) else os.path.abspath(directory),
            # cleanup_tmp_directories: drop the partial step a kill -9 mid-save leaves.
            options=ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                                 create=True, cleanup_tmp_directories=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state) of `step` (default: latest), each array placed with the
        sharding of `abstract_state`'s leaf (jax.ShapeDtypeStruct with .sharding),
        which may differ from the mesh it was saved from. Shape mismatches raise
        naming the parameter."""
        step = self.latest_step() if step is None else step
        _check_shapes(self.manager, step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the params of `step` (default: latest), placed like `abstract_params`:
        for starting a new run (fresh optimizer) from another run's weights."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        _check_shapes(self.manager, step, {"params": abstract_params})
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_pytree_restore({"params": abstract_params}, partial=True)))
        return restored["state"]["params"]

    def save(self, step: int, state, data_state: dict | None, force: bool = False) -> bool:
        """Save if `step` is on the interval (or `force`); returns whether it saved.
        Every process writes its shards of `state`; process 0 writes `data_state`,
        which holds for all (their iterators are at the same position: data.make_dataset)."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state or {})))

    def reached_preemption(self, step: int) -> bool:
        """Whether to save `step` and stop: the step all processes agreed on after any
        of them got a preemption notice (jax.distributed), or, in one process, whether
        a SIGTERM arrived within `catch_sigterm()`. Call it at every step."""
        if jax.distributed.is_initialized():
            return self.manager.reached_preemption(step)
        return _SIGTERM.is_set()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _pytree_restore(abstract, partial: bool = False):
    """Restore args placing each array with its abstract leaf's sharding."""
    return ocp.args.PyTreeRestore(
        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial)


def _check_shapes(manager, step: int, abstract_state):
    """Compare the saved array shapes with the expected ones before restoring, so a
    config that does not match the checkpoint fails with the parameter's path."""
    saved = manager.item_metadata(step)["state"]
    if saved is None:
        return
    saved_flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
                  for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    for path, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        have = saved_flat.get(jax.tree_util.keystr(path, simple=True, separator="/"))
        shape = getattr(have, "shape", None)
        if shape is not None and tuple(shape) != tuple(want.shape):
            raise ValueError(f"checkpoint step {step}: parameter "
                             f"{jax.tree_util.keystr(path, simple=True, separator='/')} "
                             f"has shape {tuple(shape)} in the checkpoint but {tuple(want.shape)} "
                             "in the config")
