"""Sampling: rules against NumPy, schedules, blocks, parallel decoding, EOS, padding, cache."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import model as M
from dllm import sampling as S
from dllm.model import model_apply

VOCAB = 64
MASK, PAD, EOS = 63, 62, 61
CFG = M.ModelConfig(vocab_size=VOCAB, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                    mlp=64)
MODEL = M.Transformer(CFG)
APPLY = model_apply(MODEL)
N = 12  # new tokens


@pytest.fixture(scope="module")
def params():
    p = nn.unbox(MODEL.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    # A sharper head than the init's, so that confidences spread over (0, 1).
    return {**p, "lm_head": {"kernel": p["lm_head"]["kernel"] * 40.0}}


@pytest.fixture(scope="module")
def prompts():
    """Three prompts of lengths 3, 5, 8 (tokens below EOS), left-padded to 8."""
    x = np.asarray(jax.random.randint(jax.random.key(1), (3, 8), 0, EOS))
    valid = np.arange(8)[None] >= np.array([[5], [3], [0]])
    return jnp.asarray(np.where(valid, x, PAD)), jnp.asarray(valid)


def run(params, prompts, rng=0, **kw):
    x, valid = prompts
    cfg = S.SampleConfig(**{"max_new_tokens": N, "steps": N, **kw})
    return S.generate(params, x, jax.random.key(rng), cfg, apply_fn=APPLY, mask_id=MASK,
                      valid=valid)


def FIXED(logits, tokens, valid):
    """apply_fn whose logits are its params [B, S, V], whatever the tokens."""
    return logits


def run_fixed(logits, prompt_len, eos=False, **kw):
    """generate with the fixed logits [B, S, V] and all-zero prompts of prompt_len;
    S - prompt_len new tokens in as many steps."""
    b, s, _ = logits.shape
    cfg = S.SampleConfig(**{"max_new_tokens": s - prompt_len, "steps": s - prompt_len, **kw})
    ids = dict(eos_id=EOS, pad_id=PAD) if eos else {}
    return S.generate(jnp.asarray(logits, jnp.float32), jnp.zeros((b, prompt_len), jnp.int32),
                      jax.random.key(0), cfg, apply_fn=FIXED, mask_id=MASK, **ids)


# ----------------------------------------------------------------------------- filling

@pytest.mark.parametrize("alg", S.ALGS)
def test_every_masked_position_is_filled_once_and_the_prompt_never_changes(params, alg):
    """Infilling (a hole inside each prompt) plus new tokens. With the even schedule
    and steps = masked count each step fills exactly one position, so the order is
    a permutation of the steps; origin fills a random number per step."""
    x, valid = prompts_with_hole = _hole(*_prompts_np())
    out = run(params, prompts_with_hole, alg=alg, schedule="even", steps=0,  # = N + 2
              temperature=0.0 if alg != "origin" else 1.0)
    tokens, order = np.asarray(out.tokens), np.asarray(out.order)
    generated = np.concatenate([np.asarray(x) == MASK, np.ones((3, N), bool)], 1)
    assert not (tokens == MASK).any()
    given = ~generated[:, :8]
    np.testing.assert_array_equal(tokens[:, :8][given], np.asarray(x)[given])
    assert (order[~generated] == -1).all() and (order[generated] >= 0).all()
    for row in range(3):
        steps = np.sort(order[row][generated[row]])
        if alg == "origin":
            assert steps.max() < N + 2
        else:
            np.testing.assert_array_equal(steps, np.arange(N + 2))


def _prompts_np():
    x = np.asarray(jax.random.randint(jax.random.key(1), (3, 8), 0, EOS))
    return x, np.arange(8)[None] >= np.array([[3], [2], [0]])


def _hole(x, valid):
    """Mask two positions in the middle of each prompt (prefix, hole, suffix)."""
    x = np.where(valid, x, PAD)
    x[:, 5:7] = MASK
    return jnp.asarray(x), jnp.asarray(valid)


def dream_counts(n, steps, eps=1e-3):
    """Dream's tokens per step for n masked tokens: floor(n_left (1 - s/t)), all at the end."""
    grid = np.linspace(1, eps, steps + 1)
    counts = []
    for i in range(steps):
        k = n if i == steps - 1 else int(n * (1 - grid[i + 1] / grid[i]))
        counts.append(k)
        n -= k
    return counts


