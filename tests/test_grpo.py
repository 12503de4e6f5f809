"""coupled-GRPO: estimator masks and values, advantages, the loss, reference mixing."""
import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import elbo, grpo, model as model_lib, sampling

V, MASK = 6, 5
B, P, N = 4, 3, 40
CFG = grpo.GrpoConfig()


def prompt_valid(b=B, p=P):
    """Left padding: row i has i pad positions (capped)."""
    return np.arange(p)[None, :] >= np.minimum(np.arange(b), p - 1)[:, None]


def masks(cfg, seed=0, rows=None, b=B):
    rows = jnp.arange(b) if rows is None else jnp.asarray(rows)
    out = grpo.estimator_masks(grpo.mask_key(seed), rows, jnp.asarray(prompt_valid(len(rows))),
                               N, cfg)
    return [np.asarray(x) for x in out]


@pytest.mark.parametrize("pairs", [1, 3])
@pytest.mark.parametrize("full_pass", [True, False])
def test_complementary_masks_cover_every_completion_token_once(pairs, full_pass):
    cfg = dataclasses.replace(CFG, pairs=pairs, full_pass=full_pass)
    mp, mc, w = masks(cfg)
    assert mc.shape == (cfg.passes, B, N) and mp.shape == (cfg.passes, B, P)
    assert not mp.any()                                   # the prompt is never masked
    if full_pass:
        assert mc[0].all() and w[0] == pytest.approx(0.5)
        mc, w = mc[1:], w[1:] * 2
    for k in range(pairs):
        a, b = mc[2 * k], mc[2 * k + 1]
        np.testing.assert_array_equal(a.astype(int) + b.astype(int), 1)   # exactly once
        t = 1.0 / (pairs * w[2 * k])
        assert 0.2 <= t <= 0.8
        assert 1.0 / (pairs * w[2 * k + 1]) == pytest.approx(1.0 - t, abs=1e-6)
        # One t shared by the batch: the masked share is near t in every row.
        assert np.all(np.abs(a.mean(1) - t) < 0.35)


def test_decoupled_masks_are_independent_at_equal_passes():
    cfg = dataclasses.replace(CFG, estimator="decoupled")
    mp, mc, w = masks(cfg)
    assert len(w) == grpo.GrpoConfig().passes == 3 and not mp.any()
    assert mc[0].all()
    times = 1.0 / (2 * w[1:])
    assert np.all((times >= 0.2) & (times <= 0.8)) and times[0] != pytest.approx(1 - times[1])
    coverage = mc[1].astype(int) + mc[2]
    assert (coverage == 0).any() and (coverage == 2).any()   # not complementary


def test_full_mask_and_d1_masks():
    mp, mc, w = masks(dataclasses.replace(CFG, estimator="full_mask"))
    assert mc.shape == (1, B, N) and mc.all() and not mp.any() and w.tolist() == [1.0]
    big = 400
    cfg = dataclasses.replace(CFG, estimator="d1")
    mp, mc, w = [np.asarray(x) for x in grpo.estimator_masks(
        grpo.mask_key(0), jnp.arange(big), jnp.asarray(prompt_valid(big, 8)), N, cfg)]
    valid = prompt_valid(big, 8)
    assert mc.all() and w.tolist() == [1.0]
    assert not (mp[0] & ~valid).any()                      # pads are never masked
    assert mp[0][valid].mean() == pytest.approx(0.15, abs=0.02)


def test_masks_depend_only_on_seed_and_row():
    for cfg in (CFG, dataclasses.replace(CFG, estimator="decoupled"),
                dataclasses.replace(CFG, estimator="d1")):
        first, again = masks(cfg, seed=7), masks(cfg, seed=7)
        for x, y in zip(first, again):   # old, reference and current policy: same masks
            np.testing.assert_array_equal(x, y)
        other = masks(cfg, seed=8)       # the next iteration: other masks
        assert not np.array_equal(first[0], other[0]) or not np.array_equal(first[1], other[1])
    # A micro-batch (rows 2, 3) gets the masks those rows have in the whole batch.
    full, part = masks(CFG, seed=3), masks(CFG, seed=3, rows=[2, 3])
    np.testing.assert_array_equal(full[1][:, 2:], part[1])
    np.testing.assert_array_equal(full[2], part[2])


