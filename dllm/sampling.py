"""Diffusion decoding.

`generate` appends `max_new_tokens` mask tokens to the prompt and unmasks one
position per step, the most confident one (probability of its chosen token),
until none is left: the whole loop is one `lax.fori_loop` under `jax.jit`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy token choice


def sample_config_from_dict(d) -> SampleConfig:
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    known = {k: v for k, v in dict(d).items() if k in fields}
    return SampleConfig(**known)


def generate(params, prompts: Array, rng: Array, cfg: SampleConfig, *, apply_fn, mask_id: int,
             valid: Array | None = None):
    """prompts: [B, P] int (left-padded where `valid` [B, P] is False).
    Returns (tokens [B, P+N], order [B, P+N] int32: the step at which each position
    was unmasked, -1 for prompt positions)."""
    b, p = prompts.shape
    n = cfg.max_new_tokens
    tokens = jnp.concatenate([prompts, jnp.full((b, n), mask_id, prompts.dtype)], axis=1)
    if valid is None:
        valid = jnp.ones((b, p), bool)
    valid = jnp.concatenate([valid, jnp.ones((b, n), bool)], axis=1)
    order = jnp.full(tokens.shape, -1, jnp.int32)

    def step(i, carry):
        tokens, order = carry
        logits = apply_fn(params, tokens, valid)
        key = jax.random.fold_in(rng, i)
        if cfg.temperature > 0:
            choice = jax.random.categorical(key, logits / cfg.temperature)
        else:
            choice = jnp.argmax(logits, -1)
        probs = jax.nn.softmax(logits, -1)
        confidence = jnp.take_along_axis(probs, choice[..., None], -1)[..., 0]
        masked = tokens == mask_id
        pick = jnp.argmax(jnp.where(masked, confidence, -jnp.inf), axis=-1)     # [B]
        rows = jnp.arange(b)
        has_mask = masked.any(-1)
        tokens = tokens.at[rows, pick].set(jnp.where(has_mask, choice[rows, pick],
                                                     tokens[rows, pick]))
        order = order.at[rows, pick].set(jnp.where(has_mask, i, order[rows, pick]))
        return tokens, order

    return jax.lax.fori_loop(0, n, step, (tokens, order))
