"""Masking schedules and time samplers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import schedules

NAMES = ["linear", "cosine", "polynomial", "loglinear"]


@pytest.mark.parametrize("name", NAMES)
def test_alpha_endpoints_and_monotone(name):
    s = schedules.get_schedule(name)
    assert float(s.alpha(jnp.array(0.0))) == pytest.approx(1.0)
    assert float(s.alpha(jnp.array(1.0))) == pytest.approx(0.0, abs=1.1e-3)
    t = jnp.linspace(0.0, 1.0, 201)
    assert bool(jnp.all(jnp.diff(s.alpha(t)) < 0))


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(name):
    s = schedules.get_schedule(name)
    t = np.linspace(0.05, 0.95, 19)
    h = 1e-3  # float32: central differences are accurate to ~1e-4 relative here
    alpha = lambda x: np.asarray(s.alpha(jnp.asarray(x, jnp.float32)), np.float64)
    d_alpha = (alpha(t + h) - alpha(t - h)) / (2 * h)
    expected = -d_alpha / (1.0 - alpha(t))
    np.testing.assert_allclose(np.asarray(s.weight(jnp.asarray(t))), expected, rtol=2e-3)


def np_weight(name, t):
    """-alpha'(t) / (1 - alpha(t)) in float64 from each alpha's derivative; the cosine's
    1 - cos x summed as its Taylor series (no cancellation at small x)."""
    if name == "cosine":
        x = np.pi * t / 2
        one_minus_cos = sum((-1) ** (k + 1) * x ** (2 * k) / math.factorial(2 * k)
                            for k in range(1, 15))
        return np.pi / 2 * np.sin(x) / one_minus_cos
    if name == "polynomial":  # alpha = 1 - t^2
        return 2 * t / t ** 2
    if name == "loglinear":   # alpha = 1 - (1 - eps) t
        return (1 - 1e-3) / ((1 - 1e-3) * t)
    return 1 / t


@pytest.mark.parametrize("name", NAMES)
def test_weight_is_finite_and_accurate_in_float32_down_to_t_1e_6(name):
    t32 = np.geomspace(1e-6, 1.0, 61).astype(np.float32)
    got = np.asarray(schedules.get_schedule(name).weight(jnp.asarray(t32)))
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_allclose(got, np_weight(name, t32.astype(np.float64)), rtol=1e-5)


def test_linear_weight_is_one_over_t():
    t = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(schedules.get_schedule("linear").weight(t), 1 / t, rtol=1e-6)


def test_antithetic_times_cover_the_interval_evenly():
    b = 64
    t = np.sort(np.asarray(schedules.sample_times(jax.random.key(3), b, eps=0.0)))
    assert t.min() >= 0 and t.max() < 1
    np.testing.assert_allclose(np.diff(t), 1 / b, atol=1e-5)   # one sample per 1/b bin
    counts, _ = np.histogram(t, bins=b, range=(0, 1))
    assert np.all(counts == 1)


def test_time_floor():
    t = schedules.sample_times(jax.random.key(0), 1000, eps=0.01, antithetic=False)
    assert float(t.min()) >= 0.01 and float(t.max()) < 1.0


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="linear, cosine"):
        schedules.get_schedule("sqrt")