def even_counts(n, steps):
    """LLaDA's split: n // steps each, the first n % steps steps one more."""
    return [n // steps + (i < n % steps) for i in range(steps)]


@pytest.mark.parametrize("schedule,steps,block", [("dream", N, 0), ("dream", 10, 6),
                                                  ("even", 5, 0), ("even", 6, 4)])
def test_tokens_per_step_follow_the_schedule(params, prompts, schedule, steps, block):
    out = run(params, prompts, schedule=schedule, steps=steps, block_length=block)
    blocks = N // block if block else 1
    per_block = (dream_counts if schedule == "dream" else even_counts)(N // blocks,
                                                                       steps // blocks)
    expected = per_block * blocks
    for row in np.asarray(out.order):
        np.testing.assert_array_equal(np.bincount(row[row >= 0], minlength=len(expected)),
                                      expected)
    assert dream_counts(N, N)[0] == 0 and dream_counts(N, N)[-1] == 2  # Dream's quirk


# ----------------------------------------------------------------------------- rules

def np_confidence(alg, logits):
    """Independent NumPy confidences of the greedy token, [..., V] -> [...]."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    top = -np.sort(-p, -1)
    if alg == "maskgit_plus":
        return top[..., 0]
    if alg == "topk_margin":
        return top[..., 0] - top[..., 1]
    return np.sum(p * np.log(np.maximum(p, 1e-30)), -1)  # entropy


HAND = np.log(np.array([[0.60, 0.20, 0.20, 0.00],      # highest top-1 probability
                        [0.58, 0.14, 0.14, 0.14],      # widest top-1 - top-2 margin
                        [0.55, 0.45, 0.00, 0.00],      # lowest entropy
                        [0.30, 0.30, 0.20, 0.20]]) + 1e-9)


@pytest.mark.parametrize("alg,first", [("maskgit_plus", 0), ("topk_margin", 1), ("entropy", 2)])
def test_rules_pick_the_position_numpy_picks(alg, first):
    """On hand-made logits each rule commits first the position NumPy's confidence
    picks; on random logits the whole unmasking order is NumPy's ranking."""
    hand = np.full((1, 2 + 4, VOCAB), -30.0)
    hand[0, 2:, :4] = HAND
    assert np.argmax(np_confidence(alg, hand[0, 2:])) == first
    out = run_fixed(hand, 2, alg=alg, schedule="even")
    assert np.asarray(out.order)[0, 2 + first] == 0

    rand = np.asarray(jax.random.normal(jax.random.key(3), (2, 3 + 10, VOCAB))) * 3
    out = run_fixed(rand, 3, alg=alg, schedule="even")
    conf = np_confidence(alg, rand[:, 3:, :MASK])  # the mask token is never proposed
    np.testing.assert_array_equal(np.asarray(out.order)[:, 3:],
                                  np.argsort(np.argsort(-conf, -1, kind="stable"), -1))


def test_low_confidence_ignores_temperature_and_maskgit_plus_does_not():
    """LLaDA's low_confidence is the untempered probability of the token; Dream's
    maskgit_plus the probability under the tempered, filtered distribution."""
    logits = jnp.asarray(jax.random.normal(jax.random.key(4), (2, 5, VOCAB)) * 3)
    cfg = S.SampleConfig(temperature=0.5, alg="low_confidence")
    x0, prob, conf = S.propose(logits, jax.random.key(0), cfg, MASK, None)
    raw = jax.nn.softmax(logits.at[..., MASK].set(-jnp.inf), -1)
    np.testing.assert_allclose(conf, np.take_along_axis(raw, x0[..., None], -1)[..., 0], rtol=1e-5)
    tempered = jax.nn.softmax(logits.at[..., MASK].set(-jnp.inf) / 0.5, -1)
    np.testing.assert_allclose(prob, np.take_along_axis(tempered, x0[..., None], -1)[..., 0],
                               rtol=1e-5)


def test_top_p_and_top_k_keep_the_tokens_numpy_keeps():
    z = np.asarray(jax.random.normal(jax.random.key(5), (4, 40))) * 2
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    for row in range(4):
        desc = np.argsort(-p[row])
        mass_before = np.cumsum(p[row][desc]) - p[row][desc]
        keep = set(desc[mass_before <= 0.8])
        got = np.isfinite(np.asarray(S._top_p(jnp.asarray(z), 0.8))[row])
        assert set(np.flatnonzero(got)) == keep
    got = np.isfinite(np.asarray(S._top_k(jnp.asarray(z), 5)))
    np.testing.assert_array_equal(got.sum(-1), 5)
    np.testing.assert_array_equal(np.sort(np.flatnonzero(got[0])), np.sort(np.argsort(-z[0])[:5]))


def test_top_p_keeps_numpys_nucleus_from_flat_to_peaked_rows_and_ties_at_the_cut():
    """Rows from flat (nucleus of most of the vocabulary) to peaked (one token), and
    rows of tied tokens: the kept tokens are NumPy's (sort, mass before <= top_p, ties
    at the cut stay) in every row."""
    z = np.asarray(jax.random.normal(jax.random.key(8), (64, VOCAB)))
    z = z * np.linspace(0.1, 12.0, 64)[:, None]
    ties = np.full((3, VOCAB), -30.0)
    ties[0, :4] = 1.0                  # four equal tokens: the cut falls inside them
    ties[1, :2], ties[1, 2:6] = 2.0, 1.0
    ties[2] = 0.0                      # uniform
    z = np.concatenate([z, ties]).astype(np.float32)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    desc = -np.sort(-p, -1)
    cutoff = np.where(np.cumsum(desc, -1) - desc <= 0.9, desc, np.inf).min(-1, keepdims=True)
    want = p >= cutoff
    got = np.isfinite(np.asarray(S._top_p(jnp.asarray(z), 0.9)))
    np.testing.assert_array_equal(got, want)
    assert want[:64].sum(-1).max() > VOCAB // 2 and want[:64].sum(-1).min() == 1
    np.testing.assert_array_equal(got[64:].sum(-1), [4, 6, VOCAB])


def test_tokens_are_sampled_from_the_tempered_filtered_distribution():
    """Frequencies of proposals match NumPy's softmax(logits / T) renormalised over
    the top-p nucleus or the top-k."""
    logits = np.full(VOCAB, -10.0)
    logits[:5] = [2.0, 1.5, 1.0, 0.5, 0.0]
    p = np.exp(logits / 0.7) / np.exp(logits / 0.7).sum()
    mass_before = np.cumsum(p) - p
    nucleus = int(np.sum(mass_before <= 0.8))  # Dream: keep while the mass before is <= p
    assert nucleus == 3
    keys = jax.random.split(jax.random.key(7), 4000)
    for cfg, kept in ((S.SampleConfig(temperature=0.7), 5),
                      (S.SampleConfig(temperature=0.7, top_p=0.8), nucleus),
                      (S.SampleConfig(temperature=0.7, top_k=2), 2)):
        x0 = jax.vmap(lambda k: S.propose(jnp.asarray(logits)[None, None], k, cfg, MASK,
                                          None)[0][0, 0])(keys)
        freq = np.bincount(np.asarray(x0), minlength=VOCAB) / len(keys)
        want = np.where(np.arange(VOCAB) < kept, p, 0)
        np.testing.assert_allclose(freq, want / want.sum(), atol=0.03)


def test_alg_temp_samples_positions_from_softmax_of_confidence():
    """k=1 of three eligible positions: frequencies match softmax(conf / alg_temp)."""
    conf = jnp.array([[0.9, 0.5, 0.1, 2.0]])
    eligible = jnp.array([[True, True, True, False]])
    cfg = S.SampleConfig(alg="maskgit_plus", alg_temp=0.5)
    keys = jax.random.split(jax.random.key(6), 4000)
    picks = jax.vmap(lambda k: S.select(cfg, conf, eligible, jnp.array([1]), None, k))(keys)
    freq = np.asarray(picks[:, 0].mean(0))
    want = np.exp(np.array([0.9, 0.5, 0.1]) / 0.5)
    want /= want.sum()
    np.testing.assert_allclose(freq[:3], want, atol=0.03)
    assert freq[3] == 0


# ----------------------------------------------------------------------------- parallel

def test_parallel_counts_match_fast_dllm_rules():
    prob = jnp.array([[0.99, 0.95, 0.2, 0.92, 0.8, 0.1],
                      [0.3, 0.2, 0.1, 0.05, 0.0, 0.0]])
    eligible = jnp.array([[True] * 5 + [False], [True] * 4 + [False] * 2])
    zero = jnp.zeros(2, jnp.int32)
    cfg = S.SampleConfig(parallel="threshold", threshold=0.9)
    thr = S.how_many(cfg, eligible, prob, zero, zero)
    np.testing.assert_array_equal(thr, [3, 1])  # row 2: none above tau, still one
    for f in (0.5, 1.0, 2.0):
        got = S.how_many(S.SampleConfig(parallel="factor", factor=f), eligible, prob, zero, zero)
        for row in range(2):  # Fast-dLLM: the largest n with (n + 1)(1 - c_n) < f
            c = -np.sort(-np.asarray(prob[row])[np.asarray(eligible[row])])
            n = max([1] + [m for m in range(1, len(c) + 1) if (m + 1) * (1 - c[m - 1]) < f])
            assert int(got[row]) == n


def test_parallel_commits_the_most_probable_proposal_not_the_rules_favourite():
    """Entropy ranks position 2 (p = 0.89, the rest on one token) above position 3
    (p = 0.91, the rest spread over 60 tokens); threshold 0.9 commits position 3."""
    hand = np.full((1, 2 + 2, VOCAB), -30.0)
    hand[0, 2, :2] = np.log([0.89, 0.11])
    hand[0, 3, :61] = np.log([0.91] + [0.09 / 60] * 60)
    entropy = np_confidence("entropy", hand[0, 2:, :MASK])
    assert entropy[0] > entropy[1]
    out = run_fixed(hand, 2, alg="entropy", parallel="threshold", threshold=0.9)
    np.testing.assert_array_equal(np.asarray(out.order)[0, 2:], [1, 0])


def np_parallel_count(p, parallel):
    """Fast-dLLM's count from the proposals' probabilities p [W] (threshold 0.75, factor 1)."""
    if parallel == "threshold":
        return max(1, int((p > 0.75).sum()))
    c = -np.sort(-p)
    return max([1] + [m for m in range(1, len(c) + 1) if (m + 1) * (1 - c[m - 1]) < 1.0])


@pytest.mark.parametrize("parallel", ["threshold", "factor"])
@pytest.mark.parametrize("alg", ["entropy", "topk_margin", "random"])
def test_parallel_first_step_commits_the_k_most_probable(alg, parallel):
    """Ten positions whose top token has a random probability in (0.5, 0.97) and the
    rest on one token or spread over 60 (so the rules rank them otherwise): the
    first step commits NumPy's count, the positions with the most probable tokens."""
    rng = np.random.default_rng(9)
    top = rng.uniform(0.5, 0.97, (2, 10))
    spread = rng.choice([1, 60], (2, 10))
    logits = np.full((2, 3 + 10, VOCAB), -30.0)
    for row, i in np.ndindex(2, 10):
        logits[row, 3 + i, 0] = np.log(top[row, i])
        logits[row, 3 + i, 1:1 + spread[row, i]] = np.log((1 - top[row, i]) / spread[row, i])
    p = np_confidence("maskgit_plus", logits[:, 3:, :MASK])  # the greedy token's probability
    out = run_fixed(logits, 3, alg=alg, parallel=parallel, threshold=0.75, factor=1.0)
    first = np.asarray(out.order)[:, 3:] == 0
    rule_differs = alg == "random"
    for row in range(2):
        k = np_parallel_count(p[row], parallel)
        assert 1 < k < 10
        most_probable = np.argsort(-p[row])[:k]
        np.testing.assert_array_equal(np.flatnonzero(first[row]), np.sort(most_probable))
        by_rule = np.argsort(-np_confidence(alg, logits[row, 3:, :MASK]))[:k]
        rule_differs |= set(by_rule) != set(most_probable)
    assert rule_differs  # the rule alone would have picked other positions


def test_threshold_one_is_one_token_per_step_and_zero_is_one_step_per_block(params, prompts):
    one = np.asarray(run(params, prompts, alg="maskgit_plus", parallel="threshold",
                         threshold=1.0).order)[:, 8:]
    for row in one:
        np.testing.assert_array_equal(np.sort(row), np.arange(N))
    out = run(params, prompts, alg="entropy", parallel="threshold", threshold=0.0, block_length=4)
    np.testing.assert_array_equal(np.asarray(out.order)[:, 8:],
                                  np.repeat(np.arange(N // 4), 4)[None].repeat(3, 0))
    np.testing.assert_array_equal(out.steps, [N // 4] * 3)


@pytest.mark.parametrize("kw", [dict(alg="random"),
                                dict(alg="entropy", parallel="threshold", threshold=0.5)])
def test_block_decoding_never_unmasks_right_of_the_current_block(params, prompts, kw):
    order = np.asarray(run(params, prompts, block_length=4, steps=6, **kw).order)[:, 8:]
    blocks = order.reshape(3, N // 4, 4)
    # Every step of block b precedes every step of block b + 1.
    assert (blocks.max(-1)[:, :-1] < blocks.min(-1)[:, 1:]).all()


# ----------------------------------------------------------------------------- batching

@pytest.mark.parametrize("kw", [dict(),
                                dict(alg="maskgit_plus", parallel="threshold", threshold=0.3,
                                     block_length=4, cache=True)])
def test_greedy_batch_with_left_padding_equals_each_row_alone(params, prompts, kw):
    batch = run(params, prompts, **kw)
    x, valid = prompts
    for row, pad in enumerate((5, 3, 0)):
        alone = run(params, (x[row:row + 1, pad:], valid[row:row + 1, pad:]), **kw)
        np.testing.assert_array_equal(batch.tokens[row, pad:], alone.tokens[0])
        np.testing.assert_array_equal(batch.order[row, pad:], alone.order[0])
        assert int(batch.steps[row]) == int(alone.steps[0])


def test_one_block_window_from_concrete_prompts_changes_nothing(params, prompts):
    """Eager prompts let one-block decoding propose from the first generated position
    on; under jit (traced prompts) the window is the whole canvas. Same output, with
    a hole of masks in a prompt too (infilling)."""
    x, valid = prompts
    x = x.at[2, 4:6].set(MASK)
    for kw in (dict(alg="entropy"), dict(alg="maskgit_plus", temperature=0.8, top_p=0.9)):
        cfg = S.SampleConfig(max_new_tokens=N, steps=N, **kw)
        eager = S.generate(params, x, jax.random.key(3), cfg, apply_fn=APPLY, mask_id=MASK,
                           valid=valid)
        traced = jax.jit(lambda p, x, v: S.generate(p, x, jax.random.key(3), cfg, apply_fn=APPLY,
                                                    mask_id=MASK, valid=v))(params, x, valid)
        assert S._generated_span(x, valid, N, MASK) == 8 + N - 4
        np.testing.assert_array_equal(eager.tokens, traced.tokens)
        np.testing.assert_array_equal(eager.order, traced.order)


# ----------------------------------------------------------------------------- EOS

def eos_logits(eos_at):
    """Fixed logits for 2 rows x (2 prompt + 8 new): position i proposes token 1
    with confidence falling left to right, except EOS at new position eos_at[row]
    (most confident)."""
    logits = np.zeros((2, 10, VOCAB))
    logits[:, 2:, 1] = np.linspace(8, 4, 8)
    for row, at in enumerate(eos_at):
        logits[row, 2 + at, EOS] = 12.0
    return logits


def test_rows_stop_after_eos_and_the_rest_is_pad():
    out = run_fixed(eos_logits([2, 5]), 2, eos=True, alg="maskgit_plus", schedule="even")
    tokens, order = np.asarray(out.tokens)[:, 2:], np.asarray(out.order)[:, 2:]
    np.testing.assert_array_equal(tokens[0], [1, 1, EOS] + [PAD] * 5)
    np.testing.assert_array_equal(tokens[1], [1] * 5 + [EOS, PAD, PAD])
    # EOS first (most confident), then left to right until nothing before it is masked.
    np.testing.assert_array_equal(order[0], [1, 2, 0] + [-1] * 5)
    np.testing.assert_array_equal(order[1], [1, 2, 3, 4, 5, 0, -1, -1])
    np.testing.assert_array_equal(out.steps, [3, 6])


def test_suppress_eos_commits_eos_last_in_its_block():
    out = run_fixed(eos_logits([2, 5]), 2, eos=True, alg="maskgit_plus", schedule="even",
                    suppress_eos=True, block_length=4)
    order = np.asarray(out.order)[:, 2:]
    # EOS waits for the rest of its block, however confident.
    np.testing.assert_array_equal(order[0], [0, 1, 3, 2] + [-1] * 4)
    np.testing.assert_array_equal(order[1], [0, 1, 2, 3, 4, 7, 5, 6])
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 2:],
                                  [[1, 1, EOS] + [PAD] * 5, [1] * 5 + [EOS, PAD, PAD]])
    np.testing.assert_array_equal(out.steps, [4, 8])


# ----------------------------------------------------------------------------- cache

def test_cache_with_exact_refresh_matches_the_uncached_sampler(params, prompts):
    kw = dict(alg="entropy", block_length=4, steps=N)
    plain = run(params, prompts, **kw)
    exact = run(params, prompts, cache=True, cache_refresh=1, **kw)
    np.testing.assert_array_equal(exact.tokens, plain.tokens)
    np.testing.assert_array_equal(exact.order, plain.order)
    assert int(exact.refreshes) == N
    approx = run(params, prompts, cache=True, **kw)
    assert int(approx.refreshes) == N // 4
    agreement = float((approx.tokens[:, 8:] == plain.tokens[:, 8:]).mean())
    print(f"approximate cache (refresh once per block): {agreement:.0%} of tokens agree")


def test_sample_config_from_dict_rejects_unknown_keys():
    cfg = S.sample_config_from_dict({"alg": "entropy", "steps": 8, "prompt": "def f():"})
    assert cfg.steps == 8
    with pytest.raises(KeyError, match="temprature"):
        S.sample_config_from_dict({"temprature": 0.2})
    with pytest.raises(ValueError, match="alg"):
        S.SampleConfig(alg="confidence")
    with pytest.raises(ValueError, match="block_length"):
        S.SampleConfig(cache=True)
    with pytest.raises(ValueError, match="alg_temp"):
        S.SampleConfig(parallel="threshold", alg_temp=0.5)


# ---- the text-level helper ----

class _Vocab:
    """A stand-in tokenizer over the test model's 64 ids: text = one character per id
    (chr(48 + id)); MASK / PAD / EOS as above; <|im_end|> = 60."""
    vocab_size, mask_id, pad_id, eos_id, im_end_id = VOCAB, MASK, PAD, EOS, 60

    def encode(self, text):
        return [ord(c) - 48 for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt):
        return "<" + messages[-1]["content"] + ">" + ("!" if add_generation_prompt else "")


def test_generate_text_cuts_each_row_at_its_own_stop(params):
    tok, cfg = _Vocab(), S.SampleConfig(max_new_tokens=N, steps=N, temperature=1.0)
    texts = ["123", "45678"]
    gen = S.generate_text(params, texts, jax.random.key(5), cfg, apply_fn=APPLY, tokenizer=tok,
                          multiple=8)
    assert gen.prompts.shape == (2, 8) and gen.prompt_valid.sum(1).tolist() == [3, 5]
    tokens = np.asarray(gen.decoded.tokens)
    for row, text in zip(tokens, gen.texts):       # by hand: ids after the prompt, to a stop
        ids = row[8:].tolist()
        stops = [i for i, t in enumerate(ids) if t in (PAD, EOS, 60)]
        assert text == "".join(chr(48 + t) for t in ids[:stops[0] if stops else None])
        if EOS in ids:                                # the sampler got the EOS id: pads after it
            assert all(t == PAD for t in ids[ids.index(EOS) + 1:])
    chat = S.generate_text(params, ["12"], jax.random.key(5), cfg, apply_fn=APPLY,
                           tokenizer=tok, chat=True, multiple=1)
    assert tok.decode(chat.prompts[0].tolist()) == "<12>!"


def test_generate_text_infills_between_text_and_suffix(params):
    tok, cfg = _Vocab(), S.SampleConfig(max_new_tokens=4, steps=4)
    gen = S.generate_text(params, ["12", "3"], jax.random.key(0), cfg, apply_fn=APPLY,
                          tokenizer=tok, suffix="99", multiple=1)
    tokens = np.asarray(gen.decoded.tokens)
    assert tokens.shape == (2, 8)                     # nothing appended: the hole is inside
    np.testing.assert_array_equal(tokens[:, -2:], [[9, 9], [9, 9]])
    for row, text in zip(tokens, gen.texts):
        hole = row[2:6].tolist()
        stops = [i for i, t in enumerate(hole) if t in (PAD, EOS, 60)]
        assert text == tok.decode(hole[:stops[0] if stops else None])


def test_left_pad_pads_on_the_left_and_truncates_from_the_left():
    tokens, valid = S.left_pad([[1, 2], [3, 4, 5, 6, 7], []], 4, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 1, 2], [4, 5, 6, 7], [0, 0, 0, 0]])
    np.testing.assert_array_equal(valid, [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])


# ----------------------------------------------------------------------------- trace

def test_trace_holds_each_masked_positions_confidence_until_it_is_committed():
    """With logits that ignore the canvas, the traced confidence of a position is NumPy's
    negative entropy of its logits at every step up to the one that commits it, and nan
    from the next step on (and on the prompt); without trace=True there is none."""
    rand = np.asarray(jax.random.normal(jax.random.key(9), (2, 3 + 8, VOCAB))) * 3
    out = run_fixed(rand, 3, alg="entropy", schedule="dream")
    assert out.trace is None
    x = jnp.zeros((2, 3), jnp.int32)
    cfg = S.SampleConfig(max_new_tokens=8, steps=8, alg="entropy")
    out = S.generate(jnp.asarray(rand, jnp.float32), x, jax.random.key(0), cfg,
                     apply_fn=FIXED, mask_id=MASK, trace=True)
    trace, order = np.asarray(out.trace), np.asarray(out.order)
    assert trace.shape == (11, 2, 11)  # the loop's bound: max(steps, P + N)
    conf = np_confidence("entropy", rand[..., :MASK])
    steps = np.arange(11)[:, None, None]
    still_masked = (order[None] >= steps) & (steps <= order.max())
    np.testing.assert_allclose(trace[still_masked], np.broadcast_to(conf, trace.shape)[still_masked],
                               rtol=1e-5, atol=1e-6)
    assert np.isnan(trace[~still_masked]).all()
