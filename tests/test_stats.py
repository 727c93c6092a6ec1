"""The sampled-evaluation estimators of `grpo.stats`: pass@k against hand-computed values and
brute-force enumeration, the majority vote's tie rule, and the seeded bootstrap interval."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest

from grpo import stats


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # c / n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (5, 2, 4, 1.0),  # fewer than 4 wrong samples: every 4-subset holds a right one
        (10, 0, 5, 0.0),
        (10, 10, 1, 1.0),
        (8, 3, 2, 1 - 10 / 28),  # 1 - C(5,2)/C(8,2)
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert stats.pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_is_the_chance_a_random_k_subset_holds_a_correct_sample():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = Fraction(sum(any(s) for s in subsets), len(subsets))
                assert stats.pass_at_k(n, c, k) == pytest.approx(float(brute), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="need 0 <= c <= n"):
            stats.pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_over_questions():
    # questions with 0, 1, 2, 4 of 4 correct; pass@2 = 0, 1/2, 5/6, 1
    assert stats.mean_pass_at_k([0, 1, 2, 4], 4, 2) == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    assert stats.mean_pass_at_k([1, 3], 4, 1) == pytest.approx(0.5)  # pass@1 = mean accuracy


def test_majority_vote_abstentions_and_ties():
    assert stats.majority_vote(["7", "8", "8"]) == "8"
    assert stats.majority_vote(["7", "8"]) == "7"  # tie: the answer seen first
    assert stats.majority_vote(["8", "7", "7", "8"]) == "8"
    assert stats.majority_vote([None, None, "3"]) == "3"  # no answer is no vote
    assert stats.majority_vote([None, None]) is None
    assert stats.majority_vote([]) is None


def test_bootstrap_interval_is_seeded_and_brackets_the_mean():
    rng = random.Random(1)
    values = [float(rng.random() < 0.3) for _ in range(200)]
    mean = sum(values) / len(values)
    lo, hi = stats.bootstrap_interval(values, seed=0)
    assert stats.bootstrap_interval(values, seed=0) == (lo, hi)
    assert stats.bootstrap_interval(values, seed=1) != (lo, hi)
    assert lo < mean < hi
    # a proportion: close to the normal interval mean ± 1.96 sd / sqrt(n)
    half = 1.96 * (mean * (1 - mean) / len(values)) ** 0.5
    assert lo == pytest.approx(mean - half, abs=0.015)
    assert hi == pytest.approx(mean + half, abs=0.015)
    assert stats.bootstrap_interval([0.25]) == (0.25, 0.25)


def test_bootstrap_interval_of_a_proportion_matches_the_binomial_quantiles():
    # resampled means of 50 ones and 50 zeros are Binomial(100, 1/2) / 100: 2.5% and 97.5%
    # quantiles 40 and 60 (a 90% interval would be 42 and 58)
    lo, hi = stats.bootstrap_interval([0.0, 1.0] * 50, seed=0)
    assert 0.39 <= lo <= 0.41 and 0.59 <= hi <= 0.61
    lo90, hi90 = stats.bootstrap_interval([0.0, 1.0] * 50, seed=0, level=0.9)
    assert lo < lo90 and hi90 < hi


def test_wilson_interval_of_a_fractional_count_is_that_of_the_rate():
    assert stats.wilson_interval(3.0, 10) == stats.wilson_interval(3, 10)
    lo, hi = stats.wilson_interval(2.5, 10)
    assert stats.wilson_interval(2, 10)[0] < lo < stats.wilson_interval(3, 10)[0]
    assert stats.wilson_interval(2, 10)[1] < hi < stats.wilson_interval(3, 10)[1]
