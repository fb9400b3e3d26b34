"""Paired comparisons over seeds: is schedule A better than schedule B, or is it noise?

Both schedules are scored on the same K seeds (the same x_T per seed), so the per-seed differences
cancel most of the noise. The report gives their mean, a two-sided Student-t confidence interval and
a verdict; every metric here is "lower is better".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BETTER, WORSE, TIE = "better", "worse", "no significant difference"


@dataclass(frozen=True)
class PairedDifference:
    """A − B per seed, with the mean difference and its confidence interval."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    mean: float
    low: float
    high: float
    confidence: float

    @property
    def verdict(self) -> str:
        """A is "better" when the whole interval lies below zero, "worse" when above, else a tie."""
        if self.high < 0:
            return BETTER
        if self.low > 0:
            return WORSE
        return TIE

    @property
    def mean_a(self) -> float:
        return float(np.mean(self.a))

    @property
    def mean_b(self) -> float:
        return float(np.mean(self.b))

    def to_dict(self) -> dict:
        plain = lambda v: v if math.isfinite(v) else None
        return {
            "a": [plain(v) for v in self.a],
            "b": [plain(v) for v in self.b],
            "mean_difference": plain(self.mean),
            "ci_low": plain(self.low),
            "ci_high": plain(self.high),
            "confidence": self.confidence,
            "verdict": self.verdict,
        }


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """Mean of a − b over paired seeds and its Student-t interval (K − 1 degrees of freedom).

    One seed gives no interval (an infinite one: never significant). A diverged score (inf) on one side
    only is decisive: the interval is (±inf, ±inf) on that side.
    """
    a, b = tuple(float(v) for v in a), tuple(float(v) for v in b)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must have the same, positive length; got {len(a)} and {len(b)}")
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    a_diverged, b_diverged = not all(map(math.isfinite, a)), not all(map(math.isfinite, b))
    if a_diverged != b_diverged:
        side = math.inf if a_diverged else -math.inf
        return PairedDifference(a, b, side, side, side, confidence)
    if a_diverged:
        return PairedDifference(a, b, math.nan, -math.inf, math.inf, confidence)
    differences = np.subtract(a, b)
    mean = float(differences.mean())
    if len(differences) < 2:
        return PairedDifference(a, b, mean, -math.inf, math.inf, confidence)
    half_width = float(
        stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * differences.std(ddof=1) / math.sqrt(len(differences))
    )
    return PairedDifference(a, b, mean, mean - half_width, mean + half_width, confidence)


def excess_ratio(searched: float, baseline: float, floor: float) -> float:
    """(searched − floor) / (baseline − floor): the share of the baseline's excess over the converged
    solution that the searched schedule leaves; 0.5 removes half of it. NaN when the baseline is at the floor."""
    excess = baseline - floor
    return (searched - floor) / excess if excess > 0 else math.nan
