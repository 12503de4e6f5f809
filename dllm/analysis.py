"""The paper's analyses of how a diffusion LM decodes (DiffuCoder, arXiv 2506.20639):
how autoregressive its unmasking order is (local and global AR-ness@k), the entropy
sink (at the first step the model is most confident right after the prompt), and
sweeps over temperature, decoding steps and checkpoints; with a plot beside each.

AR-ness reads a decoding order: `order` [..., L] int holds the step at which each
generated position was unmasked (`sampling.Decoded.order` restricted to the generated
positions; -1 = never unmasked). Positions committed in the same step are taken left
to right, and steps that commit nothing are skipped, so an order is read as the
sequence s_1, s_2, ... of positions in decoding order. The prompt counts as decoded
before everything, left to right: position -1 (its last token) precedes s_1.

  local AR-ness@k   the fraction of decoded positions p = s_i whose k predecessors in
                    decoding order are exactly p - 1, ..., p - k (k = 1: next-token
                    prediction). Predecessors run into the prompt: the first decoded
                    position counts iff it is position 0, the i-th iff s_1..s_i = 0..i-1.
  global AR-ness@k  the fraction of decoded positions that are among the k left-most
                    positions still masked when decoded (never-unmasked positions stay
                    masked).

Both are 1 for left-to-right decoding, and both count every decoded position (the
denominator is the number decoded). Right-to-left decoding of L positions gives local
AR-ness 0 and global AR-ness@k = k / L; a uniformly random order gives global
AR-ness@1 = H_L / L (the i-th decoded is the leftmost of L - i + 1 masked with
chance 1 / (L - i + 1)).

    local = local_ar_ness(order, range(1, 11))    # [..., 10] per sample
    mean, spread = mean_and_spread(local)          # over samples: [10] each
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- AR-ness


def _as_rows(order) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim < 1 or not np.issubdtype(order.dtype, np.integer):
        raise ValueError(f"order must be an integer array [..., L], got {order.dtype} "
                         f"{order.shape}")
    return order.reshape(-1, order.shape[-1])


def decoding_sequence(order) -> tuple[np.ndarray, np.ndarray]:
    """The positions in decoding order (ties left to right) and how many were decoded.
    order [..., L] -> (sequence [N, L] int: the first n[r] entries of row r are its
    decoded positions in order, then the never-unmasked ones; n [N] int), N = prod(...)."""
    rows = _as_rows(order)
    length = rows.shape[-1]
    key = np.where(rows >= 0, rows.astype(np.int64) * length + np.arange(length),
                   np.iinfo(np.int64).max)
    return np.argsort(key, axis=-1, kind="stable"), (rows >= 0).sum(-1)


def _local_runs(order) -> tuple[np.ndarray, np.ndarray]:
    """For the i-th decoded position s_i of each row: how many of its predecessors in
    decoding order are s_i - 1, s_i - 2, ... without a break (inf when the chain
    reaches the prompt). Returns (runs [N, L] float, decoded [N, L] bool)."""
    seq, n = decoding_sequence(order)
    length = seq.shape[-1]
    prev = np.concatenate([np.full((len(seq), 1), -1), seq[:, :-1]], axis=1)
    follows = seq == prev + 1                       # s_i = s_{i-1} + 1 (s_0 := -1)
    index = np.arange(length)
    last_break = np.maximum.accumulate(np.where(follows, -1, index), axis=-1)
    runs = np.where(last_break < 0, np.inf, index - last_break).astype(np.float64)
    return runs, index < n[:, None]


def _global_ranks(order) -> tuple[np.ndarray, np.ndarray]:
    """For every position p: how many positions left of p were still masked when p was
    decoded. Returns (ranks [N, L] int, decoded [N, L] bool)."""
    rows = _as_rows(order)
    seq, _ = decoding_sequence(rows)
    when = np.argsort(seq, axis=-1)                 # index of each position in the sequence
    left = np.tri(rows.shape[-1], k=-1, dtype=bool)  # [p, q]: q < p
    later = when[:, None, :] > when[:, :, None]     # [r, p, q]: q decoded after p (or never)
    return (later & left).sum(-1), rows >= 0


def _fraction(hit: np.ndarray, decoded: np.ndarray, shape) -> np.ndarray:
    """Per row: the fraction of decoded positions that hit; nan where none decoded."""
    count = decoded.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(count > 0, (hit & decoded).sum(-1) / count, np.nan)
    return frac.reshape(shape)


def _per_k(hits, decoded: np.ndarray, k, order_shape) -> np.ndarray:
    """Fractions for each k: hits(k) -> [N, L] bool. k an int -> [...]; a sequence of
    ints -> [..., len(k)]."""
    ks = np.atleast_1d(np.asarray(k))
    if ks.ndim != 1 or not np.issubdtype(ks.dtype, np.integer) or (ks < 1).any():
        raise ValueError(f"k must be a positive int or a sequence of them, got {k!r}")
    out = np.stack([_fraction(hits(kk), decoded, order_shape[:-1]) for kk in ks], -1)
    return out[..., 0] if np.ndim(k) == 0 else out


def local_ar_ness(order, k) -> np.ndarray:
    """Local AR-ness@k of each decoding (see the module docstring). order: [..., L] int;
    k: an int (-> [...]) or a sequence of ints (-> [..., len(k)]). nan where a row
    decoded nothing."""
    runs, decoded = _local_runs(order)
    return _per_k(lambda kk: runs >= kk, decoded, k, np.shape(order))


def global_ar_ness(order, k) -> np.ndarray:
    """Global AR-ness@k of each decoding (see the module docstring); shapes as
    local_ar_ness."""
    ranks, decoded = _global_ranks(order)
    return _per_k(lambda kk: ranks < kk, decoded, k, np.shape(order))


def random_order_global_ar_ness(length: int, k) -> np.ndarray:
    """Expected global AR-ness@k of a uniformly random order of `length` positions
    decoded one per step: the mean over m = 1..length masked of min(k, m) / m."""
    m = np.arange(1, length + 1)
    ks = np.atleast_1d(np.asarray(k))
    out = np.array([np.mean(np.minimum(kk, m) / m) for kk in ks])
    return out[0] if np.ndim(k) == 0 else out


def mean_and_spread(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over samples (the leading axes but the last; rows
    that decoded nothing, nan, are left out): [..., K] -> ([K], [K])."""
    flat = np.asarray(values, np.float64).reshape(-1, np.shape(values)[-1])
    with np.errstate(invalid="ignore"):
        return np.nanmean(flat, 0), np.nanstd(flat, 0)


