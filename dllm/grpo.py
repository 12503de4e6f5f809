"""Coupled-GRPO (DiffuCoder): GRPO for a masked diffusion model.

A diffusion model has no closed-form token log-probabilities; they are estimated
from forward passes with the completion (partly) masked. The estimators (selected
by `GrpoConfig.estimator`) give a value per completion token:

  coupled    lambda complementary pairs: per pair one t ~ U(t_min, t_max) shared by
             the batch and a random matrix r over the completion; pass A masks the
             tokens with r < t (log-prob weighted 1/t), pass B those with r >= t
             (weighted 1/(1-t)), so each token is scored exactly once per pair in a
             partly masked context. Value = mean over pairs of that per-token term.
  decoupled  as many passes (2 lambda), each with its own t and independent mask
             (weighted 1/t); a token may be scored 0, 1 or several times.
  full_mask  one pass with the whole completion masked (weight 1).
  d1         full_mask plus each prompt token masked with probability
             `prompt_mask_prob` (d1 / diffu-GRPO).
With `full_pass` (the released code's behaviour), coupled and decoupled also run
the fully masked pass and average it in: value = (full + pairs) / 2. The prompt is
never masked except by d1; log-softmax is taken in float32, and the model sees the
padding mask (`valid`).

A rollout batch (what the loss reads); B rows, P prompt and N completion positions:
  tokens      int32 [B, P + N]  the left-padded prompt, then the sampled completion
  valid       bool [B, P + N]   False on the prompt's left padding
  loss_mask   bool [B, N]       completion tokens up to and including the first
                                end-of-turn token (<|im_end|>)
  advantages  float32 [B]
  old_logp    float32 [B, N]    estimator values under the rollout policy (iterations > 1)
  ref_logp    float32 [B, N]    ... under the reference policy (beta > 0)
  mask_seed   int32 [B]         the inner iteration's mask seed (the same in every row)
  row         int32 [B]         the row's index in the rollout batch
A row's masks depend only on (mask_seed, row), so the old, reference and current
policy see the same masks however the batch is split into micro-batches or shards.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dllm import elbo

Array = jax.Array

ESTIMATORS = ("coupled", "decoupled", "full_mask", "d1")
ADVANTAGES = ("loo", "mean")


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    # Log-prob estimator: coupled | decoupled | full_mask | d1 (see the module docstring).
    estimator: str = "coupled"
    pairs: int = 1                  # lambda: complementary pairs (decoupled: 2 * pairs passes)
    # coupled / decoupled: average in the fully masked pass. True: the released code
    # (3 forwards per pair); False: the paper's text (2 forwards per pair).
    full_pass: bool = True
    t_min: float = 0.2              # mask rates t ~ U(t_min, t_max)
    t_max: float = 0.8
    prompt_mask_prob: float = 0.15  # d1 only
    generations: int = 10           # G completions per prompt (one group)
    iterations: int = 2             # mu: updates per rollout batch, each with fresh masks
    advantage: str = "loo"          # loo (leave-one-out, released code) | mean (group mean)
    scale_std: bool = False         # divide advantages by the group's std (+ 1e-4)
    eps_low: float = 0.5            # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.5
    beta: float = 0.01              # weight of the k3 KL to the reference policy; 0 = none
    ref_mix_alpha: float = 0.6      # ref <- (1 - alpha) ref + alpha theta ...
    ref_mix_every: int = 64         # ... every this many optimizer steps; 0 = never

    def __post_init__(self):
        for key, allowed in (("estimator", ESTIMATORS), ("advantage", ADVANTAGES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"grpo.{key}={getattr(self, key)!r}; allowed: {allowed}")
        if not 0.0 < self.t_min <= self.t_max < 1.0:
            raise ValueError(f"grpo.t_min={self.t_min}, grpo.t_max={self.t_max}: "
                             "need 0 < t_min <= t_max < 1")
        if self.pairs < 1 or self.iterations < 1 or self.generations < 2:
            raise ValueError("grpo.pairs and grpo.iterations must be >= 1 and "
                             "grpo.generations >= 2")

    @property
    def passes(self) -> int:
        """Forward passes per estimate (per row)."""
        if self.estimator in ("full_mask", "d1"):
            return 1
        return 2 * self.pairs + int(self.full_pass)


def grpo_config_from_dict(d) -> GrpoConfig:
    """GrpoConfig from the GrpoConfig fields of a dict / ConfigDict (other keys of
    `config.grpo`, the rollout settings, are skipped)."""
    fields = {f.name for f in dataclasses.fields(GrpoConfig)}
    return GrpoConfig(**{k: v for k, v in dict(d).items() if k in fields})


# ----------------------------------------------------------------------------- masks

def _row_uniform(key: Array, rows: Array, width: int) -> Array:
    """[B, width] uniforms, row b drawn from fold_in(key, rows[b]): a row's draws do
    not depend on which other rows share its batch."""
    return jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(key, r), (width,)))(rows)


def estimator_masks(key: Array, rows: Array, prompt_valid: Array, n: int, cfg: GrpoConfig):
    """The masked passes of one estimate.

    key: the iteration's mask key; rows [B] int; prompt_valid [B, P] bool (the prompt's
    real tokens); n: completion length. Returns (masked_prompt [K, B, P] bool,
    masked_completion [K, B, N] bool, weights [K] float32); K = cfg.passes. The
    per-token value is sum_k weights[k] * masked_completion[k] * logp_k.
    """
    b, p = prompt_valid.shape
    full = jnp.ones((b, n), bool)
    no_prompt = jnp.zeros((b, p), bool)
    if cfg.estimator in ("full_mask", "d1"):
        prompt = no_prompt
        if cfg.estimator == "d1":
            prompt = prompt_valid & (_row_uniform(key, rows, p) < cfg.prompt_mask_prob)
        return prompt[None], full[None], jnp.ones((1,), jnp.float32)

    completion, weights = [], []
    for k in range(cfg.pairs if cfg.estimator == "coupled" else 2 * cfg.pairs):
        k_t, k_r = jax.random.split(jax.random.fold_in(key, k))
        t = jax.random.uniform(k_t, (), minval=cfg.t_min, maxval=cfg.t_max)
        r = _row_uniform(k_r, rows, n)
        if cfg.estimator == "coupled":
            completion += [r < t, r >= t]
            weights += [1.0 / t, 1.0 / (1.0 - t)]
        else:
            completion.append(r < t)
            weights.append(1.0 / t)
    weights = jnp.stack(weights) / cfg.pairs
    completion = jnp.stack(completion)
    if cfg.full_pass:
        completion = jnp.concatenate([full[None], completion])
        weights = 0.5 * jnp.concatenate([jnp.ones((1,)), weights])
    prompt = jnp.broadcast_to(no_prompt, (len(weights), b, p))
    return prompt, completion, weights.astype(jnp.float32)


def mask_key(seed: Array) -> Array:
    """The PRNG key of a mask seed (an int32 scalar, possibly traced)."""
    return jax.random.fold_in(jax.random.PRNGKey(0), seed)


# ----------------------------------------------------------------------------- estimates

def token_logps(params, batch, *, apply_fn, cfg: GrpoConfig, mask_id: int) -> Array:
    """The estimator's per-token log-probability values [B, N] float32 of the
    completion (see the module docstring for `batch`; reads tokens, valid, row,
    mask_seed). All passes run as one forward of K * B rows."""
    tokens, valid = batch["tokens"], batch["valid"]
    b, s = tokens.shape
    n = batch["loss_mask"].shape[1]
    p = s - n
    masked_prompt, masked_completion, weights = estimator_masks(
        mask_key(batch["mask_seed"][0]), batch["row"], valid[:, :p], n, cfg)
    k = len(weights)
    masked = jnp.concatenate([masked_prompt, masked_completion], axis=-1)   # [K, B, S]
    noisy = jnp.where(masked, mask_id, tokens[None]).reshape(k * b, s)
    logits = apply_fn(params, noisy, jnp.tile(valid, (k, 1)))             # [K*B, S, V]
    logp = -elbo.token_nll(logits[:, p:], jnp.tile(tokens[:, p:], (k, 1)))  # float32
    logp = logp.reshape(k, b, n)
    return jnp.einsum("k,kbn->bn", weights, jnp.where(masked_completion, logp, 0.0))


def policy_loss(logp: Array, old_logp: Array, ref_logp: Array | None, advantages: Array,
                loss_mask: Array, cfg: GrpoConfig):
    """The clipped-ratio objective with a k3 KL penalty, as a token mean.

    logp, old_logp, ref_logp: [B, N] estimator values (ref_logp None when beta = 0);
    advantages [B]; loss_mask [B, N] bool. Per token:
      -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta (exp(d) - d - 1),
    rho = exp(logp - old_logp), d = ref_logp - logp; averaged over loss_mask.
    Returns (loss, metrics dict of scalars)."""
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    mask = loss_mask.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    mean = lambda x: (x * mask).sum() / count
    metrics = {}
    if cfg.beta:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = mean(kl)
    low = (ratio < 1.0 - cfg.eps_low) & (adv < 0)
    high = (ratio > 1.0 + cfg.eps_high) & (adv > 0)
    loss = mean(per_token)
    metrics.update(loss=loss, ratio=mean(ratio), clip_low=mean(low), clip_high=mean(high),
                   clip_fraction=mean(low | high))
    return loss, metrics


def grpo_loss(params, batch, rng, step, *, apply_fn, cfg: GrpoConfig, mask_id: int):
    """The stage's loss_fn(params, batch, rng, step) -> (loss, metrics). Its randomness
    is the batch's mask seed, not `rng`. With one iteration per rollout the old
    policy is the current one (ratio 1, no rollout-time pass needed)."""
    del rng, step
    logp = token_logps(params, batch, apply_fn=apply_fn, cfg=cfg, mask_id=mask_id)
    old = batch["old_logp"] if cfg.iterations > 1 else jax.lax.stop_gradient(logp)
    ref = batch["ref_logp"] if cfg.beta else None
    return policy_loss(logp, old, ref, batch["advantages"], batch["loss_mask"], cfg)


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: np.ndarray, group_size: int, kind: str = "loo",
                     scale_std: bool = False) -> np.ndarray:
    """Advantages [B * G] float32 of rewards [B * G] whose groups (a prompt's G
    completions) are consecutive rows.

    loo:  A_i = r_i - (sum_j r_j - r_i) / (G - 1)   (= G / (G - 1) (r_i - mean r))
    mean: A_i = r_i - mean r
    scale_std: divided by the group's standard deviation (ddof 1) + 1e-4.
    A group whose rewards are all equal gets exactly zero."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or len(r) % group_size or group_size < 2:
        raise ValueError(f"rewards of shape {r.shape} do not split into groups of "
                         f"{group_size} (>= 2) completions")
    g = r.reshape(-1, group_size)
    total = g.sum(1, keepdims=True)
    if kind == "loo":
        adv = g - (total - g) / (group_size - 1)
    elif kind == "mean":
        adv = g - total / group_size
    else:
        raise ValueError(f"advantage kind {kind!r}; allowed: {ADVANTAGES}")
    if scale_std:
        adv = adv / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    adv = np.where((g == g[:, :1]).all(1, keepdims=True), 0.0, adv)
    return adv.reshape(-1).astype(np.float32)


def loss_mask(completion: np.ndarray, end_id: int) -> np.ndarray:
    """[B, N] bool: completion tokens up to and including the first `end_id` (the
    whole completion when it has none)."""
    completion = np.asarray(completion)
    is_end = completion == end_id
    first = np.where(is_end.any(1), is_end.argmax(1), completion.shape[1])
    return np.arange(completion.shape[1])[None] <= first[:, None]


# ----------------------------------------------------------------------------- reference

def mix_reference(ref, params, step: Array, alpha: float, every: int):
    """ref <- (1 - alpha) ref + alpha params when `step` (optimizer steps taken) is a
    multiple of `every` (TRL's ref_model_sync: a soft mix); ref unchanged otherwise
    or when every = 0."""
    if every <= 0:
        return ref
    mix = lambda: jax.tree.map(lambda r, p: ((1 - alpha) * r + alpha * p).astype(r.dtype),
                               ref, params)
    return jax.lax.cond(step % every == 0, mix, lambda: ref)