class Recorder:
    """A fake model: logits[b, i] = table * (1 + masks in row b / 10), recording its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, table, tokens, valid, targets):
        self.calls.append((np.asarray(tokens), np.asarray(valid)))
        scale = (tokens == MASK).sum(1).astype(jnp.float32) / 10 + 1.0
        logits = jnp.broadcast_to(table[None, None, :] * scale[:, None, None],
                                  tokens.shape + (V,))
        return elbo.token_nll(logits, targets), jnp.argmax(logits, -1)


def rollout_batch(seed=0, b=B, n=N, p=P):
    rng = np.random.default_rng(seed)
    valid = np.concatenate([prompt_valid(b, p), np.ones((b, n), bool)], 1)
    tokens = np.where(valid, rng.integers(0, MASK, (b, p + n)), 0).astype(np.int32)
    return {"tokens": tokens, "valid": valid, "loss_mask": np.ones((b, n), bool),
            "advantages": rng.normal(size=b).astype(np.float32),
            "mask_seed": np.full((b,), 11, np.int32), "row": np.arange(b, dtype=np.int32)}


def test_coupled_estimate_equals_the_formula():
    table = jnp.asarray([0.3, -1.0, 0.5, 2.0, 0.1, 0.0])
    batch = rollout_batch()
    rec = Recorder()
    value = np.asarray(grpo.token_logps(table, batch, apply_fn=rec, cfg=CFG, mask_id=MASK))
    noisy, valid = rec.calls[-1]
    np.testing.assert_array_equal(valid, np.tile(batch["valid"], (3, 1)))  # padding mask seen
    full, a, b = (noisy[k * B:(k + 1) * B] == MASK for k in range(3))
    _, _, w = masks(CFG, seed=11)
    t = 0.5 / w[1]
    expected = np.zeros((B, N))
    tab = np.asarray(table, np.float64)
    for row in range(B):
        for j in range(N):
            target = batch["tokens"][row, P + j]
            scale = lambda mask: mask[row].sum() / 10 + 1
            lp_of = lambda mask: (tab[target] * scale(mask)
                                  - np.log(np.exp(tab * scale(mask)).sum()))
            assert full[row, P + j] and a[row, P + j] != b[row, P + j]
            pair = lp_of(a) / t if a[row, P + j] else lp_of(b) / (1 - t)
            expected[row, j] = 0.5 * (lp_of(full) + pair)
    assert not (full | a | b)[:, :P].any()
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def test_advantages_against_a_direct_computation():
    rng = np.random.default_rng(0)
    g = 5
    r = rng.integers(0, 4, 4 * g).astype(np.float64) * 0.5
    r[2 * g:3 * g] = 1.5                                     # a group of equal rewards
    loo = grpo.group_advantages(r, g, "loo")
    mean = grpo.group_advantages(r, g, "mean")
    for i in range(len(r)):
        group = r[i // g * g:(i // g + 1) * g]
        others = np.delete(group, i % g)
        assert loo[i] == pytest.approx(r[i] - others.mean(), abs=1e-6)
        assert mean[i] == pytest.approx(r[i] - group.mean(), abs=1e-6)
    np.testing.assert_allclose(loo, g / (g - 1) * mean, atol=1e-6)
    assert (loo[2 * g:3 * g] == 0).all() and (mean[2 * g:3 * g] == 0).all()
    scaled = grpo.group_advantages(r, g, "mean", scale_std=True)
    std = np.array([np.std(r[i // g * g:(i // g + 1) * g], ddof=1) for i in range(len(r))])
    ok = std > 0
    np.testing.assert_allclose(scaled[ok], mean[ok] / (std[ok] + 1e-4), rtol=1e-5)
    assert (scaled[~ok] == 0).all()
    with pytest.raises(ValueError, match="groups"):
        grpo.group_advantages(r[:7], g)


def test_policy_loss_against_numpy():
    rng = np.random.default_rng(1)
    logp, old, ref = (rng.normal(-2, 1, (B, N)) for _ in range(3))
    adv = rng.normal(size=B)
    mask = rng.random((B, N)) < 0.7
    cfg = dataclasses.replace(CFG, eps_low=0.2, eps_high=0.3, beta=0.05)
    loss, m = grpo.policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv)),
                               jnp.asarray(mask), cfg)
    rho = np.exp(logp - old)
    a = adv[:, None]
    pg = -np.minimum(rho * a, np.clip(rho, 0.8, 1.3) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    assert float(loss) == pytest.approx(((pg + 0.05 * kl) * mask).sum() / mask.sum(), rel=1e-5)
    assert float(m["kl"]) == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-5)
    clipped = ((rho < 0.8) & (a < 0)) | ((rho > 1.3) & (a > 0))
    assert 0 < float(m["clip_fraction"]) < 1
    assert float(m["clip_fraction"]) == pytest.approx((clipped * mask).sum() / mask.sum(), 1e-6)


def tiny_model():
    cfg = model_lib.ModelConfig(vocab_size=V, hidden=32, layers=1, heads=2, kv_heads=1,
                                head_dim=16, mlp=64)
    model = model_lib.Transformer(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return params, lambda p, tokens, valid, targets: model.apply({"params": p}, tokens, valid,
                                                                 targets=targets)


def test_first_iteration_ratio_is_one_and_gradient_is_the_policy_gradient():
    params, apply_fn = tiny_model()
    batch = {k: jnp.asarray(v) for k, v in rollout_batch(n=12).items()}
    batch["loss_mask"] = batch["loss_mask"].at[0, 6:].set(False)
    estimate = jax.jit(lambda p, b: grpo.token_logps(p, b, apply_fn=apply_fn, cfg=CFG,
                                                     mask_id=MASK))
    old = estimate(params, batch)
    batch.update(old_logp=old, ref_logp=old)                 # reference = policy

    def loss(p):
        return grpo.grpo_loss(p, batch, None, 0, apply_fn=apply_fn, cfg=CFG, mask_id=MASK)

    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert float(metrics["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics["clip_fraction"]) == 0.0
    assert abs(float(metrics["kl"])) < 1e-10                 # policy = reference: KL 0

    def policy_gradient_objective(p):                        # -mean over tokens of A * logp
        lp = grpo.token_logps(p, batch, apply_fn=apply_fn, cfg=CFG, mask_id=MASK)
        m = batch["loss_mask"].astype(jnp.float32)
        return -(batch["advantages"][:, None] * lp * m).sum() / m.sum()

    expected = jax.jit(jax.grad(policy_gradient_objective))(params)
    assert float(value) == pytest.approx(-float((batch["advantages"][:, None]
                                                 * batch["loss_mask"]).sum()
                                                / batch["loss_mask"].sum()), abs=1e-5)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7),
                 grads, expected)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_loss_mask_ends_at_the_first_end_token():
    end = 9
    completion = np.array([[1, 2, end, 3, end], [1, 1, 1, 1, 1], [end, 0, 0, 0, 0]])
    np.testing.assert_array_equal(grpo.loss_mask(completion, end), [
        [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_reference_mixing_every_n_steps():
    ref = {"w": jnp.full((3,), 2.0)}
    params = {"w": jnp.full((3,), 10.0)}
    mixed = grpo.mix_reference(ref, params, jnp.int32(128), 0.6, 64)
    np.testing.assert_allclose(mixed["w"], 0.4 * 2.0 + 0.6 * 10.0)
    same = grpo.mix_reference(ref, params, jnp.int32(65), 0.6, 64)
    np.testing.assert_array_equal(same["w"], ref["w"])
    assert grpo.mix_reference(ref, params, jnp.int32(64), 0.6, 0) is ref


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="grpo.estimator"):
        grpo.GrpoConfig(estimator="coupledd")
    with pytest.raises(ValueError, match="t_min"):
        grpo.GrpoConfig(t_min=0.9, t_max=0.1)


def load_bandit():
    """benchmarks/grpo_bandit.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "grpo_bandit.py")
    spec = importlib.util.spec_from_file_location("grpo_bandit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow   # ~20 s, most of it compiling
def test_the_stage_raises_the_reward_of_a_bandit():
    """The real stage (rollouts, advantages, old / reference log-probs, the clipped loss,
    the optimizer) with the coupled estimator on a bandit whose optimum is known:
    completions of 6 tokens rewarded by the fraction of them in {a, b, c} (~0.15 at
    random init, optimum 1). 40 steps raise the rollouts' mean reward by ~0.3; the
    margin asked, 0.15, is ~7 standard errors of the two means (96 and 160 samples). A
    wrong sign, misaligned rows or advantages would make it flat or falling."""
    bandit = load_bandit()
    curve = bandit.run_bandit("coupled", steps=40, lr=1e-3, temperature=1.0, seed=0)
    assert len(curve) == 40
    first, last = curve[:6].mean(), curve[-10:].mean()
    assert first < 0.25                                  # the start is far from the optimum
    assert last > first + 0.15, curve


# ----------------------------------------------------------------------------- runs

GRPO_CONFIG = "tests/tiny_grpo_config.py"
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory):
    """Four training tasks (one per arithmetic family), a small model briefly tuned on
    their reference solutions (tests/tiny_grpo_config.py:warmup), for the GRPO runs."""
    import subprocess_runs as runs
    from dllm import tasks
    root = str(tmp_path_factory.mktemp("grpo_runs"))
    firsts = {}
    for task in tasks.synthetic_tasks("sft"):
        firsts.setdefault(task.entry_point, dataclasses.replace(task, demonstration=""))
    chosen = [firsts[name] for name in ("add", "minus", "times", "mod")]  # no slips
    suite, pairs = os.path.join(root, "suite.jsonl"), os.path.join(root, "pairs.jsonl")
    with open(suite, "w") as f:
        for t in chosen:
            f.write(json.dumps({"task_id": t.task_id, "prompt": t.prompt,
                                "entry_point": t.entry_point, "tests": list(t.tests)}) + "\n")
    with open(pairs, "w") as f:
        for prompt, response in tasks.sft_pairs(chosen) * 4:   # a batch of 16
            messages = [*prompt, {"role": "assistant", "content": response}]
            f.write(json.dumps({"messages": messages}) + "\n")
    warm = os.path.join(root, "warm")
    proc = runs.launch(root, warm, f"{GRPO_CONFIG}:warmup", f"--config.data.path={pairs}")
    assert runs.finish(proc, RUN_TIMEOUT_S) == 0, runs.read_logs(warm)
    return root, warm, suite


