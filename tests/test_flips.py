"""Question-level comparison of two models: flips joined on id, McNemar, id mismatches."""

from __future__ import annotations

import pytest
from test_report import IDS, STRICT

from grpo.errors import UserError
from grpo.flips import flips


def test_flips_hand_made_example():
    a = [{"id": i, "strict_correct": bool(ok)} for i, ok in zip(IDS, STRICT["sft"], strict=True)]
    b = [{"id": i, "strict_correct": bool(ok)} for i, ok in zip(IDS, STRICT["grpo"], strict=True)]
    f = flips(a, list(reversed(b)))  # joined on id, not on position
    assert f["wrong_to_right"] == ["test-00001", "test-00002", "test-00006"]
    assert f["right_to_wrong"] == ["test-00004"]
    assert (f["n_wrong_to_right"], f["n_right_to_wrong"]) == (3, 1)
    assert (f["both_right"], f["both_wrong"], f["n"]) == (2, 2, 8)
    assert f["mcnemar_p"] == pytest.approx(0.625)  # 2 * (1 + 4) / 16


def test_flips_mismatched_ids_and_repeated_id():
    a = [{"id": "q1", "strict_correct": True}, {"id": "q2", "strict_correct": False}]
    b = [{"id": "q1", "strict_correct": True}, {"id": "q3", "strict_correct": False}]
    with pytest.raises(UserError, match=r"different questions .*e\.g\. q2"):
        flips(a, b, names=("sft", "grpo"))
    with pytest.raises(UserError, match="q1 appears twice"):
        flips(a + a[:1], a)
