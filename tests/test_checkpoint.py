"""Checkpoints: keep-N, resharding restore (8 -> 4 devices), shape mismatch, and
preemption: kill -9 then rerun resumes exactly; SIGTERM saves and exits 0."""
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import subprocess_runs as runs
import tiny_config
from dllm import checkpoint, model as model_lib, sharding, train
from dllm import runs as dllm_runs


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
    reference run's losses (same data order, same random numbers) to the end, with
    every step in metrics.jsonl once (rows logged after the saved step are dropped)."""
    workdir = tiny_runs.workdir(name)
    assert runs.finish(tiny_runs.launch(name)) == 0, runs.read_logs(workdir)
    assert "unreadable" not in runs.read_logs(workdir)
    rows = runs.metric_rows(workdir)
    steps = tiny_config.get_config().train.steps
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    reference = runs.losses(tiny_runs.workdir("reference"))
    assert [r["loss"] for r in rows] == [reference[r["step"]] for r in rows]


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
def test_ctrl_c_saves_at_the_step_boundary_and_exits_cleanly(tiny_runs):
    """SIGINT (Ctrl-C) as SIGTERM: the step is saved, the run exits 0 with the resume
    hint and no traceback; the resumed run logs each step once, with the losses of an
    uninterrupted run."""
    proc = tiny_runs.launch("interrupted")
    workdir = tiny_runs.workdir("interrupted")
    runs.wait_for(proc, workdir, "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    assert runs.finish(proc) == 0, runs.read_logs(workdir)
    log = runs.read_logs(workdir)
    saved = max(runs.checkpoint_steps(workdir))
    assert f"interrupted: saved step {saved} in {workdir}/checkpoints; rerun the same command " \
           "to resume" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert saved < tiny_config.get_config().train.steps
    _resume_and_compare(tiny_runs, "interrupted", saved)


@pytest.mark.slow
def test_ctrl_c_to_two_processes_stops_both_at_the_same_step(tiny_runs):
    """Ctrl-C in a terminal reaches every process of the group: each hands it to JAX's
    preemption service as a SIGTERM, and both save one step together and exit 0."""
    procs = runs.launch_pair(tiny_runs, "pair_interrupted")
    workdir = tiny_runs.workdir("pair_interrupted")
    runs.wait_for(procs[0], workdir, "metrics.jsonl")
    for p in procs:
        p.send_signal(signal.SIGINT)
    assert [runs.finish(p) for p in procs] == [0, 0], runs.read_logs(workdir)
    saved = runs.checkpoint_steps(workdir)
    assert len(saved) == 1 and saved[0] < tiny_config.get_config().train.steps
    logs = [open(os.path.join(workdir, f"log.{i}.txt")).read() for i in range(2)]
    assert all(f"interrupted: saved step {saved[0]} " in log for log in logs), logs


_TWO_INTERRUPTS = """
import os, signal, sys, time
from dllm import checkpoint
with checkpoint.catch_stop_signals():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    print("stop requested:", checkpoint.stop_requested(), flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
print("not reached")
"""


def test_a_second_ctrl_c_exits_at_once():
    """The first Ctrl-C asks for a stop at the next step boundary; the second exits at
    once (130), without a traceback."""
    done = subprocess.run([sys.executable, "-c", _TWO_INTERRUPTS], capture_output=True,
                          text=True, timeout=120, cwd=runs.ROOT,
                          env={**os.environ, "PYTHONPATH": runs.ROOT})
    assert done.returncode == 130, done.stderr
    assert done.stdout == "stop requested: True\n"
    assert "saving at the next step boundary" in done.stderr
    assert done.stderr.strip().endswith("second interrupt: exiting without saving")
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_reader_does_not_disturb_a_training_run(tiny_runs):
    """Reading a run while it saves every step (what dllm.sample / evaluate / convert do)
    creates, cleans and deletes nothing: the run trains to the end with the reference
    losses (a reader's orbax manager used to delete the trainer's in-flight save)."""
    name = "read_while_training"
    workdir = tiny_runs.workdir(name)
    proc = tiny_runs.launch(name, "--config.checkpoint.every=1", "--config.checkpoint.keep=30")
    runs.wait_for(proc, workdir, "checkpoints/1")
    reads = 0
    while proc.poll() is None:
        params = runs.restore_params(workdir)
        assert params["embed"]["embedding"].shape == (512, 64)
        reads += 1
    assert proc.wait() == 0, runs.read_logs(workdir)
    assert reads >= 2
    reference = runs.losses(tiny_runs.workdir("reference"))
    assert runs.losses(workdir) == reference
    assert dllm_runs.load_run(workdir).tokenizer.vocab_size == 512  # data.tokenizer copied in


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
