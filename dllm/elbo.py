"""Forward masking and the ELBO losses of the three training stages, and the stage
(`make_stage`) that trains them in the one skeleton (`dllm.train`).

A batch is a dict of [B, S] arrays:
  tokens       int32, always
  prompt_mask  bool, optional (SFT): True on the prompt, which is never masked
  pad_mask     bool, optional (SFT): True on the response padding
  valid        bool, optional: False on positions that take no part at all (the left
               padding of SFT rows in the rollout layout, data.sft_response_len)
Each token that may be noised is replaced by the mask token with probability
1 - alpha(t) (one t per sequence); the loss is the cross-entropy on the masked
positions weighted by w(t) = -alpha'(t) / (1 - alpha(t)), summed and divided by the
number of loss-bearing tokens: an unbiased estimate of the NELBO per token (or, with
`normalize="sequence"`, each sequence's sum by its own count, then the batch mean).
A token may be noised only if the position left of it is a valid token: under the
Dream logits shift its prediction is that position's output, so column 0 (and the
first real token of a left-padded row) is never noised (DiffuLLaMA drops it from
the loss; DiffuCoder's BOS is always clean).

`apply_fn(params, tokens, valid, lookahead, targets=targets) -> (nll [B, S] float32,
argmax [B, S] int)` is the model scoring the clean tokens (`model.model_apply`: the
output head's chunked cross-entropy, no [B, S, V] logits); `from_logits` adapts a
function that returns logits [B, S, V].
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from dllm import data, model as model_lib, schedules, sharding
from dllm.stage import BatchSource, Stage, StageContext

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
    # How the annealed attention opens: random (DiffuLLaMA: at step n each key right of
    # the query is opened with probability min(1, (n + 1) / anneal_steps), one fresh
    # [S, S] draw per step shared by the batch) | band (query i sees keys
    # j <= i + floor(S * min(1, n / anneal_steps)))
    anneal: str = "random"
    # tokens: the batch's weighted sum / its noisable tokens | sequence (LLaDA's SFT): each
    # sequence's weighted sum / its own noisable (answer) tokens, then the mean over the batch
    normalize: str = "tokens"

    def __post_init__(self):
        for key, allowed in (("schedule", schedules.NAMES), ("anneal", ("random", "band")),
                             ("normalize", ("tokens", "sequence"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"loss.{key}={getattr(self, key)!r}; allowed: {allowed}")


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
    attention; noisable tokens may be masked and carry the loss. A noisable token
    has a valid left neighbour, whose output predicts it (column 0 never noised)."""
    tokens = batch["tokens"]
    valid, clean = _stage1_masks(rng, tokens.shape, cfg)
    if "valid" in batch:
        valid = valid & batch["valid"]
    if "prompt_mask" in batch:
        clean = clean | batch["prompt_mask"]
    if "pad_mask" in batch and not cfg.train_on_pad:
        valid = valid & ~batch["pad_mask"]
    left_valid = jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))  # False in column 0
    return valid, valid & left_valid & ~clean


def attention_valid(batch, valid: Array, cfg: ElboConfig) -> Array | None:
    """What the model gets as `valid`: None when no token of the batch can be
    invalid (no truncation, no `valid` key, no padding left out), so attention
    paths that run faster unmasked (cuDNN) know it statically; else `valid`."""
    padded = "pad_mask" in batch and not cfg.train_on_pad
    return valid if cfg.truncate_prob > 0 or "valid" in batch or padded else None


def lookahead_at(rng: Array, step, seq_len: int, cfg: ElboConfig):
    """Attention-mask annealing from causal to full over `anneal_steps` (Stage 1 from
    an AR checkpoint); the model's `lookahead` at training step `step` (0-based).
    random: a [S, S] bool of allowed (query, key) pairs, the causal part always open
    and each pair above the diagonal open with probability min(1, (step + 1) /
    anneal_steps) (DiffuLLaMA); band: query i sees keys j <= i + floor(S * frac),
    frac = min(1, step / anneal_steps). "default" (the model's own setting) when off."""
    if cfg.anneal_steps <= 0:
        return "default"
    if cfg.anneal == "band":
        frac = jnp.minimum(step / cfg.anneal_steps, 1.0)
        return jnp.floor(frac * seq_len).astype(jnp.int32)
    ratio = jnp.minimum(1.0, (step + 1) / cfg.anneal_steps)
    causal = jnp.arange(seq_len)[None, :] <= jnp.arange(seq_len)[:, None]
    return causal | (jax.random.uniform(rng, (seq_len, seq_len)) < ratio)


