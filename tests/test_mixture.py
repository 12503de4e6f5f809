"""Tests for dllm/mixture.py: proportions within K of exact at every prefix, each
source's elements drawn in order, lengths of finite mixtures, the grain selection."""
import sys

import grain
import pytest

from dllm import mixture


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.78, 0.20, 0.06), (1, 1, 1, 5), (1,)])
def test_every_prefix_holds_each_source_in_proportion(weights):
    mix = mixture.Mixture([f"s{k}" for k in range(len(weights))], weights)
    total = sum(weights)
    seen = [0] * len(weights)
    for i in range(3000):
        k, j = mix.locate(i)
        assert j == seen[k]        # each source's elements come in order 0, 1, 2, ...
        seen[k] += 1
        assert mix.counts(i + 1) == seen
        # Within K of the exact share at every prefix, not just on average.
        assert all(abs(c - (i + 1) * w / total) < len(weights) for c, w in zip(seen, weights))


def test_realised_shares():
    mix = mixture.Mixture(["code", "math"], [0.7, 0.3])
    assert mix.realised(10_000) == {"code": 0.7, "math": 0.3}
    assert mix.realised(0) == pytest.approx({"code": 0.7, "math": 0.3})
    # math = floor(0.3 n) of the first n: its first draw is the 4th
    assert mix.realised(3) == {"code": 1.0, "math": 0.0}
    assert mix.realised(4) == {"code": 0.75, "math": 0.25}
    assert mix.realised(10) == {"code": 0.7, "math": 0.3}


def test_length_is_where_a_finite_source_runs_out():
    mix = mixture.Mixture(["a", "b"], [3, 1])
    assert mix.length([None, None]) == sys.maxsize
    n = mix.length([None, 10])
    assert mix.counts(n)[1] == 10 and mix.counts(n + 1)[1] == 11
    m = mix.length([31, None])
    assert mix.counts(m)[0] == 31 and mix.counts(m + 1)[0] == 32
    assert mix.length([31, 10]) == min(n, m) == 41


def test_selection_mixes_grain_datasets():
    mix = mixture.Mixture(["a", "b"], [2, 1])
    a, b = grain.MapDataset.range(100), grain.MapDataset.range(1000, 1100)
    ds = grain.MapDataset.select_from_datasets([a, b], mixture.Selection(mix, 9))
    assert list(ds) == [0, 1, 1000, 2, 3, 1001, 4, 5, 1002]


def test_bad_weights():
    with pytest.raises(ValueError, match="positive"):
        mixture.Mixture(["a", "b"], [1.0, 0.0])
    with pytest.raises(ValueError, match="one weight per source"):
        mixture.Mixture(["a"], [1.0, 2.0])
