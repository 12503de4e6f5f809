"""ELBO losses: which positions are noised and scored, normalisation, the MC NELBO."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import elbo

V, MASK = 32, 31
B, S = 16, 24


class Recorder:
    """A stand-in model: returns fixed logits `table` and records what it was fed."""

    def __init__(self):
        self.inputs = []

    def __call__(self, table, tokens, valid, lookahead):
        self.inputs.append((tokens, valid, lookahead))
        return table

    @property
    def scored(self):
        """The recorder as an ELBO apply_fn (its table scored as the logits)."""
        return elbo.from_logits(self)


TABLE = elbo.from_logits(lambda table, *a: table)  # a stand-in model: logits = its params


def batch(seed=0, b=B, s=S):
    return {"tokens": jax.random.randint(jax.random.key(seed), (b, s), 0, MASK)}


def test_only_masked_positions_carry_gradient():
    rec = Recorder()
    x = batch()
    table = jax.random.normal(jax.random.key(1), (B, S, V))
    grads = jax.grad(lambda p: elbo.elbo_loss(p, x, jax.random.key(2), apply_fn=rec.scored,
                                              cfg=elbo.ElboConfig(), mask_id=MASK)[0])(table)
    noisy = rec.inputs[-1][0]
    masked = np.asarray(noisy == MASK)
    assert 0 < masked.sum() < masked.size
    has_grad = np.abs(np.asarray(grads)).sum(-1) > 0
    np.testing.assert_array_equal(has_grad, masked)
    # Unmasked tokens are passed through unchanged.
    np.testing.assert_array_equal(np.asarray(noisy)[~masked], np.asarray(x["tokens"])[~masked])


def test_uniform_model_scores_log_v_per_masked_token():
    zeros = jnp.zeros((B, S, V))
    losses = []
    for seed in range(40):
        loss, m = elbo.elbo_loss(zeros, batch(seed), jax.random.key(seed),
                                 apply_fn=TABLE, cfg=elbo.ElboConfig(), mask_id=MASK)
        assert float(m["masked_nll"]) == pytest.approx(math.log(V), rel=1e-5)  # float32 sums
        losses.append(float(loss))
    # E[w(t) * mask fraction] = 1 for every schedule, so the NELBO estimate -> log V.
    assert np.mean(losses) == pytest.approx(math.log(V), rel=0.03)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "polynomial"])
def test_mc_nelbo_of_uniform_model_is_s_log_v(schedule):
    zeros = jnp.zeros((B, S, V))
    cfg = elbo.ElboConfig(schedule=schedule)
    nll, n = elbo.nelbo(zeros, batch(), jax.random.key(0), apply_fn=TABLE, cfg=cfg,
                        mask_id=MASK, num_samples=64)
    np.testing.assert_array_equal(n, S)
    assert float(nll.mean()) == pytest.approx(S * math.log(V), rel=0.05)


def test_sft_never_masks_the_prompt_and_pads_follow_the_option():
    rec = Recorder()
    x = batch()
    prompt = jnp.arange(S)[None, :] < 8
    pad = jnp.arange(S)[None, :] >= 20
    x = {**x, "prompt_mask": jnp.broadcast_to(prompt, (B, S)),
         "pad_mask": jnp.broadcast_to(pad, (B, S))}
    table = jnp.zeros((B, S, V))
    for seed in range(10):
        elbo.elbo_loss(table, x, jax.random.key(seed), apply_fn=rec.scored, cfg=elbo.ElboConfig(),
                       mask_id=MASK)
        noisy, valid, _ = rec.inputs[-1]
        np.testing.assert_array_equal(noisy[:, :8], x["tokens"][:, :8])
        assert bool(valid.all())          # DiffuCoder: pads are attended and trained on
    assert bool((noisy[:, 20:] == MASK).any())
    flexible = elbo.ElboConfig(train_on_pad=False)
    for seed in range(10):
        elbo.elbo_loss(table, x, jax.random.key(seed), apply_fn=rec.scored, cfg=flexible,
                       mask_id=MASK)
        noisy, valid, _ = rec.inputs[-1]
        np.testing.assert_array_equal(noisy[:, 20:], x["tokens"][:, 20:])
        assert not bool(valid[:, 20:].any())


def test_stage1_truncation_and_prefix():
    rec = Recorder()
    table = jnp.zeros((B, S, V))
    cfg = elbo.ElboConfig(truncate_prob=1.0, prefix_prob=0.0)
    elbo.elbo_loss(table, batch(), jax.random.key(5), apply_fn=rec.scored, cfg=cfg, mask_id=MASK)
    noisy, valid, _ = rec.inputs[-1]
    length = int(valid[0].sum())
    assert length < S and bool(valid[:, :length].all())
    assert not bool((noisy[:, length:] == MASK).any())
    cfg = elbo.ElboConfig(truncate_prob=0.0, prefix_prob=1.0)
    prefixes = set()
    for seed in range(8):
        elbo.elbo_loss(table, batch(), jax.random.key(seed), apply_fn=rec.scored, cfg=cfg,
                       mask_id=MASK)
        noisy = np.asarray(rec.inputs[-1][0])
        first_masked = (noisy == MASK).any(0).argmax()
        prefixes.add(int(first_masked))
        assert bool(rec.inputs[-1][1].all())
    assert len(prefixes) > 1    # a random prefix length, not a fixed one
    # Probability 0: no augmentation.
    elbo.elbo_loss(table, batch(), jax.random.key(0), apply_fn=rec.scored, cfg=elbo.ElboConfig(),
                   mask_id=MASK)
    assert bool(rec.inputs[-1][1].all())


def test_attention_annealing_goes_from_causal_to_full():
    cfg = elbo.ElboConfig(anneal_steps=100)
    assert int(elbo.lookahead_at(0, 64, cfg)) == 0
    assert int(elbo.lookahead_at(50, 64, cfg)) == 32
    assert int(elbo.lookahead_at(500, 64, cfg)) == 64
    assert elbo.lookahead_at(10, 64, elbo.ElboConfig()) == "default"


def test_unknown_loss_key_is_named():
    with pytest.raises(KeyError, match="schedual"):
        elbo.elbo_config_from_dict({"schedual": "linear"})
