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
    np.testing.assert_array_equal(n, S - 1)     # position 0 is never noised
    assert float(nll.mean()) == pytest.approx((S - 1) * math.log(V), rel=0.05)


def np_nll(table, tokens):
    """[B, S] cross-entropy in float64."""
    z = np.asarray(table, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]


# Times in [1 - 1e-6, 1): every noisable token is masked and w(t) = 1/t is 1 within 1e-6.
ALL_MASKED = elbo.ElboConfig(time_eps=1.0 - 1e-6)


def test_position_0_is_never_noised_and_carries_no_loss():
    rec = Recorder()
    table = jnp.zeros((B, S, V))
    col1_masked = 0
    for seed in range(50):
        x = batch(seed)
        elbo.elbo_loss(table, x, jax.random.key(seed), apply_fn=rec.scored,
                       cfg=elbo.ElboConfig(), mask_id=MASK)
        noisy = np.asarray(rec.inputs[-1][0])
        np.testing.assert_array_equal(noisy[:, 0], x["tokens"][:, 0])
        col1_masked += int((noisy[:, 1] == MASK).sum())
    assert col1_masked > 100
    # At t ~ 1: NumPy's mean NLL over columns 1..S-1, although column 0's target is
    # given a huge NLL (it would dominate the loss if it were counted).
    x = batch(7)
    table = np.array(jax.random.normal(jax.random.key(8), (B, S, V)))
    table[np.arange(B), 0, np.asarray(x["tokens"][:, 0])] = -1e4
    loss, m = elbo.elbo_loss(jnp.asarray(table), x, jax.random.key(9), apply_fn=rec.scored,
                             cfg=ALL_MASKED, mask_id=MASK)
    noisy = np.asarray(rec.inputs[-1][0])
    assert (noisy[:, 0] != MASK).all() and (noisy[:, 1:] == MASK).all()
    want = np_nll(table, x["tokens"])[:, 1:].mean()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(m["mask_rate"]) == 1.0


def test_a_left_padded_rows_first_real_token_is_never_noised():
    """Pads excluded from attention on the left (pad_mask with train_on_pad=False):
    the first real token's shifted prediction would come from a pad, so only the
    tokens after it are noisable."""
    tokens = jnp.zeros((3, 6), jnp.int32)
    pads = jnp.array([[True, True, False, False, False, False],
                      [False] * 6,
                      [False, False, False, False, True, True]])
    valid, noisable = elbo.loss_masks({"tokens": tokens, "pad_mask": pads}, jax.random.key(0),
                                      elbo.ElboConfig(train_on_pad=False))
    np.testing.assert_array_equal(valid, ~pads)
    np.testing.assert_array_equal(noisable, [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1],
                                             [0, 1, 1, 1, 0, 0]])


def test_a_valid_key_removes_positions_from_attention_and_the_loss():
    """batch["valid"] (the rollout layout's left padding) narrows valid; the first valid
    token is never noised; trained-on pads stay valid."""
    tokens = jnp.zeros((2, 6), jnp.int32)
    valid_in = jnp.array([[False, False, True, True, True, True], [True] * 6])
    prompt = jnp.array([[True, True, True, False, False, False], [True] + [False] * 5])
    pads = jnp.array([[False] * 5 + [True], [False] * 6])
    valid, noisable = elbo.loss_masks({"tokens": tokens, "valid": valid_in, "prompt_mask": prompt,
                                       "pad_mask": pads}, jax.random.key(0), elbo.ElboConfig())
    np.testing.assert_array_equal(valid, valid_in)
    np.testing.assert_array_equal(noisable, [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])


def test_the_model_is_told_every_token_is_valid_only_when_none_can_be_invalid():
    """valid=None (cuDNN's unmasked kernel) exactly when no truncation, no valid key
    and no excluded padding can make a token invalid."""
    tokens, v = jnp.zeros((2, 6), jnp.int32), jnp.ones((2, 6), bool)
    pads = {"tokens": tokens, "pad_mask": jnp.zeros((2, 6), bool)}
    cfg = elbo.ElboConfig()
    assert elbo.attention_valid({"tokens": tokens}, v, cfg) is None
    assert elbo.attention_valid(pads, v, dataclasses.replace(cfg, train_on_pad=True)) is None
    assert elbo.attention_valid(pads, v, dataclasses.replace(cfg, train_on_pad=False)) is v
    assert elbo.attention_valid({"tokens": tokens, "valid": v}, v, cfg) is v
    assert elbo.attention_valid({"tokens": tokens}, v,
                                dataclasses.replace(cfg, truncate_prob=0.01)) is v


