"""Checkpoints: an orbax CheckpointManager holding the train state (params,
optimizer state, step, rng) and the data iterator's state, saved together under
DIR/checkpoints/<step>/. Saves are asynchronous and every process writes its own
shards; orbax commits a step atomically, so a run killed mid-save (kill -9) resumes
from the previous complete step. A stop request (SIGTERM, what a TPU VM gets before
it is reclaimed, or Ctrl-C) is honoured at the next step boundary: all processes save
that step and stop. A step that no longer restores (a truncated file) is named and
the run resumes from the newest one that does.

Readers (`Checkpointer(..., read_only=True)`) see only committed steps and never
create, clean or delete anything, so they are safe beside a training run.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dllm import fs

_STOP = threading.Event()          # a stop was requested (SIGTERM or the first Ctrl-C)
_INTERRUPTED = threading.Event()   # ... by Ctrl-C: a second one exits at once


class ShapeMismatchError(ValueError):
    """The config's shapes are not the checkpoint's."""


class CheckpointError(RuntimeError):
    """No checkpoint step can be restored."""


def stop_requested() -> bool:
    """Whether SIGTERM or Ctrl-C arrived within `catch_stop_signals()` (one process)."""
    return _STOP.is_set()


def stop_reason() -> str:
    """How the last stop request came: "interrupted" (Ctrl-C) or "preempted"."""
    return "interrupted" if _INTERRUPTED.is_set() else "preempted"


@contextlib.contextmanager
def catch_stop_signals():
    """Within: SIGTERM (a preemption notice) and SIGINT (Ctrl-C) set a flag (read by
    `Checkpointer.reached_preemption`) instead of killing the process, so the run saves
    at the next step boundary and exits cleanly; a second Ctrl-C exits at once, without
    saving. Under jax.distributed, JAX's preemption service owns SIGTERM (it agrees on
    a step with the other processes), and Ctrl-C is handed to it as a SIGTERM."""
    if threading.current_thread() is not threading.main_thread():  # signal needs it
        yield
        return
    distributed = jax.distributed.is_initialized()

    def on_sigint(*_):
        if _INTERRUPTED.is_set():
            sys.stderr.write("second interrupt: exiting without saving\n")
            os._exit(130)
        _INTERRUPTED.set()
        sys.stderr.write("\ninterrupt: saving at the next step boundary, then stopping "
                         "(Ctrl-C again to exit at once without saving)\n")
        if distributed:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            _STOP.set()

    _STOP.clear()
    _INTERRUPTED.clear()
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, on_sigint)}
    if not distributed:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: _STOP.set())
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Checkpointer:
    """Save every `every` steps, keep the newest `keep`. read_only: for readers of a
    run (no directory created, no partial step cleaned up, nothing saved or deleted)."""

    def __init__(self, directory: str, every: int, keep: int | None, read_only: bool = False):
        self.every = every
        self.directory = directory if fs.is_remote(directory) else os.path.abspath(directory)
        if read_only and not fs.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoints: {self.directory} does not exist")
        options = (ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                cleanup_tmp_directories=False,
                                                save_interval_steps=0)
                   if read_only else
                   # cleanup_tmp_directories: drop the partial step a kill -9 mid-save leaves.
                   ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                                create=True, cleanup_tmp_directories=True))
        verbosity = logging.get_verbosity()
        if read_only:   # orbax warns that a read-only manager is read-only
            logging.set_verbosity(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                               "data": ocp.JsonCheckpointHandler()})
        finally:
            logging.set_verbosity(verbosity)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state) of `step` (default: latest), each array placed with the
        sharding of `abstract_state`'s leaf (jax.ShapeDtypeStruct with .sharding),
        which may differ from the mesh it was saved from. Shape mismatches raise
        ShapeMismatchError naming the parameter."""
        step = self.latest_step() if step is None else step
        _check_shapes(self.manager, step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=_pytree_restore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_newest_readable(self, abstract_state):
        """(state, data_state) of the newest step that restores. An unreadable newer step
        (a truncated or missing file) is named with its error and moved aside to
        <step>.unreadable (kept for inspection; the run can save that step again).
        Raises CheckpointError, moving nothing, when no step restores."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable = []
        for step in steps:
            try:
                state, data_state = self.restore(abstract_state, step)
            except ShapeMismatchError:   # the config, not the checkpoint, is wrong
                raise
            except Exception as e:  # noqa: BLE001 (an I/O or format error of this step)
                unreadable.append(step)
                print(unreadable_message(self.directory, step, e), flush=True)
                continue
            if unreadable:
                self._move_aside(unreadable)
                print(f"resuming from step {step}, the newest checkpoint that restores; "
                      f"unreadable step(s) {unreadable} moved to "
                      f"{self.directory}/<step>.unreadable", flush=True)
            return state, data_state
        raise CheckpointError(f"no checkpoint in {self.directory} restores (steps {steps}, "
                              "each named above); move the directory away to start afresh")

    def _move_aside(self, steps):
        if jax.process_index() == 0:
            for step in steps:
                path = os.path.join(self.directory, str(step))
                fs.rename(path, f"{path}.unreadable")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dllm checkpoint: unreadable steps moved")
        self.manager.reload()

    def restore_params(self, abstract_params, step: int | None = None):
        """Only the params of `step` (default: latest), placed like `abstract_params`:
        for starting a new run (fresh optimizer) from another run's weights. An
        unreadable step raises CheckpointError naming it and the other steps."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step} in {self.directory} (steps: "
                                    f"{sorted(self.manager.all_steps())})")
        try:
            _check_shapes(self.manager, step, {"params": abstract_params})
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=_pytree_restore({"params": abstract_params}, partial=True)))
        except ShapeMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 (an I/O or format error of this step)
            others = sorted(set(self.manager.all_steps()) - {step})
            raise CheckpointError(f"{unreadable_message(self.directory, step, e)}; other "
                                  f"steps: {others}") from e
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
        a stop was requested within `catch_stop_signals()`. Call it at every step."""
        if jax.distributed.is_initialized():
            return self.manager.reached_preemption(step)
        return stop_requested()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def unreadable_message(directory: str, step: int, error: BaseException) -> str:
    """One line naming the step and what failed to read: the innermost cause's first
    line (tensorstore names the array and the file)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return (f"checkpoint step {step} ({os.path.join(directory, str(step))}) is unreadable: "
            f"{type(error).__name__}: {lines[0][:400]}")


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
            raise ShapeMismatchError(
                f"checkpoint step {step}: parameter "
                f"{jax.tree_util.keystr(path, simple=True, separator='/')} has shape "
                f"{tuple(shape)} in the checkpoint but {tuple(want.shape)} in the config")
