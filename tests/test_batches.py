"""Prompt order and micro-batches: seeded, resumable, the same count on every rank."""

from __future__ import annotations

import random

import pytest

from grpo.batches import PromptSampler, micro_batches


def test_prompt_sampler_is_seeded_and_restorable():
    a, b = PromptSampler(5, seed=1), PromptSampler(5, seed=1)
    first = a.next(7)
    assert first == b.next(7)
    assert sorted(first[:5]) == list(range(5))  # an epoch is a permutation
    c = PromptSampler(5, seed=1)
    c.load_state(a.state())
    assert c.next(6) == a.next(6)


def test_prompt_sampler_epochs_are_seeded_permutations_in_turn():
    """Epoch e is the permutation of Random(seed * 1_000_003 + e), the order a resumed run
    replays: the first epoch starts at 0, each next one at position 0 of the next epoch."""
    sampler = PromptSampler(4, seed=3)
    expected = []
    for epoch in range(3):
        order = list(range(4))
        random.Random(3 * 1_000_003 + epoch).shuffle(order)
        expected += order
    assert sampler.next(11) == expected[:11]
    assert sampler.state() == {"epoch": 2, "position": 3}
    assert sampler.next(1) == expected[11:]


@pytest.mark.parametrize(
    ("rows", "most", "size", "expected"),
    [
        (6, 6, 2, [(0, 2, True), (2, 4, True), (4, 6, True)]),
        (5, 5, 5, [(0, 5, True)]),
        (3, 4, 1, [(0, 1, False), (0, 1, True), (1, 2, True), (2, 3, True)]),
        (7, 7, 3, [(0, 3, True), (3, 5, True), (5, 7, True)]),
    ],
)
def test_micro_batches(rows, most, size, expected):
    got = [(s.start, s.stop, real) for s, real in micro_batches(rows, most, size)]
    assert got == expected


@pytest.mark.parametrize(("rows", "most", "size"), [(11, 11, 4), (10, 11, 4), (2, 3, 1), (8, 8, 3)])
def test_micro_batches_cover_the_rows_in_as_many_steps_on_every_rank(rows, most, size):
    batches = micro_batches(rows, most, size)
    assert len(batches) == -(-most // size)  # the largest rank's count
    real = [s for s, is_real in batches if is_real]
    assert [i for s in real for i in range(s.start, s.stop)] == list(range(rows))
    assert all(0 < s.stop - s.start <= size for s, _ in batches)
    assert batches[-1][1]  # the synchronising micro-batch is a real one
