"""Forward masking and the ELBO losses of the three training stages.

A batch is a dict of [B, S] arrays:
  tokens       int32, always
  prompt_mask  bool, optional (SFT): True on the prompt, which is never masked
  pad_mask     bool, optional (SFT): True on the response padding
Each token that may be noised is replaced by the mask token with probability
1 - alpha(t) (one t per sequence); the loss is the cross-entropy on the masked
positions weighted by w(t) = -alpha'(t) / (1 - alpha(t)), summed and divided by the
number of loss-bearing tokens: an unbiased estimate of the NELBO per token.

`apply_fn(params, tokens, valid, lookahead, targets=targets) -> (nll [B, S] float32,
argmax [B, S] int)` is the model scoring the clean tokens (`train.model_apply`: the
output head's chunked cross-entropy, no [B, S, V] logits); `from_logits` adapts a
function that returns logits [B, S, V].
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dllm import schedules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ElboConfig:
    schedule: str = "linear"      # linear | cosine | polynomial | loglinear
    exponent: float = 2.0         # polynomial schedule's n
    time_eps: float = 1e-3        # times are drawn from [time_eps, 1)
    antithetic: bool = True       # low-discrepancy times across the batch
    train_on_pad: bool = True     # SFT: False = "flexible padding" (pads take no part)
    truncate_prob: float = 0.0    # Stage 1: share of batches cut to a random length
    prefix_prob: float = 0.0      # Stage 1: share of batches with a random clean prefix
    anneal_steps: int = 0         # Stage 1: attention causal -> full over N steps; 0 = off


def elbo_config_from_dict(d) -> ElboConfig:
    fields = {f.name for f in dataclasses.fields(ElboConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise KeyError(f"unknown loss config key(s) {unknown}; allowed: {sorted(fields)}")
    return ElboConfig(**dict(d))


def corrupt(rng: Array, tokens: Array, t: Array, noisable: Array, alpha, mask_id: int):
    """Mask each noisable token independently with probability 1 - alpha(t).
    tokens: [B, S]; t: [B]; noisable: [B, S] bool. Returns (noisy [B, S], masked [B, S])."""
    p_mask = 1.0 - alpha(t)[:, None]
    masked = (jax.random.uniform(rng, tokens.shape) < p_mask) & noisable
    return jnp.where(masked, mask_id, tokens), masked


def token_nll(logits: Array, targets: Array) -> Array:
    """[B, S] cross-entropy in nats (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def from_logits(logits_fn):
    """apply_fn in the scoring form above from logits_fn(params, tokens, valid,
    lookahead) -> logits [B, S, V] (the plain path: the logits exist whole)."""
    def apply_fn(params, tokens, valid, lookahead, targets):
        logits = logits_fn(params, tokens, valid, lookahead)
        return token_nll(logits, targets), jnp.argmax(logits, -1)
    return apply_fn


def _stage1_masks(rng: Array, shape, cfg: ElboConfig):
    """Per-batch Stage-1 augmentations as masks over [B, S]:
    valid (False past a random truncation length) and clean (True on a random
    unnoised prefix). Each is applied to the whole batch with its probability."""
    b, s = shape
    r_trunc, r_len, r_pre, r_plen = jax.random.split(rng, 4)
    pos = jnp.arange(s)[None, :]
    length = jnp.where(jax.random.uniform(r_trunc) < cfg.truncate_prob,
                       jax.random.randint(r_len, (), 1, s + 1), s)
    prefix = jnp.where(jax.random.uniform(r_pre) < cfg.prefix_prob,
                       jax.random.randint(r_plen, (), 1, s), 0)
    valid = jnp.broadcast_to(pos < length, (b, s))
    clean = jnp.broadcast_to(pos < prefix, (b, s))
    return valid, clean


def loss_masks(batch, rng: Array, cfg: ElboConfig):
    """(valid, noisable) [B, S] bool for a batch: valid tokens take part in
    attention; noisable tokens may be masked and carry the loss."""
    tokens = batch["tokens"]
    valid, clean = _stage1_masks(rng, tokens.shape, cfg)
    if "prompt_mask" in batch:
        clean = clean | batch["prompt_mask"]
    if "pad_mask" in batch and not cfg.train_on_pad:
        valid = valid & ~batch["pad_mask"]
    return valid, valid & ~clean


def lookahead_at(step, seq_len: int, cfg: ElboConfig):
    """Attention-mask annealing (DiffuLLaMA-style, as a band): at step n query i
    sees keys j <= i + floor(seq_len * n / anneal_steps); causal at step 0, full
    from anneal_steps on. "default" (the model's own setting) when off."""
    if cfg.anneal_steps <= 0:
        return "default"
    frac = jnp.minimum(step / cfg.anneal_steps, 1.0)
    return jnp.floor(frac * seq_len).astype(jnp.int32)


def elbo_loss(params, batch, rng: Array, *, apply_fn, cfg: ElboConfig, mask_id: int, step=0):
    """One-sample ELBO loss for a batch. Returns (loss, metrics dict of scalars)."""
    tokens = batch["tokens"]
    schedule = schedules.get_schedule(cfg.schedule, cfg.exponent)
    r_aug, r_t, r_mask = jax.random.split(rng, 3)
    valid, noisable = loss_masks(batch, r_aug, cfg)
    t = schedules.sample_times(r_t, tokens.shape[0], cfg.time_eps, cfg.antithetic)
    noisy, masked = corrupt(r_mask, tokens, t, noisable, schedule.alpha, mask_id)
    nll, predicted = apply_fn(params, noisy, valid, lookahead_at(step, tokens.shape[1], cfg),
                              targets=tokens)

    n_masked = jnp.maximum(masked.sum(), 1)
    weighted = jnp.where(masked, nll * schedule.weight(t)[:, None], 0.0)
    loss = weighted.sum() / jnp.maximum(noisable.sum(), 1)
    correct = (predicted == tokens) & masked
    metrics = {
        "loss": loss,
        "accuracy": correct.sum() / n_masked,           # masked-token accuracy
        "masked_nll": jnp.where(masked, nll, 0.0).sum() / n_masked,
        "mask_rate": masked.sum() / jnp.maximum(noisable.sum(), 1),
    }
    return loss, metrics


def nelbo(params, batch, rng: Array, *, apply_fn, cfg: ElboConfig, mask_id: int,
          num_samples: int = 8):
    """Monte-Carlo NELBO (an upper bound on the negative log-likelihood) per sequence.

    Each sequence gets `num_samples` antithetic times t_k = (u + k/K) mod 1 (u drawn
    per sequence), so the K samples stratify [0, 1). No Stage-1 augmentation.
    Returns (nelbo [B] in nats summed over loss-bearing tokens, n_tokens [B])."""
    tokens = batch["tokens"]
    b = tokens.shape[0]
    schedule = schedules.get_schedule(cfg.schedule, cfg.exponent)
    valid, noisable = loss_masks(batch, rng, dataclasses.replace(
        cfg, truncate_prob=0.0, prefix_prob=0.0))
    r_u, r_masks = jax.random.split(rng)
    u = jax.random.uniform(r_u, (b,))

    def one_sample(total, k):
        t = cfg.time_eps + (1.0 - cfg.time_eps) * jnp.mod(u + k / num_samples, 1.0)
        noisy, masked = corrupt(jax.random.fold_in(r_masks, k), tokens, t, noisable,
                                schedule.alpha, mask_id)
        nll, _ = apply_fn(params, noisy, valid, "default", targets=tokens)
        per_seq = jnp.where(masked, nll, 0.0).sum(-1) * schedule.weight(t)
        return total + per_seq, None

    total, _ = jax.lax.scan(one_sample, jnp.zeros((b,)), jnp.arange(num_samples))
    return total / num_samples, noisable.sum(-1)
