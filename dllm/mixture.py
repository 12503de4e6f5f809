"""Deterministic weighted mixtures of random-access datasets.

Draw i of a mixture of K sources with integer proportions p_0..p_{K-1} (R = their
sum) comes from a fixed interleaving in which, among the first n draws, source k
supplies c_k(n) draws, computed by splitting off one source at a time:

    m_0 = n;   c_k = m_k - floor(m_k (R_k - p_k) / R_k);   m_{k+1} = m_k - c_k

with R_k = p_k + ... + p_{K-1}. Each c_k(n) rises by 0 or 1 per draw and is within K
of n p_k / R, so any window of draws holds each source in its proportion (70/30 over
10k draws: 7000 +- 2), with no randomness to average out. Draw i is the c_k(i)-th
element of the source k whose count rises between i and i + 1.

    mix = Mixture(("code", "math"), (0.7, 0.3))
    ds = grain.MapDataset.select_from_datasets([code, math], Selection(mix, len_))
    mix.realised(n)    # {"code": 0.7, "math": 0.3}: the shares of the first n draws
"""
from __future__ import annotations

import fractions
import math
import sys
from typing import Sequence

import grain

_MAX_DENOMINATOR = 10 ** 6   # a weight is read as the nearest fraction p/q, q <= 10^6


class Mixture:
    """Sources `names` drawn in proportion to `weights` (positive numbers)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float]):
        if len(names) != len(weights) or not names:
            raise ValueError(f"a mixture needs one weight per source, got {names} {weights}")
        bad = [n for n, w in zip(names, weights) if not w > 0]
        if bad:
            raise ValueError(f"mixture sources {bad}: weights must be positive, got {weights}")
        # Exact integer proportions: 0.7 : 0.3 is 7 : 3, so the interleaving repeats
        # every 10 draws and small prefixes hold the shares exactly.
        ratios = [fractions.Fraction(w).limit_denominator(_MAX_DENOMINATOR) for w in weights]
        scale = math.lcm(*(r.denominator for r in ratios))
        ints = [int(r * scale) for r in ratios]
        self.names = tuple(names)
        self.proportions = tuple(i // math.gcd(*ints) for i in ints)

    def _counts_pair(self, n: int) -> tuple[list[int], list[int]]:
        """(c(n), c(n + 1)): the draws of each source among the first n and n + 1."""
        remaining, m0, m1 = sum(self.proportions), n, n + 1
        c0, c1 = [], []
        for p in self.proportions:
            rest = remaining - p
            k0, k1 = m0 - m0 * rest // remaining, m1 - m1 * rest // remaining
            c0.append(k0)
            c1.append(k1)
            m0, m1, remaining = m0 - k0, m1 - k1, rest
        return c0, c1

    def counts(self, n: int) -> list[int]:
        """How many of the first n draws come from each source."""
        return self._counts_pair(n)[0]

    def realised(self, n: int) -> dict[str, float]:
        """{source name: share of the first n draws} (the configured shares at n = 0)."""
        if n <= 0:
            total = sum(self.proportions)
            return {name: p / total for name, p in zip(self.names, self.proportions)}
        return {name: c / n for name, c in zip(self.names, self.counts(n))}

    def locate(self, i: int) -> tuple[int, int]:
        """(source k, index within source k) of draw i."""
        before, after = self._counts_pair(i)
        k = next(k for k, (a, b) in enumerate(zip(before, after)) if a != b)
        return k, before[k]

    def length(self, available: Sequence[int | None]) -> int:
        """The number of draws before a source with `available[k]` elements (None:
        unlimited) would run out; sys.maxsize when none can."""
        limits = [self._last_draw(k, a) for k, a in enumerate(available) if a is not None]
        return min(limits, default=sys.maxsize)

    def _last_draw(self, k: int, available: int) -> int:
        """The largest n with c_k(n) <= available (c_k rises by at most 1 per draw)."""
        lo, hi = available, 2 * available + 2
        while self.counts(hi)[k] <= available:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:            # c_k(lo) <= available < c_k(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.counts(mid)[k] <= available else (lo, mid)
        return lo


class Selection(grain.transforms.DatasetSelectionMap):
    """The grain selection map of a mixture: draw i -> (source, index in the source),
    for the first `length` draws."""

    def __init__(self, mixture: Mixture, length: int):
        self._mixture, self._length = mixture, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self._mixture.locate(index)
