"""Training: the MDM learns a known distribution; a run's loss falls; resume is exact;
the skeleton computes a stage's definition; gradient accumulation; a stage plugs in."""
import json
import math
import os
import re
import shutil

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dllm import config as config_lib
from dllm import checkpoint, data, elbo, metrics, model as model_lib, sharding, train
from dllm import stage as stage_lib
from dllm import tokenizer as tokenizer_lib

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


def test_bfloat16_params_keep_float32_adam_state_and_float32_updates():
    """bfloat16 params: Adam's moments are float32, and a step's result is the float32
    step from the same (upcast) values, rounded once to bfloat16."""
    rng = np.random.default_rng(1)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.bfloat16),
                        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.bfloat16), params)
    cfg = optimizer_config(steps=10, lr=0.1, warmup_steps=0, weight_decay=0.5)
    tx, _ = train.make_optimizer(cfg)
    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
    plain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                        optax.adamw(0.1, b1=cfg.b1, b2=cfg.b2, weight_decay=0.5,
                                    mask=train.decayed))
    want = optax.apply_updates(f32(params), plain.update(f32(grads), plain.init(f32(params)),
                                                         f32(params))[0])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(a, b.astype(jnp.bfloat16))


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
    loss_fn = elbo.stage_loss({}, model_lib.model_apply(model), MASK)
    step = train.jit_train_step(train.make_train_step(loss_fn, tx), shardings, mesh)
    rng = np.random.default_rng(0)
    draw = lambda: {"tokens": rng.choice(V, size=(32, 32), p=p).astype(np.int32)}
    for _ in range(300):
        state, _ = step(state, draw())
    nelbo = jax.jit(lambda params, b, r: elbo.nelbo(
        params, b, r, apply_fn=model_lib.model_apply(model), cfg=loss_cfg, mask_id=MASK,
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
    evaluated, *rows = metrics.read_metrics(tiny_run)
    assert evaluated["step"] == 0 and list(evaluated) == ["step", "eval_nelbo"]  # before training
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
    first = metrics.read_metrics(tiny_run)[1:]   # the training rows
    os.remove(os.path.join(workdir, "metrics.jsonl"))
    train.train_and_evaluate(tiny_run_config(), workdir)
    resumed = metrics.read_metrics(workdir)
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for a, b in zip(first[10:], resumed):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path):
    workdir = str(tmp_path / "nan")
    shutil.copytree(tiny_run, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    config = tiny_run_config()
    config.train.lr = float("nan")     # step 11 updates with NaN: step 12 is the first NaN loss
    with pytest.raises(train.NonFiniteLossError, match="step 12:.*step 10"):
        train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]


def _snapshot(workdir):
    """{relative path: contents} of every file under workdir."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


def test_a_failed_resume_leaves_the_run_byte_for_byte(tiny_run, tmp_path):
    """Resuming with a model key that changes the checkpoint's shapes fails naming the
    key, before anything is written: config.json (read by sample / evaluate) and every
    other file stay as they were."""
    workdir = str(tmp_path / "bad")
    shutil.copytree(tiny_run, workdir)
    before = _snapshot(workdir)
    config = tiny_run_config()
    config.model.mlp = 96
    config.train.steps = 30
    with pytest.raises(ValueError, match=r"model.mlp: 128 there, 96 here.*left as it was"):
        train.train_and_evaluate(config, workdir)
    assert _snapshot(workdir) == before


def test_resume_falls_back_past_an_unreadable_checkpoint(tiny_run, tmp_path, capsys):
    """A truncated array file in the newest checkpoint (20): the resume names the step
    and the file, moves it aside, resumes from step 10 and trains 11..20 exactly as the
    first run did."""
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(tiny_run, workdir)
    state_dir = os.path.join(workdir, "checkpoints", "20", "state")
    arrays = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
              if os.sep + "d" + os.sep in os.path.join(root, f)]
    with open(max(arrays, key=os.path.getsize), "r+b") as f:
        f.truncate(100)
    train.train_and_evaluate(tiny_run_config(), workdir)
    out = capsys.readouterr().out
    assert re.search(r"checkpoint step 20 \(.*checkpoints/20\) is unreadable: .*"
                     r"checkpoints/20/state", out), out
    assert "resuming from step 10, the newest checkpoint that restores" in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20", "20.unreadable"]
    first = metrics.read_metrics(tiny_run)
    resumed = metrics.read_metrics(workdir)
    assert [r["step"] for r in resumed] == [r["step"] for r in first]   # each step once
    for a, b in zip(first[11:], resumed[11:]):
        assert a["step"] == b["step"] and a["loss"] == b["loss"], (a, b)


def test_no_readable_checkpoint_stops_with_one_message(tiny_run, tmp_path):
    workdir = str(tmp_path / "corrupt_all")
    shutil.copytree(tiny_run, workdir)
    for step in ("10", "20"):
        with open(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"), "w") as f:
            f.write("{oops")
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* restores "
                                                          r"\(steps \[20, 10\]"):
        train.train_and_evaluate(tiny_run_config(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]


def test_unusable_eval_split_fails_before_training(tmp_path):
    config = tiny_run_config()
    config.data.update(max_documents=20, eval_fraction=0.05)   # one document held out
    config.train.batch_size = 64
    with pytest.raises(ValueError, match="eval split"):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_skeleton_losses_equal_a_hand_rolled_elbo_loop(tiny_run):
    """The skeleton + the ELBO stage compute exactly the stage's definition: params from
    model.init(PRNGKey(seed)), batches in the dataset's order, the loss of
    elbo.elbo_loss with rng fold_in(PRNGKey(seed), step), AdamW updates."""
    config = tiny_run_config()
    tok = tokenizer_lib.load_tokenizer(os.path.join(tiny_run, "tokenizer.model"))
    model = model_lib.Transformer(model_lib.config_from_dict(config.model))
    params = model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.unbox(params)
    tx, _ = train.make_optimizer(config.train)
    opt_state = tx.init(params)
    batches = iter(data.make_dataset(config.data, tok, batch_size=config.train.batch_size,
                                     seed=config.seed, process_index=0, process_count=1,
                                     split="train"))
    loss_cfg = elbo.elbo_config_from_dict(config.loss)
    apply_fn = model_lib.model_apply(model)

    @jax.jit
    def step(params, opt_state, batch, n):
        rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), n)
        (loss, _), grads = jax.value_and_grad(elbo.elbo_loss, has_aux=True)(
            params, batch, rng, apply_fn=apply_fn, cfg=loss_cfg, mask_id=tok.mask_id, step=n)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    logged = {r["step"]: r["loss"] for r in metrics.read_metrics(tiny_run) if "loss" in r}
    for n in range(3):
        params, opt_state, loss = step(params, opt_state, next(batches), n)
        np.testing.assert_allclose(float(loss), logged[n + 1], rtol=1e-5)


def test_gradient_accumulation_equals_the_full_batch_gradient():
    """microbatches=4: the update is the mean of the slices' gradients, which for a
    loss that is a mean over rows is the full batch's gradient (checked in NumPy)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)
    w0 = rng.normal(size=(3,)).astype(np.float32)

    def loss_fn(params, batch, rng, step):
        err = batch["x"] @ params["w"] - batch["y"]
        return jnp.mean(err ** 2), {"loss": jnp.mean(err ** 2), "rows": batch["x"].shape[0] * 1.0}

    tx = optax.sgd(1.0)
    want_grad = 2 * x.T @ (x @ w0 - y) / len(y)
    for microbatches in (1, 4):
        state = train.TrainState(step=jnp.int32(0), params={"w": jnp.asarray(w0)},
                                 opt_state=tx.init({"w": jnp.asarray(w0)}),
                                 rng=jax.random.PRNGKey(0))
        step = jax.jit(train.make_train_step(loss_fn, tx, microbatches))
        state, m = step(state, {"x": x, "y": y})
        np.testing.assert_allclose(np.asarray(state.params["w"]), w0 - want_grad, rtol=1e-5)
        assert float(m["rows"]) == 8 / microbatches
        np.testing.assert_allclose(float(m["loss"]), np.mean((x @ w0 - y) ** 2), rtol=1e-5)


class _ToyBatches(stage_lib.BatchSource):
    """Batches made from the state (as rollouts are): it records what it was given."""

    limit = None   # a finite source: StopIteration after this many batches

    def __init__(self, tokens):
        self.tokens, self.calls, self.seen = tokens, 0, []

    def next(self, state):
        if self.calls == self.limit:
            raise StopIteration
        self.seen.append((int(state.step), jax.device_get(state.params["final_norm"]["scale"]),
                          jax.device_get(state.extra["ref"]["final_norm"]["scale"])))
        self.calls += 1
        return {"tokens": self.tokens}

    def get_state(self):
        return {"calls": self.calls}

    def set_state(self, state):
        self.calls = state["calls"]

    def metrics(self, step):
        assert step == self.calls      # logged every step here
        return {"calls": float(self.calls)}


def make_stage(ctx):
    """A stage for the test below (named "toy" in stage.STAGES there): the ELBO loss on
    fixed tokens, a reference policy mixed halfway towards the params every 2 steps."""
    tokens = np.random.default_rng(0).integers(0, 100, (8, 16)).astype(np.int32)
    mix = lambda ref, p: jax.tree.map(lambda r, q: 0.5 * r + 0.5 * q, ref, p)
    return stage_lib.Stage(
        loss_fn=elbo.stage_loss(ctx.config.loss, ctx.apply_fn, ctx.tokenizer.mask_id),
        batches=_ToyBatches(tokens),
        evaluate=lambda state: {"eval_step": float(state.step)},
        init_extra=lambda params: {"ref": params},
        update_extra=lambda extra, params, step: jax.lax.cond(
            step % 2 == 0, lambda: {"ref": mix(extra["ref"], params)}, lambda: extra))


def test_a_stage_plugs_in_batches_from_the_state_extra_state_and_eval(monkeypatch, tmp_path):
    monkeypatch.setitem(stage_lib.STAGES, "toy", "test_train")
    config = tiny_run_config(steps=4)
    config.stage = "toy"
    config.train.update(eval_every=2, log_every=1)
    config.checkpoint.update(every=2)
    config.model.update(hidden=32, layers=1, mlp=64)
    workdir = str(tmp_path)
    stage = {}
    real_make_stage = train.make_stage
    monkeypatch.setattr(train, "make_stage", lambda *a: stage.setdefault("s", real_make_stage(*a)))
    state = train.train_and_evaluate(config, workdir)
    seen = stage["s"].batches.seen
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]          # the state before each step
    ref = seen[0][1]                                          # ref starts as the params
    np.testing.assert_array_equal(seen[0][2], ref)
    for k in (2, 4):                                          # mixed after steps 2 and 4
        after = seen[k][1] if k < 4 else jax.device_get(state.params["final_norm"]["scale"])
        ref = 0.5 * ref + 0.5 * after
        if k < 4:
            np.testing.assert_allclose(seen[k][2], ref, rtol=1e-6)
    np.testing.assert_allclose(jax.device_get(state.extra["ref"]["final_norm"]["scale"]), ref,
                               rtol=1e-6)
    rows = metrics.read_metrics(workdir)
    assert rows[0] == {"step": 0, "eval_step": 0.0}
    assert [r["step"] for r in rows[1:]] == [1, 2, 3, 4]
    assert rows[2]["eval_step"] == 2.0 and rows[4]["eval_step"] == 4.0
    assert [r["calls"] for r in rows[1:]] == [1.0, 2.0, 3.0, 4.0]
    assert "tokens_per_s" not in rows[1] and "mfu" not in rows[1]  # the toy gives no figures

    # Resume: the batch source's position and the extra state come back from step 4.
    stage.clear()
    config.train.steps = 5
    state = train.train_and_evaluate(config, workdir)
    (step, params, restored_ref), = stage["s"].batches.seen
    assert step == 4 and stage["s"].batches.calls == 5
    np.testing.assert_allclose(restored_ref, ref, rtol=1e-6)


def test_data_running_out_saves_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(stage_lib.STAGES, "toy", "test_train")
    monkeypatch.setattr(_ToyBatches, "limit", 3)
    config = tiny_run_config(steps=5)
    config.stage = "toy"
    config.model.update(hidden=32, layers=1, mlp=64)
    with pytest.raises(train.DataExhaustedError, match="ran out before step 4.*step 3 is saved"):
        train.train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
