"""Training curves read from a DVCLive log: quarter summaries, sorting, malformed files."""

from __future__ import annotations

import pytest
from test_report import write_curve

from grpo import figures
from grpo.errors import UserError


def test_curve_summary_quarters(tmp_path):
    steps = list(range(1, 11))  # 10 rows: quarter = 2
    write_curve(tmp_path, "reward/mean", steps, [float(s) for s in steps], timestamp=True)
    summary = figures.curve_summary(tmp_path)
    assert summary["first_step"] == 1 and summary["last_step"] == 10
    assert summary["quarter_steps"] == 2 and summary["steps"] == 10
    assert summary["first_quarter_mean"] == pytest.approx(1.5)
    assert summary["last_quarter_mean"] == pytest.approx(9.5)
    assert summary["change"] == pytest.approx(8.0)


def test_curve_summary_short_unsorted_and_missing(tmp_path):
    write_curve(tmp_path, "reward/mean", [3, 1, 2], [3.0, 1.0, 2.0])  # quarter = max(1, 0)
    summary = figures.curve_summary(tmp_path)
    assert (summary["first_step"], summary["last_step"], summary["quarter_steps"]) == (1, 3, 1)
    assert (summary["first_quarter_mean"], summary["change"]) == (1.0, 2.0)
    assert figures.curve_summary(tmp_path / "nowhere") == {}


def test_read_curve_rejects_wrong_columns(tmp_path):
    path = tmp_path / "plots" / "metrics" / "kl.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("step\tvalue\n1\t0.5\n")
    with pytest.raises(UserError, match=r"kl\.tsv: expected columns 'step' and 'kl'"):
        figures.read_curve(tmp_path, "kl")