def elbo_loss(params, batch, rng: Array, *, apply_fn, cfg: ElboConfig, mask_id: int, step=0):
    """One-sample ELBO loss for a batch. Returns (loss, metrics dict of scalars)."""
    tokens = batch["tokens"]
    schedule = schedules.get_schedule(cfg.schedule, cfg.exponent)
    r_aug, r_t, r_mask, r_attn = jax.random.split(rng, 4)
    valid, noisable = loss_masks(batch, r_aug, cfg)
    t = schedules.sample_times(r_t, tokens.shape[0], cfg.time_eps, cfg.antithetic)
    noisy, masked = corrupt(r_mask, tokens, t, noisable, schedule.alpha, mask_id)
    nll, predicted = apply_fn(params, noisy, attention_valid(batch, valid, cfg),
                              lookahead_at(r_attn, step, tokens.shape[1], cfg), targets=tokens)

    n_masked = jnp.maximum(masked.sum(), 1)
    weighted = jnp.where(masked, nll * schedule.weight(t)[:, None], 0.0)
    if cfg.normalize == "sequence":
        loss = jnp.mean(weighted.sum(-1) / jnp.maximum(noisable.sum(-1), 1))
    else:
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


# ----------------------------------------------------------------------------- the stage

def stage_loss(loss_cfg, apply_fn, mask_id: int):
    """The ELBO loss of `config.loss` as loss_fn(params, batch, rng, step)."""
    cfg = elbo_config_from_dict(loss_cfg)
    def loss_fn(params, batch, rng, step):
        return elbo_loss(params, batch, rng, apply_fn=apply_fn, cfg=cfg, mask_id=mask_id,
                         step=step)
    return loss_fn


class DatasetBatches(BatchSource):
    """A grain dataset's batches (they do not depend on the state). With a mixture of
    several sources, each source's realised share of the examples drawn so far is
    logged as `data/<source>`."""

    def __init__(self, dataset, mixture, global_batch: int):
        self.iterator = iter(dataset)
        self.mixture, self.global_batch = mixture, global_batch

    def next(self, state) -> dict:
        del state
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    def metrics(self, step: int) -> dict:
        if len(self.mixture.names) < 2:
            return {}
        shares = self.mixture.realised(step * self.global_batch)
        return {f"data/{name}": share for name, share in shares.items()}


def held_out_nelbo(eval_fn, params, dataset, mesh, rng: Array, max_batches: int) -> float:
    """Held-out NELBO per token (nats) over at most `max_batches` batches."""
    total, count = 0.0, 0
    for i, batch in enumerate(dataset):
        if i >= max_batches:
            break
        nll, n = eval_fn(params, sharding.global_batch(batch, mesh), jax.random.fold_in(rng, i))
        total += float(jnp.sum(nll))
        count += int(jnp.sum(n))
    return total / max(count, 1)


def make_stage(ctx: StageContext) -> Stage:
    """Pretraining, mid-training or SFT (the data source decides): the ELBO loss on
    `config.data` batches; evaluation = held-out NELBO per token (`eval_nelbo`)."""
    config = ctx.config
    make_ds = functools.partial(data.make_dataset, config.data, ctx.tokenizer,
                                batch_size=ctx.local_batch_size, seed=config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    batches = DatasetBatches(make_ds(split="train"), data.mixture(config.data),
                             config.train.batch_size)
    evaluate = None
    if config.train.eval_every:
        # Built now so that an unusable eval split fails before training, not after it.
        eval_ds = make_ds(split="eval")
        eval_fn = jax.jit(functools.partial(
            nelbo, apply_fn=ctx.apply_fn, mask_id=ctx.tokenizer.mask_id,
            cfg=elbo_config_from_dict(config.loss), num_samples=config.train.eval_samples))

        def evaluate(state):
            return {"eval_nelbo": held_out_nelbo(eval_fn, state.params, eval_ds, ctx.mesh,
                                                 jax.random.PRNGKey(config.seed + 1),
                                                 config.train.eval_batches)}
    tokens_per_step = config.train.batch_size * config.data.seq_len
    flops = model_lib.flops_per_token(ctx.model_cfg, config.data.seq_len) * tokens_per_step
    return Stage(loss_fn=stage_loss(config.loss, ctx.apply_fn, ctx.tokenizer.mask_id),
                 batches=batches, evaluate=evaluate, tokens_per_step=tokens_per_step,
                 flops_per_step=flops)