def launch_grpo(grpo_runs, name):
    import subprocess_runs as runs
    root, warm, suite = grpo_runs
    return runs.launch(root, os.path.join(root, name), f"{GRPO_CONFIG}:grpo",
                       f"--config.init.checkpoint={warm}", f"--config.grpo.tasks={suite}",
                       f"--config.grpo.eval_tasks={suite}")


@pytest.fixture(scope="module")
def reference_run(grpo_runs):
    import subprocess_runs as runs
    workdir = os.path.join(grpo_runs[0], "reference")
    assert runs.finish(launch_grpo(grpo_runs, "reference"), RUN_TIMEOUT_S) == 0, \
        runs.read_logs(workdir)
    return workdir


@pytest.mark.slow
def test_kill_9_between_inner_iterations_resumes_with_the_same_losses(grpo_runs, reference_run):
    """Killed after step 3 (the first inner iteration of the second rollout: the pending
    rollout is in the checkpoint), the rerun logs the reference run's losses and
    rollout figures from step 4 on."""
    import subprocess_runs as runs
    workdir = os.path.join(grpo_runs[0], "killed")
    proc = launch_grpo(grpo_runs, "killed")
    runs.wait_for(proc, workdir, "checkpoints/3", RUN_TIMEOUT_S)
    proc.send_signal(signal.SIGKILL)
    assert runs.finish(proc) == -signal.SIGKILL
    saved = max(runs.checkpoint_steps(workdir))
    assert saved < 12
    before = len(runs.metric_rows(workdir))
    assert runs.finish(launch_grpo(grpo_runs, "killed"), RUN_TIMEOUT_S) == 0, \
        runs.read_logs(workdir)
    resumed = runs.metric_rows(workdir)[before:]
    reference = {r["step"]: r for r in runs.metric_rows(reference_run)}
    assert [r["step"] for r in resumed] == list(range(saved + 1, 13))
    for row in resumed:
        for key in ("loss", "kl", "ratio", "reward", "advantage_abs", "completion_length",
                    "eval_reward"):
            assert row.get(key) == reference[row["step"]].get(key), (row["step"], key)
    losses = [reference[s]["loss"] for s in range(1, 13)]
    assert len(set(losses)) > 6 and any(abs(x) > 1e-4 for x in losses)   # not trivial


