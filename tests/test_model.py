"""Model: attention direction, padding, RoPE, logits shift, FLOPs and param count."""
import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dllm import model as M

CFG = M.ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8,
                    mlp=64, shift_logits=False)


@pytest.fixture(scope="module")
def params():
    return M.Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def apply(params, tokens, cfg=CFG, **kw):
    return M.Transformer(cfg).apply({"params": params}, tokens, **kw)


def tokens(seed=0, b=2, s=12):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, CFG.vocab_size)


def test_bidirectional_sees_later_tokens_and_causal_does_not(params):
    x = tokens()
    y = x.at[:, 9].set((x[:, 9] + 1) % CFG.vocab_size)
    bi = jnp.abs(apply(params, x) - apply(params, y))
    assert bi[:, 3].max() > 1e-4
    causal = jnp.abs(apply(params, x, lookahead=0) - apply(params, y, lookahead=0))
    assert causal[:, :9].max() == 0.0
    assert causal[:, 9].max() > 1e-4
    # The config's `causal` flag is the same as lookahead=0.
    causal_cfg = dataclasses.replace(CFG, causal=True)
    np.testing.assert_array_equal(apply(params, x, causal_cfg), apply(params, x, lookahead=0))


def test_lookahead_interpolates_between_causal_and_full(params):
    x = tokens()
    np.testing.assert_allclose(apply(params, x, lookahead=x.shape[1]), apply(params, x),
                               atol=1e-6)
    y = x.at[:, 9].set((x[:, 9] + 1) % CFG.vocab_size)
    diff = jnp.abs(apply(params, x, lookahead=3) - apply(params, y, lookahead=3)).max(axis=(0, 2))
    # Each of the 2 layers lets position i see up to i + 3, so 9 reaches back to 3.
    assert diff[:3].max() == 0.0 and diff[3] > 1e-4


def test_lookahead_array_lets_a_query_see_exactly_the_allowed_keys():
    """One layer: the output of a valid query i depends on token j != i iff (i, j) is
    allowed and j is a valid token; an [S, S] array applies to every row, a
    [B, S, S] one row by row."""
    cfg = dataclasses.replace(CFG, layers=1)
    p = M.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    allowed = rng.random((2, 10, 10)) < 0.5
    allowed[:, np.arange(10), np.arange(10)] = True
    valid = np.ones((2, 10), bool)
    valid[1, 7] = False
    x = tokens(s=10)
    # Input j of the stack has token j changed in both rows.
    changed = jnp.stack([x.at[:, j].set((x[:, j] + 1) % CFG.vocab_size) for j in range(10)])
    fwd = jax.jit(jax.vmap(lambda t, la: apply(p, t, cfg, valid=jnp.asarray(valid),
                                               lookahead=la), in_axes=(0, None)))
    for lookahead, per_row in ((allowed[0], allowed[:1].repeat(2, 0)), (allowed, allowed)):
        out = np.asarray(fwd(x[None], jnp.asarray(lookahead))[0])
        moved = np.abs(np.asarray(fwd(changed, jnp.asarray(lookahead))) - out).max(-1) > 1e-6
        for j in range(10):
            want = per_row[:, :, j] & valid[:, j:j + 1]
            want[:, j] = True   # a token always moves its own output
            np.testing.assert_array_equal(moved[j][valid], want[valid])


def test_left_padding_changes_no_real_output(params):
    x = tokens(s=10)
    pad = 5
    padded_a = jnp.concatenate([jnp.zeros((2, pad), x.dtype), x], axis=1)
    padded_b = jnp.concatenate([jnp.full((2, pad), 7, x.dtype), x], axis=1)
    valid = jnp.concatenate([jnp.zeros((2, pad), bool), jnp.ones_like(x, bool)], axis=1)
    out_a = apply(params, padded_a, valid=valid)
    out_b = apply(params, padded_b, valid=valid)
    np.testing.assert_array_equal(out_a[:, pad:], out_b[:, pad:])
    # Positions restart at 0 on the first real token: same as the unpadded input.
    np.testing.assert_allclose(out_a[:, pad:], apply(params, x), atol=1e-5)


