"""Analyses: AR-ness against hand-worked orders and closed forms, the entropy sink's
confidences against NumPy, sweeps against evaluate."""
import itertools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import analysis as A
from dllm import evaluate, sampling
from dllm import model as M
from dllm import tasks as tasks_lib

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


# ----------------------------------------------------------------------------- sweeps

class CharTokenizer:
    """One id per character of CHARS, then the special tokens."""
    CHARS = "x =123\n"
    vocab_size = len(CHARS) + 4
    mask_id, pad_id, eos_id, im_end_id = range(len(CHARS), len(CHARS) + 4)

    def encode(self, text):
        return [self.CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.CHARS[i] for i in ids if i < len(self.CHARS))


def fake_run():
    """A stand-in run whose logits ignore the canvas: the second-last position is "1"
    or "2" with probability 1/2 each (greedy: "1"), the last is EOS. Completions of
    "x = " are then "1" or "2"."""
    tok = CharTokenizer()
    first = np.full(tok.vocab_size, -1e9, np.float32)
    first[[tok.CHARS.index("1"), tok.CHARS.index("2")]] = 0.0
    rest = np.full(tok.vocab_size, -1e9, np.float32)
    rest[tok.eos_id] = 0.0

    def apply_fn(params, tokens, valid=None, **kw):
        b, s = tokens.shape
        return jnp.broadcast_to(params["rest"], (b, s, len(params["rest"]))).at[:, s - 2].set(
            params["first"])

    return types.SimpleNamespace(params={"first": jnp.asarray(first), "rest": jnp.asarray(rest)},
                                 apply_fn=apply_fn, tokenizer=tok)


def x_tasks():
    return [tasks_lib.Task(f"x{v}", "x = ", "x", (f"assert x == {v}",)) for v in (1, 2, 3)]


def test_sweep_pass_at_k_is_evaluates_on_the_same_completions():
    """decode_tasks' pass@k equals evaluate_samples' on its completions and the
    unbiased estimator worked from the passes by hand; the temperature sweep's rows
    hold the same numbers (same seed), greedy gives exactly 1/3, and the orders are
    read: two positions committed together, left to right, in two model calls."""
    run, tasks = fake_run(), x_tasks()
    cfg = sampling.SampleConfig(max_new_tokens=2, steps=2, temperature=1.0)
    kw = dict(n=6, k=(1, 3), style="base", seed=3, workers=2)
    decodes, report = A.decode_tasks(run, tasks, cfg, **kw)
    samples = [{"task_id": r["task_id"], "completion": r["completion"]} for r in report["samples"]]
    assert {s["completion"] for s in samples} == {"1", "2"}
    again = evaluate.evaluate_samples(tasks, samples, k=(1, 3), progress=False, workers=2)
    assert report["pass_at_k"] == again["pass_at_k"]
    by_hand = {}
    for task in tasks:
        c = sum(s["completion"] == task.task_id[1] for s in samples if s["task_id"] == task.task_id)
        for k in (1, 3):
            by_hand.setdefault(k, []).append(1 - math.comb(6 - c, k) / math.comb(6, k))
    for k in (1, 3):
        assert report["pass_at_k"][str(k)] == pytest.approx(np.mean(by_hand[k]), abs=1e-12)

    rows = A.temperature_sweep(run, tasks, cfg, [0.0, 1.0], ks=[1, 2], **kw)
    assert [r["temperature"] for r in rows] == [0.0, 1.0]
    assert rows[0]["pass@1"] == pytest.approx(1 / 3) and rows[0]["pass@3"] == pytest.approx(1 / 3)
    assert rows[1]["pass@1"] == report["pass_at_k"]["1"]
    assert rows[1]["pass@3"] == report["pass_at_k"]["3"]
    assert rows[1]["samples"] == 18 and decodes.order.shape == (18, 2)
    assert rows[1]["local@2"] == rows[1]["global@1"] == 1.0
    assert rows[1]["tokens_per_call"] == 1.0


def test_write_table(tmp_path):
    rows = [{"run": "a", "pass@1": 0.5}, {"run": "b", "pass@1": 0.25, "extra": 3}]
    csv_path, md_path = A.write_table(rows, str(tmp_path / "t"))
    assert open(csv_path).read().splitlines() == ["run,pass@1,extra", "a,0.5,", "b,0.25,3"]
    assert open(md_path).read().splitlines()[2:] == ["| a | 0.5000 |  |", "| b | 0.2500 | 3 |"]
