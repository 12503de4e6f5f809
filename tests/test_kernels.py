"""Kernels: the projection's VJP, the chunked cross-entropy, and the attention paths
(Pallas splash attention in interpret mode against the XLA path)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from dllm import kernels as K


def normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape) * scale


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_and_its_gradients_match_einsum(n_in):
    x = normal(0, (2, 5, 3, 4) if n_in == 2 else (2, 5, 12))
    w = normal(1, (3, 4, 6) if n_in == 2 else (12, 6))
    spec = "bsij,ijo->bso" if n_in == 2 else "bsi,io->bso"
    g = normal(2, (2, 5, 6))
    ours = jax.vjp(lambda x, w: K.dense(x, w, n_in), x, w)
    ref = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1](g), ref[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_argmax_takes_the_first_of_ties():
    z = jnp.array([[1.0, 3.0, 3.0, 0.0], [-jnp.inf, 2.0, -1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(K.argmax(z), np.argmax(np.asarray(z), -1))


def np_cross_entropy(x, w, t):
    """float64 reference: (nll [B, S], argmax [B, S]) of t under x . w ([E, V])."""
    logits = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    return lse - np.take_along_axis(logits, t[..., None], -1)[..., 0], logits.argmax(-1)


@pytest.mark.parametrize("chunk", [0, 3, 4])
@pytest.mark.parametrize("vocab_axis", [0, 1])
def test_cross_entropy_in_chunks_matches_float64_and_plain_gradients(chunk, vocab_axis):
    """Any chunk size (3 pads the sequence of 8) and either kernel layout give
    NumPy's nll and argmax, and the gradients of the plain full-logits path for an
    arbitrary per-token cotangent."""
    b, s, e, v = 2, 8, 6, 11
    x, w = normal(0, (b, s, e)), normal(1, (e, v))
    t = jax.random.randint(jax.random.key(2), (b, s), 0, v)
    g = normal(3, (b, s))
    kernel = w if vocab_axis == 1 else w.T
    (nll, predicted), vjp = jax.vjp(lambda x, k: K.cross_entropy(x, k, t, chunk, vocab_axis),
                                    x, kernel)
    want_nll, want_argmax = np_cross_entropy(x, w, np.asarray(t))
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predicted, want_argmax)

    def plain(x, k):
        logits = x @ (k if vocab_axis == 1 else k.T)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1)[..., 0]
    ref_grads = jax.vjp(plain, x, kernel)[1](g)
    grads = vjp((g, np.zeros(predicted.shape, jax.dtypes.float0)))
    for a, want in zip(grads, ref_grads):
        np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)


def test_resolve_picks_xla_on_cpu_and_rejects_unknown_paths():
    assert K.resolve("auto", "bfloat16") == "xla"  # tests run on CPU
    assert K.resolve("pallas", "float32") == "pallas"
    with pytest.raises(ValueError, match="model.attention='flash'"):
        K.resolve("flash", "float32")
    q = jnp.zeros((1, 4, 2, 8))
    mask = K.Mask(jnp.ones((1, 1, 4, 4), bool), jnp.ones((1, 4), bool), jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="bfloat16"):
        K.attention(q, q, q, mask, "cudnn")


# ----------------------------------------------------------------------------- attention

B, S, H, KV, D = 2, 128, 4, 2, 8


def qkv(seed=0):
    return (normal(seed, (B, S, H, D)), normal(seed + 1, (B, S, KV, D)),
            normal(seed + 2, (B, S, KV, D)))


def masks(lookahead=None):
    """Row 0 unpadded, row 1 with 37 left pads; key j visible from query i if
    j <= i + lookahead (None: every key)."""
    valid = jnp.arange(S)[None, :] >= jnp.array([[0], [37]])
    full = valid[:, None, :, None] & valid[:, None, None, :]
    if lookahead is not None:
        full = full & (jnp.arange(S)[None, :] <= jnp.arange(S)[:, None] + lookahead)
    return K.Mask(full, valid, valid, lookahead), valid


def check_path_matches_xla(path, mask, valid, seed=0):
    """Outputs at valid queries and gradients of a loss on them agree with the XLA path."""
    q, k, v = qkv(seed)
    w = normal(seed + 3, (B, S, H, D)) * valid[:, :, None, None]

    def loss(impl):
        return lambda q, k, v: jnp.sum(w * K.attention(q, k, v, mask, impl))
    out = K.attention(q, k, v, mask, path)
    ref = K.attention(q, k, v, mask, "xla")
    np.testing.assert_allclose(out * valid[:, :, None, None], ref * valid[:, :, None, None],
                               atol=2e-5)
    grads = jax.grad(loss(path), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_xla_path_is_softmax_attention_in_numpy():
    """The reference the other paths are held to: per head, softmax(q k^T / sqrt(D))
    over the valid keys (GQA: query head h reads key head h // (H / KV))."""
    q, k, v = (np.asarray(a, np.float64) for a in qkv())
    mask, valid = masks()
    out = np.asarray(K.attention(*qkv(), mask, "xla"))
    for b in range(B):
        keys = np.asarray(valid[b])
        for h in range(H):
            scores = q[b, :, h] @ k[b, keys, h // (H // KV)].T / np.sqrt(D)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            want = (p / p.sum(-1, keepdims=True)) @ v[b, keys, h // (H // KV)]
            np.testing.assert_allclose(out[b, keys, h], want[keys], atol=1e-5)


def test_pallas_splash_attention_matches_xla_with_padding():
    check_path_matches_xla("pallas", *masks())


def test_pallas_splash_attention_matches_xla_with_a_lookahead_band():
    check_path_matches_xla("pallas", *masks(lookahead=5), seed=4)


def test_pallas_splash_attention_under_a_mesh_runs_per_device():
    """Four devices: two split the batch, two the heads (one kernel each, shard_map)."""
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 1, 2), ("data", "fsdp", "tensor"),
                axis_types=(AxisType.Auto,) * 3)
    rules = (("batch", ("data", "fsdp")), ("act_heads", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        check_path_matches_xla("pallas", *masks(), seed=7)


def test_pallas_falls_back_to_xla_off_its_tile():
    """Lengths that are not multiples of 128 (a decoding window) take the XLA path."""
    q, k, v = (a[:, :40] for a in qkv())
    valid = jnp.ones((B, 40), bool)
    mask = K.Mask(valid[:, None, :, None] & valid[:, None, None, :], valid, valid)
    np.testing.assert_array_equal(K.attention(q, k, v, mask, "pallas"),
                                  K.attention(q, k, v, mask, "xla"))


@pytest.mark.gpu
@pytest.mark.parametrize("padded", [False, True])
def test_cudnn_matches_xla_in_bfloat16(padded):
    """Forward and gradients, with left padding (the mask as a bias) and without
    (Mask.dense: cuDNN's unmasked kernel)."""
    if jax.default_backend() != "gpu":
        pytest.skip("needs an NVIDIA GPU")
    mask, valid = masks()
    if not padded:
        valid = jnp.ones_like(valid)
        mask = K.Mask(jnp.ones_like(mask.full), valid, valid, dense=True)
    f32 = qkv()                                   # the reference: the xla path in float32
    bf16 = [a.astype(jnp.bfloat16) for a in f32]
    w = normal(3, (B, S, H, D)) * valid[:, :, None, None]
    loss = lambda impl: lambda q, k, v: jnp.sum(w * K.attention(q, k, v, mask, impl))
    out = K.attention(*bf16, mask, "cudnn").astype(jnp.float32)
    np.testing.assert_allclose(out * valid[:, :, None, None],
                               K.attention(*f32, mask, "xla") * valid[:, :, None, None], atol=2e-2)
    grads = jax.grad(loss("cudnn"), argnums=(0, 1, 2))(*bf16)
    ref_grads = jax.grad(loss("xla"), argnums=(0, 1, 2))(*f32)
    for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=5e-2, atol=5e-2)