def tokens_per_call(order, steps) -> np.ndarray:
    """Tokens committed per model call of each decoding: decoded positions / model
    calls. order [..., L] int, steps [...] int (`Decoded.steps`) -> [...] float."""
    decoded = (np.asarray(order) >= 0).sum(-1)
    steps = np.asarray(steps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, decoded / np.maximum(steps, 1), np.nan)


# ----------------------------------------------------------------------------- entropy sink

@functools.partial(jax.jit, static_argnames=("apply_fn", "mask_id", "length"))
def first_step_confidence(params, prompts, valid, *, apply_fn: Callable, mask_id: int,
                          length: int) -> dict:
    """The model's confidence at every position of a fully masked completion: one
    forward pass of each prompt followed by `length` mask tokens, as at the first
    decoding step. prompts, valid: [B, P] (left-padded; valid False on pads).

    Returns {"neg_entropy": [B, length] (Dream's measure, sum_v p log p), "top_logprob":
    [B, length] (LLaDA's: log p of the most probable token)}, float32, from the
    untempered distribution without the mask token (which is never proposed)."""
    b, p = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.full((b, length), mask_id, prompts.dtype)], 1)
    valid = jnp.concatenate([valid, jnp.ones((b, length), bool)], 1)
    logits = apply_fn(params, tokens, valid)[:, p:].astype(jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) == mask_id, -jnp.inf, logits)
    logp = jax.nn.log_softmax(logits, -1)
    plogp = jnp.where(jnp.isfinite(logp), jnp.exp(logp) * logp, 0.0)
    return {"neg_entropy": plogp.sum(-1), "top_logprob": logp.max(-1)}
