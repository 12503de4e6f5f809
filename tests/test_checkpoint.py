"""Checkpoints: keep-N, resharding restore (8 -> 4 devices), shape mismatch, and
preemption: kill -9 then rerun resumes exactly; SIGTERM saves and exits 0."""
import os
import signal

import jax
import numpy as np
import pytest

import subprocess_runs as runs
import tiny_config
from dllm import checkpoint, model as model_lib, sharding, train


def _abstract_state(config, mesh):
    model = model_lib.Transformer(model_lib.config_from_dict(config.model))
    tx, _ = train.make_optimizer(config.train)
    return model, tx, train.abstract_state(model, tx, mesh, sharding.DEFAULT_RULES)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny train state initialised on a (data 2, fsdp 2, tensor 2) mesh of 8 devices,
    saved at steps 1, 2, 3 with keep=2. Returns (directory, host copy of the state)."""
    config = tiny_config.get_config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model, tx, _ = _abstract_state(config, mesh)
    state, _ = train.init_state(model, tx, 3, mesh, sharding.DEFAULT_RULES)
    directory = str(tmp_path_factory.mktemp("ckpt"))
    ckpt = checkpoint.Checkpointer(directory, every=1, keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"position": step})
    ckpt.close()
    return directory, jax.device_get(state)


def test_keeps_the_newest_n(saved):
    directory, _ = saved
    assert sorted(os.listdir(directory)) == ["2", "3"]


def test_restore_on_a_smaller_mesh_reshards(saved):
    """Saved from 8 devices, restored onto a (fsdp 4) mesh of 4: identical values,
    laid out as the new mesh says."""
    directory, expected = saved
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, jax.devices()[:4])
    _, _, abstract = _abstract_state(tiny_config.get_config(), mesh)
    ckpt = checkpoint.Checkpointer(directory, every=1, keep=2)
    state, data_state = ckpt.restore(abstract)
    ckpt.close()
    assert data_state == {"position": 3}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), expected)
    gate = state.params["layers"]["mlp"]["gate"]["kernel"]
    assert gate.sharding.mesh.devices.size == 4
    assert gate.addressable_shards[0].data.shape == (2, 16, 128)


def test_restore_with_other_shapes_names_the_parameter(saved):
    directory, _ = saved
    config = tiny_config.get_config()
    config.model.mlp = 96
    _, _, abstract = _abstract_state(config, sharding.make_mesh({"data": -1, "fsdp": 1,
                                                                 "tensor": 1}))
    ckpt = checkpoint.Checkpointer(directory, every=1, keep=2)
    with pytest.raises(ValueError, match=r"layers/mlp/down/kernel has shape \(2, 128, 64\) in "
                                         r"the checkpoint but \(2, 96, 64\)"):
        ckpt.restore(abstract)
    ckpt.close()


# ----------------------------------------------------------------------------- preemption


def _resume_and_compare(tiny_runs, name, saved_step):
    """Reruns the same command; it must continue from `saved_step` and log exactly the
    reference run's losses (same data order, same random numbers) to the end."""
    workdir = tiny_runs.workdir(name)
    before = len(runs.metric_rows(workdir))
    assert runs.finish(tiny_runs.launch(name)) == 0, runs.read_logs(workdir)
    resumed = runs.metric_rows(workdir)[before:]
    steps = tiny_config.get_config().train.steps
    assert [r["step"] for r in resumed] == list(range(saved_step + 1, steps + 1))
    reference = runs.losses(tiny_runs.workdir("reference"))
    assert [r["loss"] for r in resumed] == [reference[r["step"]] for r in resumed]


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_exactly(tiny_runs):
    proc = tiny_runs.launch("killed")
    workdir = tiny_runs.workdir("killed")
    runs.wait_for(proc, workdir, "checkpoints/4")
    proc.send_signal(signal.SIGKILL)
    assert runs.finish(proc) == -signal.SIGKILL
    saved = runs.checkpoint_steps(workdir)
    assert saved and max(saved) < tiny_config.get_config().train.steps  # killed mid-run
    _resume_and_compare(tiny_runs, "killed", max(saved))


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_0(tiny_runs):
    proc = tiny_runs.launch("preempted")
    workdir = tiny_runs.workdir("preempted")
    runs.wait_for(proc, workdir, "metrics.jsonl")    # training has started
    proc.send_signal(signal.SIGTERM)
    assert runs.finish(proc) == 0, runs.read_logs(workdir)
    saved = max(runs.checkpoint_steps(workdir))
    assert f"preempted: saved step {saved} " in runs.read_logs(workdir)
    assert saved < tiny_config.get_config().train.steps
    _resume_and_compare(tiny_runs, "preempted", saved)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_runs):
    """JAX's preemption service spreads the notice: both processes save one step
    together (each its own shards) and exit 0."""
    procs = runs.launch_pair(tiny_runs, "pair_preempted")
    workdir = tiny_runs.workdir("pair_preempted")
    runs.wait_for(procs[0], workdir, "metrics.jsonl")
    procs[1].send_signal(signal.SIGTERM)
    assert [runs.finish(p) for p in procs] == [0, 0], runs.read_logs(workdir)
    saved = runs.checkpoint_steps(workdir)
    assert len(saved) == 1 and saved[0] < tiny_config.get_config().train.steps
    logs = [open(os.path.join(workdir, f"log.{i}.txt")).read() for i in range(2)]
    assert all(f"preempted: saved step {saved[0]} " in log for log in logs), logs