def test_rope_scores_depend_on_relative_position_only():
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))

    def score(pq, pk):
        return float(jnp.sum(M.rope(q, jnp.array([[pq]]), 1e4) * M.rope(k, jnp.array([[pk]]), 1e4)))

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)
    # Position 0 is the identity rotation.
    np.testing.assert_allclose(M.rope(q, jnp.zeros((1, 1), jnp.int32), 1e4), q, atol=1e-7)


def test_logits_shift_moves_predictions_right_by_one(params):
    x = tokens()
    shifted = apply(params, x, dataclasses.replace(CFG, shift_logits=True))
    plain = apply(params, x)
    np.testing.assert_array_equal(shifted[:, 1:], plain[:, :-1])
    np.testing.assert_array_equal(shifted[:, 0], plain[:, 0])


def test_bfloat16_and_remat_agree_with_float32(params):
    x = tokens()
    ref = apply(params, x)
    for remat in M.REMAT_POLICIES:
        np.testing.assert_allclose(apply(params, x, dataclasses.replace(CFG, remat=remat)), ref,
                                   atol=1e-5)
    bf16 = apply(params, x, dataclasses.replace(CFG, dtype="bfloat16"))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, ref, atol=0.05)


def test_param_count_matches_initialised_tree(params):
    assert sum(p.size for p in jax.tree.leaves(params)) == M.param_count(CFG)
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    p = M.Transformer(tied).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    assert "lm_head" not in p
    assert sum(x.size for x in jax.tree.leaves(p)) == M.param_count(tied)


def test_parameters_carry_logical_axes():
    boxed = M.Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers"]["mlp"]["down"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")


def test_flops_per_token_matches_xla_cost_analysis():
    """The closed-form forward FLOPs agree with XLA's count for a matmul-heavy shape
    (one layer: XLA's cost analysis counts a scanned loop body once)."""
    cfg = M.ModelConfig(vocab_size=512, hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64,
                        mlp=1024)
    seq = 128
    model = M.Transformer(cfg)
    p = model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"]
    compiled = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(
        p, jnp.zeros((1, seq), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = M.flops_per_token(cfg, seq, training=False) * seq
    assert ours == pytest.approx(cost["flops"], rel=0.1)
    assert M.flops_per_token(cfg, seq) == 3 * M.flops_per_token(cfg, seq, training=False)


def test_presets_and_bad_config():
    big = M.ModelConfig(**M.PRESETS["7b"])
    assert 7.0e9 < M.param_count(big) < 7.8e9
    assert 80e6 < M.param_count(M.ModelConfig(**M.PRESETS["100m"])) < 130e6
    with pytest.raises(KeyError, match="hiden"):
        M.config_from_dict({**M.PRESETS["tiny"], "hiden": 3})
    with pytest.raises(ValueError, match="kv_heads"):
        M.ModelConfig(**{**M.PRESETS["tiny"], "kv_heads": 3})


def test_window_call_with_a_fresh_cache_matches_the_full_forward(params):
    """A window of a left-padded canvas, run against the K/V cache of the same canvas,
    gives the full forward's logits there (bar the window's first position, whose
    shifted logits would come from outside the window)."""
    cfg = dataclasses.replace(CFG, shift_logits=True)
    x = tokens(s=16)
    valid = jnp.arange(16)[None] >= jnp.array([[0], [3]])
    full, kv = apply(params, x, cfg, valid=valid, return_kv=True)
    assert kv.k.shape == (CFG.layers, 2, 16, CFG.kv_heads, CFG.head_dim)
    start = jnp.array([5, 9])
    window = start[:, None] + jnp.arange(5)
    x_window = jnp.take_along_axis(x, window, 1)
    out = apply(params, x_window, cfg, cache=kv, window_start=start)
    np.testing.assert_allclose(out[:, 1:], jnp.take_along_axis(full, window[:, 1:, None], 1),
                               atol=1e-5)
    # A stale cache (other tokens elsewhere) changes the window's logits.
    y = x.at[:, 0].set((x[:, 0] + 1) % CFG.vocab_size)
    _, stale = apply(params, y, cfg, valid=valid, return_kv=True)
    out_stale = apply(params, x_window, cfg, cache=stale, window_start=start)
    assert jnp.abs(out_stale[0] - out[0]).max() > 1e-4


@pytest.mark.parametrize("shift,tied", [(False, False), (True, True)])
def test_targets_are_scored_as_the_logits_would_score_them(params, shift, tied):
    """The chunked head (chunks of 5 over 12 positions) gives optax's cross-entropy of
    the logits, their argmax, and the same parameter gradients for a per-token
    cotangent."""
    cfg = dataclasses.replace(CFG, shift_logits=shift, tie_embeddings=tied, xent_chunk=5)
    p = params if not tied else M.Transformer(cfg).init(jax.random.key(0), tokens())["params"]
    x, t = tokens(), tokens(seed=1)
    g = jax.random.normal(jax.random.key(2), t.shape)

    def chunked(p):
        nll, predicted = apply(p, x, cfg, targets=t)
        return jnp.sum(g * nll), (nll, predicted)

    def plain(p):
        logits = apply(p, x, cfg)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, t)
        return jnp.sum(g * nll), (nll, jnp.argmax(logits, -1))

    (_, (nll, predicted)), grads = jax.value_and_grad(chunked, has_aux=True)(p)
    (_, (want_nll, want_argmax)), want_grads = jax.value_and_grad(plain, has_aux=True)(p)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predicted, want_argmax)
    chex.assert_trees_all_close(grads, want_grads, atol=2e-5)


