"""The model's heavy operations, per backend: attention paths, the projection's
backward pass, and the cross-entropy over the vocabulary in chunks.

Attention (`attention`, chosen by `model.attention`):
  xla     softmax attention in XLA ops: the [B, H, W, K] float32 scores exist one
          layer at a time and are not kept for the backward pass, which recomputes
          them from q, k and the log-sum-exp (one more q k^T matmul).
  cudnn   cuDNN flash attention (NVIDIA GPUs, bfloat16 / float16): nothing of size
          W x K is kept. A call whose every query sees every key (no padding, no
          causal / lookahead band: a pretraining batch) runs cuDNN's unmasked
          kernel; any other mask enters as an additive bias, whose gradient cuDNN
          also computes (slower). Self-attention calls only (W = K); the sampler's
          window calls against a KV cache take xla.
  pallas  the Pallas splash-attention kernel (TPU): padding as segment ids, a static
          causal / lookahead band as a block-sparse mask. Calls it cannot take run
          the xla path: lengths that are not multiples of 128 (decoding windows) and
          an annealing lookahead (traced, or an [S, S] array of allowed pairs: Stage
          1's attention annealing). Off a TPU it runs in Pallas interpret mode
          (slow; for tests and memory plans).
  auto    cudnn on a GPU in bfloat16 / float16, pallas on a TPU, xla otherwise.

`dense` is the projection matmul. On CPU the backward passes of `dense` and of the
xla attention materialise the operands of their matmuls first: XLA:CPU otherwise
fuses their elementwise producers into the transposing copies the matmuls need,
which then run ~20x slower than a plain transpose. `cross_entropy`
scores targets under x . kernel without the float32 [B, S, V] logits ever existing
whole: `chunk` positions at a time, forward and backward (which recomputes them).
"""
from __future__ import annotations

import functools
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec as P

Array = jax.Array

ATTENTION = ("auto", "xla", "cudnn", "pallas")
_PALLAS_TILE = 128  # splash attention's lengths: multiples of this


# ----------------------------------------------------------------------------- projection

def _contract(x: Array, kernel: Array, n_in: int) -> Array:
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x: Array, kernel: Array, n_in: int) -> Array:
    """x [..., *in] . kernel [*in, *out] -> [..., *out]: contracts the last n_in axes
    of x with the first n_in of kernel."""
    return _contract(x, kernel, n_in)


def _dense_fwd(x, kernel, n_in):
    return _contract(x, kernel, n_in), (x, kernel)


def _materialised(*xs):
    """xs computed before any use (on CPU; see the module doc), else as they are."""
    return jax.lax.optimization_barrier(xs) if jax.default_backend() == "cpu" else xs


def _dense_bwd(n_in, res, g):
    x, kernel = res
    x, g = _materialised(x, g)
    n_out, n_batch = kernel.ndim - n_in, x.ndim - n_in
    dx = jax.lax.dot_general(g, kernel, ((tuple(range(g.ndim - n_out, g.ndim)),
                                          tuple(range(n_in, kernel.ndim))), ((), ())))
    dk = jax.lax.dot_general(x, g, ((tuple(range(n_batch)), tuple(range(n_batch))), ((), ())))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


# ----------------------------------------------------------------------------- cross-entropy

def argmax(z: Array, z_max: Array | None = None) -> Array:
    """argmax over the last axis (first of ties) as a max and a min of float indices
    (exact below 2^24), reductions XLA:CPU vectorises: 4x faster than its argmax
    over [4, 272, 2048]. z_max: max(z, -1) if already at hand."""
    if z_max is None:
        z_max = jnp.max(z, -1)
    index = jnp.arange(z.shape[-1], dtype=jnp.float32)
    return jnp.min(jnp.where(z == z_max[..., None], index, jnp.inf), -1).astype(jnp.int32)


