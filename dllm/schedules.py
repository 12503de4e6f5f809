"""Masking schedules alpha(t), their ELBO weights, and diffusion-time samplers.

alpha(t) is the probability that a token is still unmasked at time t in [0, 1]:
alpha(0) = 1 (clean), alpha(1) = 0 (all masked). The continuous-time ELBO weights
the cross-entropy of each masked token by  w(t) = -alpha'(t) / (1 - alpha(t))
(1/t for the linear schedule). Time samplers return t in [eps, 1): the epsilon
floor keeps w(t) finite.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


NAMES = ("linear", "cosine", "polynomial", "loglinear")


class Schedule(NamedTuple):
    name: str
    alpha: Callable[[Array], Array]   # t -> P(token unmasked at time t)
    weight: Callable[[Array], Array]  # t -> -alpha'(t) / (1 - alpha(t))


def get_schedule(name: str, exponent: float = 2.0, loglinear_eps: float = 1e-3) -> Schedule:
    """name: linear | cosine | polynomial (alpha = 1 - t^exponent) | loglinear
    (MDLM: alpha = 1 - (1 - eps) t, i.e. sigma(t) = -log(1 - (1 - eps) t))."""
    half_pi = math.pi / 2
    if name == "linear":
        return Schedule(name, lambda t: 1.0 - t, lambda t: 1.0 / t)
    if name == "cosine":
        # (pi/2) sin(x) / (1 - cos x) with x = pi t / 2, as (pi/2) / tan(x / 2) (1 - cos x
        # = 2 sin^2(x/2)): no cancellation in float32 at small t.
        return Schedule(name, lambda t: jnp.cos(half_pi * t),
                        lambda t: half_pi / jnp.tan(half_pi * t / 2))
    if name == "polynomial":
        n = exponent
        return Schedule(name, lambda t: 1.0 - t ** n, lambda t: n / t)
    if name == "loglinear":
        e = loglinear_eps
        return Schedule(name, lambda t: 1.0 - (1.0 - e) * t, lambda t: 1.0 / t)
    raise ValueError(f"unknown masking schedule {name!r}; allowed: {', '.join(NAMES)}")


def sample_times(rng: Array, batch: int, eps: float = 1e-3, antithetic: bool = True) -> Array:
    """[batch] diffusion times in [eps, 1).

    antithetic: low-discrepancy t_i = (u + i / batch) mod 1 for one shared u, so a
    batch covers [0, 1) evenly (lower-variance ELBO gradients, as in VDM / md4);
    otherwise i.i.d. uniform. Then mapped affinely onto [eps, 1)."""
    if antithetic:
        u = jax.random.uniform(rng, ())
        t = jnp.mod(u + jnp.arange(batch) / batch, 1.0)
    else:
        t = jax.random.uniform(rng, (batch,))
    return eps + (1.0 - eps) * t
