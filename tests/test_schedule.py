"""The learning-rate multiplier of sft and train: warm-up, then constant, linear or cosine."""

from __future__ import annotations

import math

import pytest

from grpo.schedule import lr_factor


def test_warmup_then_linear_decay():
    f = lr_factor("linear", warmup_steps=2, total_updates=10)
    assert [round(f(u), 3) for u in (0, 1, 2, 6, 10, 12)] == [0.333, 0.667, 1.0, 0.5, 0.0, 0.0]


def test_warmup_then_cosine_decay():
    f = lr_factor("cosine", warmup_steps=1, total_updates=9)
    assert f(0) == 0.5
    assert f(1) == 1.0
    assert f(5) == pytest.approx(0.5)  # half-way through the decay
    assert f(9) == pytest.approx(0.0, abs=1e-12)
    assert f(20) == f(9)  # progress stops at 1


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_constant_is_the_sft_schedule(warmup):
    """The sft stage's schedule: (step + 1) / (warmup + 1) capped at 1, or 1 without warm-up."""
    f = lr_factor("constant", warmup, total_updates=7)
    for step in range(12):
        expected = min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0
        assert f(step) == expected


def test_no_warmup_starts_at_the_peak():
    for kind in ("constant", "linear", "cosine"):
        assert lr_factor(kind, 0, total_updates=4)(0) == 1.0
    assert lr_factor("cosine", 0, total_updates=4)(2) == pytest.approx(
        0.5 * (1 + math.cos(0.5 * math.pi))
    )
