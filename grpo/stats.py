"""Interval estimates and significance tests for accuracies measured on a question set.

Owns the statistics the evaluation and the report give with every number: the Wilson score
interval of a proportion and the exact McNemar test of paired per-question outcomes. Plain
Python, no torch.
"""

from __future__ import annotations

import math


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for `b` and `c` discordant pairs (binomial, p=1/2).

    >>> mcnemar_p(0, 0), mcnemar_p(5, 5), round(mcnemar_p(10, 1), 4)
    (1.0, 1.0, 0.0117)
    """
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

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