@pytest.mark.slow
def test_a_short_run_from_a_warmed_up_model_raises_its_mean_reward(reference_run):
    """The mean reward of 32 completions of the training tasks, decoded with the same
    random numbers at step 0 and after 12 steps, rises."""
    import subprocess_runs as runs
    rows = runs.metric_rows(reference_run)
    assert len([r for r in rows if "reward" in r]) == 6
    evals = {r["step"]: r["eval_reward"] for r in rows if "eval_reward" in r}
    assert sorted(evals) == [0, 12]
    assert evals[12] > evals[0] + 0.05, evals


@pytest.mark.slow
def test_held_out_evaluation_logs_pass_at_1_per_family(reference_run):
    """The suite's tasks are synthetic (one per family): each evaluation logs pass@1
    per family, and their mean is the overall pass@1."""
    import subprocess_runs as runs
    evals = [r for r in runs.metric_rows(reference_run) if "eval_pass_at_1" in r]
    assert len(evals) == 2
    for row in evals:
        per_family = {k: v for k, v in row.items() if k.startswith("eval_pass_at_1/")}
        assert sorted(per_family) == [f"eval_pass_at_1/{name}"
                                      for name in ("add", "minus", "mod", "times")]
        assert all(0.0 <= v <= 1.0 for v in per_family.values())
        assert np.mean(list(per_family.values())) == pytest.approx(row["eval_pass_at_1"])


