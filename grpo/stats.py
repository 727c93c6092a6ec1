"""Interval estimates and significance tests for accuracies measured on a question set.

Owns the statistics the evaluation and the report give with every number: the Wilson score
interval of a proportion, the exact McNemar test of paired per-question outcomes, and the
sampled-evaluation estimators: unbiased pass@k (Chen et al. 2021), majority vote (maj@k) and a
seeded percentile bootstrap over questions. Plain Python and numpy, no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for `b` and `c` discordant pairs (binomial, p=1/2).

    >>> mcnemar_p(0, 0), mcnemar_p(5, 5), round(mcnemar_p(10, 1), 4)
    (1.0, 1.0, 0.0117)
    """
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); `successes` may be
    fractional (a mean rate times n).

    >>> lo, hi = wilson_interval(27, 30)
    >>> round(lo, 3), round(hi, 3)
    (0.744, 0.965)
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question from `n` samples of which `c` are correct (Chen et al.
    2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement hold a correct one.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over questions, `counts[i]` correct samples of `n` for question i.

    >>> mean_pass_at_k([0, 1, 4], 4, 2)  # (0 + 1/2 + 1) / 3
    0.5
    """
    return sum(pass_at_k(n, c, k) for c in counts) / len(counts) if counts else 0.0


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer; samples without one (None) abstain, and a tie goes to the tied
    answer that came first. None when no sample has an answer.

    >>> majority_vote(["3", None, "4", "4", "3"]), majority_vote(["4", "3"]), majority_vote([None])
    ('3', '4', None)
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question `values`, resampling questions
    with replacement `resamples` times from a fixed seed (the same values give the same
    interval).

    >>> bootstrap_interval([1.0] * 5), bootstrap_interval([])
    ((1.0, 1.0), (0.0, 1.0))
    >>> lo, hi = bootstrap_interval([0.0, 1.0] * 50)
    >>> 0.39 < lo < 0.41 and 0.59 < hi < 0.61
    True
    """
    if not values:
        return 0.0, 1.0
    data = np.asarray(values, dtype=np.float64)  # (n,)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(data), size=(resamples, len(data)))  # (B, n)
    means = data[index].mean(axis=1)  # (B,)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)
