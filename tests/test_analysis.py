"""Analyses: AR-ness against hand-worked orders and closed forms, the entropy sink's
confidences against NumPy, sweeps against evaluate."""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import analysis as A
from dllm import model as M

# ----------------------------------------------------------------------------- AR-ness

# (order, local@1..3, global@1..3), worked by hand; see each comment.
HAND = [
    # left to right: every position follows its predecessor and is the leftmost masked
    ([0, 1, 2, 3], [1, 1, 1], [1, 1, 1]),
    # right to left: no position follows p - 1; the i-th decoded (i = 1..4) has 4 - i
    # masked positions left of it, so it is among the k left-most for the last k
    ([3, 2, 1, 0], [0, 0, 0], [1 / 4, 2 / 4, 3 / 4]),
    # blocks of two, right to left inside each: sequence 1, 0, 3, 2; 0 and 2 are the
    # leftmost when decoded, 1 and 3 second
    ([1, 0, 3, 2], [0, 0, 0], [2 / 4, 1, 1]),
    # blocks of two left to right, blocks right to left: sequence 2, 3, 0, 1; 3 follows
    # 2 and 1 follows 0 (local@1 2/4), but 2 ran into 0, not 1 (local@2 0); global:
    # 2 has two masked to its left, 3 two, 0 none, 1 none
    ([2, 3, 0, 1], [2 / 4, 0, 0], [2 / 4, 2 / 4, 1]),
    # ties: two per step, taken left to right -> sequence 0, 1, 2, 3
    ([0, 0, 1, 1], [1, 1, 1], [1, 1, 1]),
    # ties out of order: step 0 commits 1 and 2, step 1 commits 0 and 3 -> sequence
    # 1, 2, 0, 3: only 2 follows its predecessor; global@1: 0 and 3
    ([1, 0, 0, 1], [1 / 4, 0, 0], [2 / 4, 1, 1]),
    # skipped steps (nothing committed at 0, 2, 4: Dream's schedule) change nothing
    ([1, 3, 3, 5], [1, 1, 1], [1, 1, 1]),
    # the prompt counts as decoded first: 0 then 1 continue it for any k; then 3 after
    # 1 (a gap), then 2 after 3
    ([0, 1, 3, 2], [2 / 4, 2 / 4, 2 / 4], [3 / 4, 1, 1]),
    # never unmasked (-1): not counted, and stays masked: sequence 0, 2 with 1 still
    # masked left of 2
    ([0, -1, 1, -1], [1 / 2, 1 / 2, 1 / 2], [1 / 2, 1, 1]),
]


@pytest.mark.parametrize("order,local,glob", HAND)
def test_ar_ness_of_hand_made_orders(order, local, glob):
    np.testing.assert_allclose(A.local_ar_ness(np.array(order), [1, 2, 3]), local)
    np.testing.assert_allclose(A.global_ar_ness(np.array(order), [1, 2, 3]), glob)
    assert A.local_ar_ness(np.array(order), 1) == pytest.approx(local[0])


def test_ar_ness_shapes_batches_and_empty_rows():
    orders = np.array([[row for row, _, _ in HAND[:3]], [row for row, _, _ in HAND[3:6]]])
    got = A.global_ar_ness(orders, [1, 2, 3])
    assert got.shape == (2, 3, 3)
    np.testing.assert_allclose(got.reshape(6, 3), [g for _, _, g in HAND[:6]])
    assert A.local_ar_ness(orders, 2).shape == (2, 3)
    nothing = A.local_ar_ness(np.full((2, 5), -1), [1, 2])
    assert np.isnan(nothing).all() and nothing.shape == (2, 2)
    mean, spread = A.mean_and_spread(np.array([[1.0, 0.5], [0.0, 0.5], [np.nan, np.nan]]))
    np.testing.assert_allclose(mean, [0.5, 0.5])
    np.testing.assert_allclose(spread, [0.5, 0.0])
    with pytest.raises(ValueError, match="k must be"):
        A.local_ar_ness(np.array([0, 1]), 0)
    with pytest.raises(ValueError, match="integer array"):
        A.global_ar_ness(np.array([0.0, 1.0]), 1)


