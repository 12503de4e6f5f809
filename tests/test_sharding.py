"""Meshes from config, sharded training equal to one device, two real processes."""
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import subprocess_runs as runs
import tiny_config
from dllm import elbo, model as model_lib, sharding, train

MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}


# ----------------------------------------------------------------------------- meshes


def test_mesh_shape_fills_and_checks():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.mesh_shape(MESH_222, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="does not divide 8"):
        sharding.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="needs 4 devices, 8 available"):
        sharding.mesh_shape({"data": 1, "fsdp": 4, "tensor": 1}, 8)
    mesh = sharding.make_mesh(MESH_222)
    assert dict(mesh.shape) == MESH_222
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _fake_devices(n, per_slice):
    return [types.SimpleNamespace(id=i, slice_index=i // per_slice, process_index=i // 2,
                                  platform="cpu", device_kind="cpu") for i in range(n)]


@pytest.mark.parametrize("axis", ["data", "fsdp"])
def test_multislice_grid_keeps_each_slice_together(axis):
    """Two slices of 4 devices, the dcn axis across slices: each slice is one half
    of that axis, so only that axis's collectives cross the slow network."""
    dcn = {"data": 1, "fsdp": 1, "tensor": 1, axis: -1}
    grid = sharding.device_grid({"data": 1, "fsdp": 2, "tensor": 2, "dcn": dcn},
                                _fake_devices(8, per_slice=4))
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    sizes[axis] *= 2
    assert grid.shape == tuple(sizes.values())
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    halves = np.split(slices, 2, axis=sharding.MESH_AXES.index(axis))
    assert (halves[0] == 0).all() and (halves[1] == 1).all()
    with pytest.raises(ValueError, match="config.mesh.dcn"):
        sharding.device_grid({"data": 1, "fsdp": 2, "tensor": 2,
                              "dcn": {"data": 3, "fsdp": 1, "tensor": 1}},
                             _fake_devices(8, per_slice=4))


# ----------------------------------------------------------------------------- sharded training


def _run(mesh, config, batches):
    """Losses of len(batches) steps from the same init on `mesh`, and the final state."""
    model = model_lib.Transformer(model_lib.config_from_dict(config.model))
    tx, _ = train.make_optimizer(config.train)
    rules = sharding.rules_from_config(config.mesh)
    state, shardings = train.init_state(model, tx, 0, mesh, rules)
    loss_fn = elbo.stage_loss(config.loss, model_lib.model_apply(model),
                              config.model.vocab_size - 1)
    with sharding.activate(mesh, rules):
        step = train.jit_train_step(train.make_train_step(loss_fn, tx), shardings, mesh)
        losses = []
        for batch in batches:
            state, m = step(state, sharding.global_batch(batch, mesh))
            losses.append(float(m["loss"]))
    return losses, state


def test_data_fsdp_tensor_mesh_matches_one_device():
    """5 steps on a (data 2, fsdp 2, tensor 2) mesh of 8 devices give the losses and
    parameters of one device, and the parameters and optimizer state really are split."""
    config = tiny_config.get_config()
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 500, (8, 64), dtype=np.int32)} for _ in range(5)]
    one, state1 = _run(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                          jax.devices()[:1]), config, batches)
    many, state8 = _run(sharding.make_mesh(MESH_222), config, batches)
    np.testing.assert_allclose(many, one, rtol=2e-5)
    assert one[-1] < one[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.device_get(state8.params), jax.device_get(state1.params))

    gate = state8.params["layers"]["mlp"]["gate"]["kernel"]          # [layers, embed, mlp]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (2, 32, 64) and gate.shape == (2, 64, 128)
    mu = state8.opt_state[1][0].mu["layers"]["mlp"]["gate"]["kernel"]  # adam's first moment
    assert mu.sharding.spec == gate.sharding.spec
    q = state8.params["layers"]["attn"]["q"]["kernel"]                # [layers, embed, heads, d]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert state8.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_processes(tiny_runs):
    codes = [runs.finish(p) for p in runs.launch_pair(tiny_runs, "pair")]
    assert codes == [0, 0], runs.read_logs(tiny_runs.workdir("pair"))
    return tiny_runs.workdir("reference"), tiny_runs.workdir("pair")


@pytest.mark.slow
def test_two_processes_train_like_one(two_processes):
    """Both processes ran one SPMD program on a 4-device global mesh: the losses (logged
    by process 0) and the final parameters (each process wrote its own shards of the
    checkpoint) equal the one-process run's."""
    reference, pair = two_processes
    one, two = runs.losses(reference), runs.losses(pair)
    steps = tiny_config.get_config().train.steps
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 runs.restore_params(pair), runs.restore_params(reference))
    log = runs.read_logs(pair)
    assert "--- sample" in log and "Traceback" not in log