@pytest.mark.slow
def test_coupled_variance_is_below_decoupled_at_equal_passes_on_a_trained_model(grpo_runs):
    """Per-sequence log-likelihood of reference solutions under 48 mask draws."""
    import subprocess_runs as runs
    from dllm import runs as dllm_runs
    from dllm import tasks
    warm = grpo_runs[1]
    run = dllm_runs.load_run(warm)
    tok = run.tokenizer
    chosen = tasks.synthetic_tasks("heldout")[::10][:8]
    prompts = [tok.encode(p) for p in grpo.prompts(chosen, "diffucoder", tok)]
    answers = [tok.encode(r) + [tok.im_end_id] for _, r in tasks.sft_pairs(chosen)]
    n = 32
    prompt_tokens, prompt_valid = sampling.left_pad(prompts, 112, tok.pad_id)
    completion = np.full((len(chosen), n), tok.pad_id, np.int32)
    for i, a in enumerate(answers):
        completion[i, :len(a)] = a[:n]
    batch = grpo.completion_batch(np.concatenate([prompt_tokens, completion], 1), prompt_valid,
                                  tok.im_end_id)
    params = runs.restore_params(warm)
    variances = {}
    for estimator in ("coupled", "decoupled"):
        cfg = dataclasses.replace(CFG, estimator=estimator)
        assert cfg.passes == 3
        fn = jax.jit(lambda p, b: grpo.sequence_logps(p, b, np.arange(48), apply_fn=run.apply_fn,
                                                      cfg=cfg, mask_id=tok.mask_id))
        estimates = np.asarray(fn(params, batch), np.float64)      # [draws, B]
        variances[estimator] = estimates.var(0, ddof=1)
    assert np.mean(variances["coupled"]) < 0.7 * np.mean(variances["decoupled"]), variances