def test_ar_ness_of_random_orders_matches_the_closed_forms():
    """Exactly, over all 7! orders of L = 7 positions. Global AR-ness@k averages
    (1/L) sum over m masked of min(k, m) / m (the decoded position is uniform among the
    m still masked), H_L / L at k = 1. Local AR-ness@k: the i-th decoded (i = 0, 1, ...)
    hits when s_{i-k}, ..., s_i are x, ..., x + k: for i >= k that holds in (L - k)
    choices of x times (L - k - 1)! orders of the rest, (L - k)! of L!; for i < k the
    chain reaches the prompt, so s_0, ..., s_i = 0, ..., i: (L - i - 1)! of L!."""
    length, f = 7, math.factorial
    orders = np.array(list(itertools.permutations(range(length))))
    ks = [1, 2, 3]
    glob = A.global_ar_ness(orders, ks).mean(0)
    expected = [sum(min(k, m) / m for m in range(1, length + 1)) / length for k in ks]
    np.testing.assert_allclose(glob, expected, rtol=1e-12)
    assert glob[0] == pytest.approx(sum(1 / m for m in range(1, length + 1)) / length, rel=1e-12)
    np.testing.assert_allclose(A.random_order_global_ar_ness(length, ks), expected, rtol=1e-12)
    local = A.local_ar_ness(orders, ks).mean(0)
    expected = [np.mean([f(length - i - 1 if i < k else length - k) / f(length)
                         for i in range(length)]) for k in ks]
    np.testing.assert_allclose(local, expected, rtol=1e-12)
    assert local[0] == pytest.approx(1 / length, rel=1e-12)


def test_tokens_per_call():
    order = np.array([[0, 0, 1, -1], [2, 3, 4, 5]])
    np.testing.assert_allclose(A.tokens_per_call(order, np.array([2, 6])), [3 / 2, 4 / 6])


# ----------------------------------------------------------------------------- entropy sink

VOCAB, MASK, PAD = 40, 39, 38
CFG = M.ModelConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                    mlp=64)
MODEL = M.Transformer(CFG)


def apply_fn(params, tokens, valid=None, **kw):
    return MODEL.apply({"params": params}, tokens, valid, **kw)


@pytest.fixture(scope="module")
def params():
    p = nn.unbox(MODEL.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return {**p, "lm_head": {"kernel": p["lm_head"]["kernel"] * 20.0}}


def test_first_step_confidence_equals_numpy_from_the_logits(params):
    """Negative entropy and top log-probability at each masked position, from the
    model's logits on the prompt + all-mask canvas, in float64 NumPy without the mask
    token; left padding as in decoding."""
    prompts = np.asarray(jax.random.randint(jax.random.key(1), (3, 6), 0, PAD))
    valid = np.arange(6)[None] >= np.array([[0], [2], [4]])
    prompts = np.where(valid, prompts, PAD)
    got = A.first_step_confidence(params, jnp.asarray(prompts), jnp.asarray(valid),
                                  apply_fn=apply_fn, mask_id=MASK, length=9)
    canvas = np.concatenate([prompts, np.full((3, 9), MASK)], 1)
    full_valid = np.concatenate([valid, np.ones((3, 9), bool)], 1)
    logits = np.asarray(apply_fn(params, jnp.asarray(canvas), jnp.asarray(full_valid)),
                        np.float64)[:, 6:, :MASK]  # the mask token is the last id
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(got["neg_entropy"], (np.exp(logp) * logp).sum(-1), atol=1e-5)
    np.testing.assert_allclose(got["top_logprob"], logp.max(-1), atol=1e-5)
    assert got["neg_entropy"].shape == (3, 9)