@pytest.mark.parametrize("train_on_pad", [True, False])
def test_sequence_and_token_normalisation_match_numpy(train_on_pad):
    """Four SFT rows with prompts of 2-9 tokens and 0-10 pads: at t ~ 1 (all noisable
    tokens masked, weight ~ 1), "tokens" is the NLL summed over the batch's noisable
    tokens / their count; "sequence" (LLaDA) the mean over rows of each row's sum /
    its own count."""
    b, s = 4, S
    x = batch(11, b=b)
    prompt_len, pad_len = np.array([2, 5, 9, 3]), np.array([0, 10, 4, 7])
    pos = np.arange(s)[None]
    x["prompt_mask"] = jnp.asarray(pos < prompt_len[:, None])
    x["pad_mask"] = jnp.asarray(pos >= s - pad_len[:, None])
    table = np.asarray(jax.random.normal(jax.random.key(12), (b, s, V))) * 2
    noisable = pos >= prompt_len[:, None]
    if not train_on_pad:
        noisable = noisable & (pos < s - pad_len[:, None])
    nll = np.where(noisable, np_nll(table, x["tokens"]), 0.0)
    want = {"tokens": nll.sum() / noisable.sum(),
            "sequence": np.mean(nll.sum(-1) / noisable.sum(-1))}
    assert abs(want["tokens"] - want["sequence"]) > 0.01
    for normalize, value in want.items():
        cfg = dataclasses.replace(ALL_MASKED, normalize=normalize, train_on_pad=train_on_pad)
        loss, _ = elbo.elbo_loss(jnp.asarray(table), x, jax.random.key(13),
                                 apply_fn=TABLE, cfg=cfg, mask_id=MASK)
        assert float(loss) == pytest.approx(value, rel=1e-5), normalize
    with pytest.raises(ValueError, match="normalize"):
        elbo.ElboConfig(normalize="batch")


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
        assert valid is None              # DiffuCoder: pads are attended and trained on
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
        assert rec.inputs[-1][1] is None  # a clean prefix leaves every token valid
    assert len(prefixes) > 1    # a random prefix length, not a fixed one
    # Probability 0: no augmentation.
    elbo.elbo_loss(table, batch(), jax.random.key(0), apply_fn=rec.scored, cfg=elbo.ElboConfig(),
                   mask_id=MASK)
    assert rec.inputs[-1][1] is None


def test_band_annealing_goes_from_causal_to_full():
    cfg = elbo.ElboConfig(anneal_steps=100, anneal="band")
    key = jax.random.key(0)
    assert int(elbo.lookahead_at(key, 0, 64, cfg)) == 0
    assert int(elbo.lookahead_at(key, 50, 64, cfg)) == 32
    assert int(elbo.lookahead_at(key, 500, 64, cfg)) == 64
    assert elbo.lookahead_at(key, 10, 64, elbo.ElboConfig()) == "default"


def test_random_annealing_opens_a_fraction_r_of_the_upper_triangle():
    """DiffuLLaMA: at step n each (query, key) pair above the diagonal is open with
    probability r = min(1, (n + 1) / anneal_steps), the causal part always."""
    cfg = elbo.ElboConfig(anneal_steps=100)
    s = 64
    upper = np.triu(np.ones((s, s), bool), 1)   # 2016 pairs
    draw = jax.jit(lambda k, n: elbo.lookahead_at(k, n, s, cfg))
    for step in (0, 24, 49, 80):
        r = (step + 1) / 100
        draws = np.stack([np.asarray(draw(jax.random.key(k), step)) for k in range(10)])
        assert draws.dtype == bool and draws[:, ~upper].all()
        # 10 x 2016 Bernoulli(r) pairs: within 5 standard deviations of r.
        assert abs(draws[:, upper].mean() - r) < 5 * np.sqrt(r * (1 - r) / draws[:, upper].size)
        assert (draws[0] != draws[1]).any()   # a fresh draw for every key
    for step in (99, 100, 5000):
        assert np.asarray(draw(jax.random.key(0), step)).all()
    with pytest.raises(ValueError, match="anneal"):
        elbo.ElboConfig(anneal="linear")


def test_annealed_loss_runs_through_the_model():
    """elbo_loss with a real model: the [S, S] mask reaches attention (step 0: nearly
    causal, another loss), and from anneal_steps on the loss is full attention's."""
    from dllm import model as M
    cfg = M.ModelConfig(vocab_size=V, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16,
                        mlp=64)
    model = M.Transformer(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    apply_fn = M.model_apply(model)   # the chunked cross-entropy under the [S, S] mask
    loss = jax.jit(lambda p, step, c: elbo.elbo_loss(p, batch(), jax.random.key(3),
                                                     apply_fn=apply_fn, cfg=c, mask_id=MASK,
                                                     step=step)[0], static_argnums=2)
    annealed, full = elbo.ElboConfig(anneal_steps=10), elbo.ElboConfig()
    np.testing.assert_allclose(loss(params, 10, annealed), loss(params, 10, full), rtol=1e-6)
    assert abs(float(loss(params, 0, annealed)) - float(loss(params, 0, full))) > 1e-4
    grads = jax.grad(loss)(params, 3, annealed)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_unknown_loss_key_is_named():
    with pytest.raises(KeyError, match="schedual"):
        elbo.elbo_config_from_dict({"schedual": "linear"})