def cross_entropy(x: Array, kernel: Array, targets: Array, chunk: int = 0,
                  vocab_axis: int = 1) -> tuple[Array, Array]:
    """Cross-entropy of `targets` under the logits x . kernel, and their argmax.

    x: [B, S, E]; kernel: [E, V] (vocab_axis=1) or [V, E] (vocab_axis=0: a tied
    embedding); targets: [B, S] int. Returns (nll [B, S] float32 nats, argmax [B, S]
    int32; the argmax carries no gradient). The float32 logits exist for `chunk`
    positions of the sequence at a time (0 = all at once); the backward pass
    recomputes them chunk by chunk (one more head matmul) instead of keeping them."""
    s = x.shape[1]
    c = s if chunk <= 0 else min(chunk, s)
    pad = -s % c
    if pad:  # padded positions score token 0 and get no gradient (sliced off)
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    nll, predicted = _xent(x, kernel, targets, c, vocab_axis)
    return nll[:, :s], predicted[:, :s]


def _chunks(a: Array, c: int) -> Array:
    """[B, S, ...] -> [S / c, B, c, ...] (scan over the leading axis)."""
    return jnp.moveaxis(a.reshape(a.shape[0], a.shape[1] // c, c, *a.shape[2:]), 1, 0)


def _unchunk(a: Array) -> Array:
    """[n, B, c, ...] -> [B, n * c, ...]."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def _chunk_logits(xc: Array, kernel: Array, vocab_axis: int) -> Array:
    """[B, c, E] -> float32 [B, c, V]."""
    dims = (((xc.ndim - 1,), (1 - vocab_axis,)), ((), ()))
    logits = jax.lax.dot_general(xc, kernel, dims, preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))


def _gathered(kernel: Array, vocab_axis: int) -> Array:
    """The head kernel with its embedding axis whole (one all-gather under FSDP,
    outside the chunk loop, rather than one per chunk)."""
    axes = ("vocab", None) if vocab_axis == 0 else (None, "vocab")
    return nn.with_logical_constraint(kernel, axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _xent(x, kernel, targets, chunk, vocab_axis):
    return _xent_fwd(x, kernel, targets, chunk, vocab_axis)[0]


def _xent_fwd(x, kernel, targets, chunk, vocab_axis):
    kernel_full = _gathered(kernel, vocab_axis)

    def one(_, xs):
        xc, tc = xs
        logits = _chunk_logits(xc, kernel_full, vocab_axis)
        top = jnp.max(logits, -1)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), -1))
        is_target = jnp.arange(logits.shape[-1]) == tc[..., None]
        target = jnp.sum(jnp.where(is_target, logits, 0.0), -1)
        return None, (lse - target, argmax(logits, top), lse)

    _, (nll, predicted, lse) = jax.lax.scan(one, None, (_chunks(x, chunk),
                                                         _chunks(targets, chunk)))
    return (_unchunk(nll), _unchunk(predicted)), (x, kernel, targets, lse)  # lse: [n, B, c]


def _xent_bwd(chunk, vocab_axis, res, cotangents):
    x, kernel, targets, lse = res
    g = cotangents[0]  # the argmax's cotangent is symbolic zero
    kernel_full = _gathered(kernel, vocab_axis)
    over_tokens = (((0, 1), (0, 1)), ((), ()))  # [B, c, .] x [B, c, .] summed over B and c

    def one(dk, xs):
        xc, tc, lc, gc = xs
        logits = _chunk_logits(xc, kernel_full, vocab_axis)
        is_target = jnp.arange(logits.shape[-1]) == tc[..., None]
        dlogits = (gc[..., None] * (jnp.exp(logits - lc[..., None]) - is_target)).astype(x.dtype)
        dx = jax.lax.dot_general(dlogits, kernel_full, (((2,), (vocab_axis,)), ((), ())))
        lhs, rhs = (xc, dlogits) if vocab_axis == 1 else (dlogits, xc)  # the kernel's layout
        dk = dk + jax.lax.dot_general(lhs, rhs, over_tokens, preferred_element_type=jnp.float32)
        return dk, dx.astype(x.dtype)

    dk, dx = jax.lax.scan(one, jnp.zeros(kernel.shape, jnp.float32),
                          (_chunks(x, chunk), _chunks(targets, chunk), lse, _chunks(g, chunk)))
    return _unchunk(dx), dk.astype(kernel.dtype), None


_xent.defvjp(_xent_fwd, _xent_bwd)


# ----------------------------------------------------------------------------- attention

@struct.dataclass
class Mask:
    """One attention call's mask in the forms the paths take.
    full: [B, 1, W, K] bool (xla, cudnn). For pallas: q_valid [B, W] and k_valid [B, K]
    bool (padding, as segment ids) and, static (not traced through jit / scan / remat),
    lookahead: None = every key, or an int: query i sees keys j <= i + lookahead (a
    block-sparse mask); static_band False when the lookahead is traced or an array
    of allowed pairs (then pallas takes the xla path); dense (static) True when
    every query is known to see every key (no padding, no band): cudnn then needs
    no mask at all."""
    full: Array
    q_valid: Array
    k_valid: Array
    lookahead: int | None = struct.field(pytree_node=False, default=None)
    static_band: bool = struct.field(pytree_node=False, default=True)
    dense: bool = struct.field(pytree_node=False, default=False)


def resolve(impl: str, dtype) -> str:
    """The attention path `impl` ("auto" or one of ATTENTION) names for this backend."""
    if impl not in ATTENTION:
        raise ValueError(f"model.attention={impl!r}; allowed: {ATTENTION}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "pallas" if backend == "tpu" else "xla"


def attention(q: Array, k: Array, v: Array, mask: Mask, impl: str) -> Array:
    """q [B, W, H, D], k and v [B, K, KV, D] (H a multiple of KV) -> [B, W, H, D].
    impl: a resolved path (xla | cudnn | pallas)."""
    if impl == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 (or float16), "
                             f"got {q.dtype}")
        if q.shape[1] == k.shape[1]:
            return jax.nn.dot_product_attention(q, k, v, mask=None if mask.dense else mask.full,
                                                implementation="cudnn")
    if (impl == "pallas" and mask.static_band and q.shape[1] % _PALLAS_TILE == 0
            and k.shape[1] % _PALLAS_TILE == 0):
        return _splash_sharded(q, k, v, mask)
    return _xla_attention(q, k, v, mask.full)


def _xla_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """The xla path: q [B, W, H, D], k and v [B, K, KV, D], mask [B, 1, W, K]."""
    b, w, h, d = q.shape
    kv = k.shape[2]
    # [B, KV, G * W, D]: the G query heads of a K/V head are the rows of one matmul.
    rows = jnp.moveaxis(q.reshape(b, w, kv, h // kv, d), 1, 3).reshape(b, kv, -1, d)
    out = _softmax_attention(rows * jnp.asarray(d ** -0.5, q.dtype),
                             jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
    return jnp.moveaxis(out.reshape(b, kv, h // kv, w, d), 3, 1).reshape(b, w, h, d)


_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: a row without keys stays finite


def _scores(q, k, mask):
    """float32 [B, KV, G * W, K] scores of q [B, KV, G * W, D] (scaled) against
    k [B, KV, K, D]; masked entries at _MASKED (mask: [B, 1, W, K])."""
    s = jnp.einsum("bnrd,bnkd->bnrk", q, k, preferred_element_type=jnp.float32)
    b, n, r, kv_len = s.shape
    w = mask.shape[2]
    s = jnp.where(mask[:, :, None], s.reshape(b, n, r // w, w, kv_len), _MASKED)
    return s.reshape(b, n, r, kv_len)


@jax.custom_vjp
def _softmax_attention(q, k, v, mask):
    """softmax(q k^T) v per K/V head: q [B, KV, G * W, D] (scaled), k and v
    [B, KV, K, D], mask [B, 1, W, K] -> [B, KV, G * W, D]."""
    return _softmax_attention_fwd(q, k, v, mask)[0]


def _softmax_attention_fwd(q, k, v, mask):
    s = _scores(q, k, mask)
    top = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - top)
    total = jnp.sum(p, -1, keepdims=True)
    out = jnp.einsum("bnrk,bnkd->bnrd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32) / total
    out = out.astype(q.dtype)
    return out, (q, k, v, mask, out, top + jnp.log(total))


def _softmax_attention_bwd(res, g):
    q, k, v, mask, out, lse = res
    p = jnp.exp(_scores(q, k, mask) - lse)
    p, g = _materialised(p.astype(v.dtype), g)
    # The gradients of k and v contract over the query rows, the major axis of both
    # operands: computed transposed ([D, K]), so only the small operand moves.
    dv = jnp.einsum("bnrd,bnrk->bndk", g, p, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bnrd,bnkd->bnrk", g, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    ds, = _materialised((p * (dp - delta)).astype(q.dtype))
    dq = jnp.einsum("bnrk,bnkd->bnrd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnrd,bnrk->bndk", q, ds, preferred_element_type=jnp.float32)
    return (dq.astype(q.dtype), jnp.swapaxes(dk, 2, 3).astype(k.dtype),
            jnp.swapaxes(dv, 2, 3).astype(v.dtype), None)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _block(n: int) -> int:
    return max(b for b in (_PALLAS_TILE, 2 * _PALLAS_TILE, 4 * _PALLAS_TILE) if n % b == 0)


def _splash(q, k, v, q_valid, k_valid, lookahead):
    """Splash attention on [B, H, W, D] / [B, KV, K, D] (q pre-scaled); one kernel,
    vmapped over the batch. lookahead: None or a static int (see Mask)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash, splash_attention_mask as splash_mask)
    heads, w, kv_len = q.shape[1], q.shape[2], k.shape[2]
    if lookahead is None:
        one = splash_mask.FullMask((w, kv_len))
    else:  # model.attention_mask's band, in NumPy
        one = splash_mask.NumpyMask(np.arange(kv_len)[None] <= np.arange(w)[:, None] + lookahead)
    head_mask = splash_mask.MultiHeadMask([one] * heads)
    bq, bk = _block(w), _block(kv_len)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                              block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                              block_kv_dq=bk)
    kernel = splash.make_splash_mha(head_mask, block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1,
                                    interpret=jax.default_backend() != "tpu")
    segments = splash.SegmentIds(q=q_valid.astype(jnp.int32), kv=k_valid.astype(jnp.int32))
    return jax.vmap(kernel)(q, k, v, segments)


def _splash_sharded(q, k, v, mask: Mask):
    """Splash attention in the model's [B, W, H, D] layout; under a mesh, one kernel
    per device (shard_map) over its batch rows and, where the tensor axis divides
    both head counts, its heads."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    to_heads = lambda t: jnp.swapaxes(t, 1, 2)
    args = (to_heads(q * jnp.asarray(scale, q.dtype)), to_heads(k), to_heads(v),
            mask.q_valid, mask.k_valid)
    per_device = functools.partial(_splash, lookahead=mask.lookahead)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return to_heads(per_device(*args))
    batch, heads = nn.logical_to_mesh_axes(("batch", "act_heads"))
    head_devices = int(np.prod([mesh.shape[a] for a in np.atleast_1d(heads)])) if heads else 1
    if q.shape[2] % head_devices or k.shape[2] % head_devices:
        heads = None
    rows, by_head = P(batch), P(batch, heads)
    fn = jax.shard_map(per_device, in_specs=(by_head, by_head, by_head, rows, rows),
                       out_specs=by_head, check_vma=False)
    return to_heads(fn(*args))
