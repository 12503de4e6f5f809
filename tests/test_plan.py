"""The memory plan agrees with the real compiled step; the CLI compares remat policies."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

import subprocess_runs as runs
import tiny_config
from dllm import elbo, model as model_lib, plan, sharding, train

MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


def test_parse_mesh():
    assert plan.parse_mesh("fsdp:32") == {"data": 1, "fsdp": 32, "tensor": 1}
    assert plan.parse_mesh("data:2,tensor:4") == {"data": 2, "fsdp": 1, "tensor": 4}


def test_plan_agrees_with_the_real_compiled_step():
    """The plan (abstract arrays only) against a real state and batch on a (2, 2, 2)
    mesh: XLA's sizes are the same, and the parameter / optimizer bytes per device are
    what device 0 really holds."""
    config = tiny_config.get_config()
    config.mesh.update(MESH_222)
    planned = plan.plan(config, jax.devices())

    model = model_lib.Transformer(model_lib.config_from_dict(config.model))
    tx, _ = train.make_optimizer(config.train)
    mesh = sharding.make_mesh(config.mesh)
    state, shardings = train.init_state(model, tx, 0, mesh, sharding.DEFAULT_RULES)
    tokens = np.zeros((config.train.batch_size, config.data.seq_len), np.int32)
    with sharding.activate(mesh, sharding.DEFAULT_RULES):
        step = train.jit_train_step(train.make_train_step(
            elbo.stage_loss(config.loss, model_lib.model_apply(model), 1), tx), shardings, mesh)
        real = step.lower(state, sharding.global_batch({"tokens": tokens}, mesh)).compile()
    mem = real.memory_analysis()
    assert planned["temp"] == mem.temp_size_in_bytes > 0
    assert planned["argument"] == mem.argument_size_in_bytes
    assert planned["alias"] == mem.alias_size_in_bytes > 0          # the state is donated

    def on_device_0(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                   for s in leaf.addressable_shards if s.device == jax.devices()[0])
    assert planned["params"] == on_device_0(state.params)
    assert planned["opt_state"] == on_device_0(state.opt_state)
    n_params = model_lib.param_count(model_lib.config_from_dict(config.model))
    assert n_params * 4 / 8 < planned["params"] < n_params * 4 / 2  # split, not replicated
    assert planned["batch"] == tokens.nbytes // 4                      # over data x fsdp


def test_cli_shows_the_effect_of_remat(tmp_path):
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": runs.ROOT}
    proc = subprocess.run(
        [sys.executable, "-m", "dllm.plan", "--config=tests/tiny_config.py", "--mesh=fsdp:2",
         "--remat=none,full", "--hbm_gb=16", f"--json={out}"],
        cwd=runs.ROOT, env=env, capture_output=True, text=True, timeout=runs.TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fits" in proc.stdout and "fsdp:2" in proc.stdout
    none, full = json.loads(out.read_text())
    assert (none["remat"], full["remat"]) == ("none", "full")
    assert none["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert full["temp"] < none["temp"]          # recomputing saves activations
    assert full["params"] == none["params"] > 0