def test_remat_policies_keep_less_memory_in_order_and_the_same_gradients(params):
    x = tokens(s=64)
    loss = lambda cfg: lambda p: jnp.sum(apply(p, x, cfg, targets=x)[0])
    ref = jax.grad(loss(CFG))(params)
    temp = []
    for remat in M.REMAT_POLICIES:  # none, dots_attention, dots, attention, full
        cfg = dataclasses.replace(CFG, remat=remat)
        chex.assert_trees_all_close(jax.grad(loss(cfg))(params), ref, atol=1e-5)
        compiled = jax.jit(jax.grad(loss(cfg))).lower(params).compile()
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
    assert temp == sorted(temp, reverse=True) and len(set(temp)) == len(temp), temp


def test_pallas_attention_path_in_the_model_matches_xla(params):
    """Splash attention (interpret mode on CPU) with left padding, bidirectional and
    with a causal band: the model's logits at real positions equal the XLA path's."""
    x = tokens(s=128)
    valid = jnp.arange(128)[None] >= jnp.array([[0], [29]])
    pallas = dataclasses.replace(CFG, attention="pallas", remat="full")  # remat traces the mask
    for lookahead in (None, 0):
        out = apply(params, x, pallas, valid=valid, lookahead=lookahead)
        ref = apply(params, x, valid=valid, lookahead=lookahead)
        np.testing.assert_allclose(jnp.where(valid[..., None], out, 0),
                                   jnp.where(valid[..., None], ref, 0), atol=1e-4)
    # A traced lookahead (attention annealing) takes the XLA path.
    annealed = jax.jit(lambda p, la: apply(p, x, pallas, valid=valid, lookahead=la))
    np.testing.assert_allclose(annealed(params, 7), apply(params, x, valid=valid, lookahead=7),
                               atol=1e-5)


def test_a_mask_is_dense_only_when_the_caller_passes_no_valid():
    """Mask.dense (cuDNN's unmasked kernel) holds for a call without `valid` and
    without a causal / lookahead band; any padding or band keeps the mask."""
    x = jnp.ones((2, 4), bool)
    assert M.attention_masks(CFG, x, None, all_valid=True).dense
    assert not M.attention_masks(CFG, x, None).dense
    assert not M.attention_masks(CFG, x, 0, all_valid=True).dense


@pytest.mark.gpu
def test_cudnn_path_in_the_model_matches_xla_with_and_without_padding(params):
    """On an NVIDIA GPU in bfloat16: the cudnn model's logits equal the xla path's,
    unpadded (the unmasked kernel) and left-padded (the bias)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    x = tokens(s=128)
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    cudnn = dataclasses.replace(bf16, attention="cudnn")
    np.testing.assert_allclose(apply(params, x, cudnn), apply(params, x, bf16), atol=5e-2)
    valid = jnp.arange(128)[None] >= jnp.array([[0], [29]])
    out = apply(params, x, cudnn, valid=valid)
    ref = apply(params, x, bf16, valid=valid)
    np.testing.assert_allclose(jnp.where(valid[..., None], out, 0),
                               jnp.where(valid[..., None], ref, 0), atol=5e-2)
