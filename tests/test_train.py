"""Training: the MDM learns a known distribution; a run's loss falls; resume is exact."""
import json
import math
import os
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dllm import config as config_lib
from dllm import elbo, metrics, model as model_lib, sharding, train

V = 16          # data symbols 0..15; the mask token is 16
MASK = V


def optimizer_config(**kw):
    c = config_lib.base_config().train
    c.update(kw)
    return c


def test_optimizer_decays_kernels_and_embeddings_but_not_biases_and_norm_scales():
    """One AdamW step with zero gradients (Adam's own update is then 0): kernels and
    embeddings shrink by the factor 1 - lr * weight_decay, biases and scales stay."""
    cfg = model_lib.ModelConfig(vocab_size=V + 1, hidden=16, layers=2, heads=2, kv_heads=1,
                                head_dim=8, mlp=32)
    params = jax.eval_shape(model_lib.Transformer(cfg).init, jax.random.key(0),
                            jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          nn.unbox(params["params"]))
    tx, _ = train.make_optimizer(optimizer_config(steps=10, lr=0.1, warmup_steps=0,
                                                  weight_decay=0.5))
    zeros = jax.tree.map(np.zeros_like, params)
    new = jax.jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(
        params, zeros)
    new = flax.traverse_util.flatten_dict(new)
    for path, old in flax.traverse_util.flatten_dict(params).items():
        factor = 1.0 if path[-1] in ("bias", "scale") else 1.0 - 0.1 * 0.5
        np.testing.assert_allclose(new[path], np.asarray(old) * factor, rtol=1e-6,
                                   err_msg=str(path))
    assert {path[-1] for path in new} == {"bias", "scale", "kernel", "embedding"}


def test_tiny_mdm_learns_a_known_entropy():
    """i.i.d. tokens from a fixed categorical p: the NELBO per token of a trained
    model must reach H(p) (the ELBO is tight for independent tokens, and any error
    in the masking weights or normalisation would show up as a constant factor)."""
    p = np.array([2.0 ** -i for i in range(V)])   # H ~ 0.5 log V
    p /= p.sum()
    entropy = float(-(p * np.log(p)).sum())
    cfg = model_lib.ModelConfig(vocab_size=V + 1, hidden=32, layers=1, heads=2, kv_heads=1,
                                head_dim=16, mlp=64)
    model = model_lib.Transformer(cfg)
    tx, _ = train.make_optimizer(optimizer_config(steps=300, lr=1e-2, warmup_steps=20))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    state, shardings = train.init_state(model, tx, 0, mesh, sharding.DEFAULT_RULES)
    loss_cfg = elbo.ElboConfig()
    loss_fn = train.stage_loss(ml_collections.ConfigDict({"loss": {}}), model, MASK)
    step = train.jit_train_step(train.make_train_step(loss_fn, tx), shardings, mesh)
    rng = np.random.default_rng(0)
    draw = lambda: {"tokens": rng.choice(V, size=(32, 32), p=p).astype(np.int32)}
    for _ in range(300):
        state, _ = step(state, draw())
    nelbo = jax.jit(lambda params, b, r: elbo.nelbo(
        params, b, r, apply_fn=train.model_apply(model), cfg=loss_cfg, mask_id=MASK,
        num_samples=16))
    totals = [nelbo(state.params, draw(), jax.random.key(i)) for i in range(4)]
    per_token = sum(float(t.sum()) for t, _ in totals) / sum(float(n.sum()) for _, n in totals)
    assert abs(per_token - entropy) / entropy < 0.10, (per_token, entropy)
    assert per_token < 0.7 * math.log(V)   # far below the uniform model


def tiny_run_config(steps=20):
    c = config_lib.base_config()
    c.model.update(hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32, mlp=128,
                   vocab_size=512)
    c.data.update(source="stdlib", seq_len=64, vocab_size=512, max_documents=30,
                  eval_fraction=0.1)
    c.train.update(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, log_every=1,
                   eval_every=10, eval_batches=2)
    c.checkpoint.update(every=10, keep=3)
    c.sample.update(max_new_tokens=8)
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_run_config(), workdir)
    return workdir


def test_run_writes_its_outputs_and_loss_falls(tiny_run):
    rows = metrics.read_metrics(tiny_run)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert "eval_nelbo" in rows[9] and "eval_nelbo" in rows[19]
    # 20 noisy steps: the last five average clearly below the first step (~log V).
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.85 * rows[0]["loss"]
    assert sorted(os.listdir(os.path.join(tiny_run, "checkpoints"))) == ["10", "20"]
    for name in ("config.json", "tokenizer.model", "sample.txt"):
        assert os.path.exists(os.path.join(tiny_run, name)), name
    assert os.listdir(os.path.join(tiny_run, "tensorboard"))


def test_rerun_resumes_with_identical_losses(tiny_run, tmp_path):
    """Lose everything after the step-10 checkpoint, rerun the same command: steps
    11..20 (same data order, same rng) give exactly the losses of the first run."""
    workdir = str(tmp_path / "resumed")
    shutil.copytree(tiny_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    first = metrics.read_metrics(tiny_run)
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    train.train_and_evaluate(tiny_run_config(), workdir)
    resumed = metrics.read_metrics(workdir)
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for a, b in zip(first[10:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)


def test_load_run_restores_the_trained_params(tiny_run):
    config, model, params, tok = train.load_run(tiny_run)
    assert config.train.steps == 20 and tok.vocab_size <= config.model.vocab_size
    logits = model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, config.model.vocab_size)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        train.tokenizer_path(os.path.dirname(tiny_run))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    workdir = str(tmp_path / "nan")
    shutil.copytree(tiny_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    config = tiny_run_config()
    config.train.lr = float("nan")     # step 11 updates with NaN: step 12 is the first NaN loss
    with pytest.raises(train.NonFiniteLossError, match="step 12:.*step 10"):
        train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]


def test_checkpoint_shape_mismatch_names_the_parameter(tiny_run, tmp_path):
    workdir = str(tmp_path / "bad")
    shutil.copytree(tiny_run, workdir)
    config = tiny_run_config()
    config.model.mlp = 96
    with pytest.raises(ValueError, match="layers/mlp/.*kernel"):
        train.train_and_evaluate(config, workdir)


def test_unusable_eval_split_fails_before_training(tmp_path):
    config = tiny_run_config()
    config.data.update(max_documents=20, eval_fraction=0.05)   # one document held out
    config.train.batch_size = 64
    with pytest.raises(ValueError, match="eval split"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl")
