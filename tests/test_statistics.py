"""Paired comparisons: the interval is the textbook Student-t one and the verdict follows it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from solversearch.statistics import BETTER, TIE, WORSE, excess_ratio, paired_difference


def test_the_interval_is_the_student_t_interval_of_the_differences():
    """Differences 1, 2, 3, 4, 5: mean 3, sample sd √2.5, t(0.975, 4) = 2.7764451 (printed tables)."""
    a = [11.0, 12.0, 13.0, 14.0, 15.0]
    b = [10.0] * 5
    result = paired_difference(a, b)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert result.mean == pytest.approx(3.0)
    assert (result.low, result.high) == pytest.approx((3.0 - half, 3.0 + half), rel=1e-7)
    assert result.verdict == WORSE
    assert paired_difference(b, a).verdict == BETTER


def test_pairing_removes_the_shared_seed_noise():
    """A constant offset under large seed-to-seed noise is significant when paired."""
    noise = np.random.default_rng(0).normal(0.0, 10.0, 5)
    result = paired_difference(noise - 0.1, noise + np.array([0.0, 0.01, -0.01, 0.02, -0.02]))
    assert result.verdict == BETTER and result.high < 0


def test_an_interval_that_contains_zero_is_a_tie():
    result = paired_difference([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])
    assert result.low < 0 < result.high and result.verdict == TIE


def test_one_seed_is_never_significant():
    result = paired_difference([1.0], [5.0])
    assert result.mean == -4.0 and result.verdict == TIE


def test_a_diverged_side_decides():
    assert paired_difference([math.inf, 1.0], [1.0, 1.0]).verdict == WORSE
    assert paired_difference([1.0, 1.0], [1.0, math.inf]).verdict == BETTER
    assert paired_difference([math.inf], [math.inf]).verdict == TIE


def test_the_record_is_plain_json():
    record = paired_difference([1.0, 2.0], [1.5, math.inf]).to_dict()
    assert record["b"] == [1.5, None] and record["verdict"] == BETTER


def test_excess_ratio():
    assert excess_ratio(0.3, 0.5, 0.1) == pytest.approx(0.5)
    assert math.isnan(excess_ratio(0.3, 0.1, 0.1))


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])
