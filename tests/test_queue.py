"""End-to-end: a seed × learning-rate grid through `dvc exp run --queue` and `dvc queue start` in a
copy of the repo with the tiny model (each queued run in its own temporary workspace under
.dvc/tmp/exps), then what a user compares it with: `python -m stages.compare` (seed groups and
the paired test), `dvc exp show` narrowed to the headline, `dvc metrics show`, and
`dvc plots diff` of two experiments."""

from __future__ import annotations

import json

import pytest
from test_pipeline import run, run_queue, workspace  # noqa: F401 (a module-scoped `dvc repro`-ed repo copy)

pytestmark = pytest.mark.slow

GRID = ("-S", "train.seed=0,1", "-S", "train.learning_rate=0.001,0.002")  # 0.001: the fixture's
LR_CONFIG = "train.learning_rate=0.002"
KEEP = r"Experiment|train\.(seed|learning_rate)$|.*grpo.json:(strict_accuracy|format_rate)$"
PLOTS = {"strict_accuracy", "lenient_accuracy", "format_rate", "reward", "kl", "completion_length"}


@pytest.fixture(scope="module")
def swept(workspace):  # noqa: F811 (the fixture imported above)
    run(workspace, "dvc", "exp", "run", "--queue", *GRID)
    status = run_queue(workspace, timeout=900)
    done = [line for line in status.splitlines() if "Success" in line or "Failed" in line]
    assert len(done) == 4 and all("Success" in line for line in done), status
    return workspace


def _experiments(work) -> dict[str, dict]:
    """{name: params.yaml's train section} of the experiments `dvc exp show --json` lists."""
    (head,) = [
        row
        for row in json.loads(run(work, "dvc", "exp", "show", "--json"))
        if row["rev"] != "workspace"
    ]
    return {
        exp["name"]: exp["revs"][0]["data"]["params"]["params.yaml"]["data"]["train"]
        for exp in head["experiments"]
    }


def test_compare_gives_seed_groups_and_the_paired_test(swept):
    out = run(swept, "python", "-m", "stages.compare", "--png", "compare.png")
    lines = out.splitlines()
    table = lines.index(
        "Configs (runs that differ only in seed keys): mean ± sd across seeds (runs)"
    )
    assert lines[table + 2].split()[:3] == ["baseline", "2", "base"]
    assert any(line.split()[:3] == [LR_CONFIG, "2", "base"] for line in lines[table:])
    assert any("grpo − base" in line and "pp (2)" in line for line in lines[table:])
    (paired,) = [line for line in lines if line.startswith(f"baseline → {LR_CONFIG}")]
    # 2 seed pairs × 4 eval questions; the tiny model answers none right: no discordant pair
    assert paired.split()[3:6] == ["2", "8", "0.0"]
    assert paired.split()[-3:] == ["0", "0", "1"]
    assert (swept / "compare.png").read_bytes()[:4] == b"\x89PNG"


def _columns(table: str) -> list[str]:
    """The header cells of a `dvc exp show --md` table."""
    return [c.strip() for c in table.splitlines()[0].strip("|").split("|")]


def test_exp_show_narrowed_to_the_headline(swept):
    """README's commands: the headline alone, sorted; the changed params and metrics without
    the dependency hashes; and metrics without DVCLive's step-metric wall."""
    headline = run(
        swept, "dvc", "exp", "show", "--md", "--drop", ".*",
        "--keep", KEEP,
        "--sort-by", "metrics/grpo.json:strict_accuracy", "--sort-order", "desc",
    )  # fmt: skip
    assert _columns(headline) == [
        "Experiment",
        "metrics/grpo.json:strict_accuracy",
        "metrics/grpo.json:format_rate",
        "train.learning_rate",
        "train.seed",
    ]
    rows = [line for line in headline.splitlines() if line.strip()]
    assert len(rows) == 2 + 2 + 4  # header, rule, workspace, baseline, the grid
    changed = _columns(
        run(swept, "dvc", "exp", "show", "--md", "--only-changed", "--drop", ".*/[^:]*$")
    )
    assert {"train.learning_rate", "train.seed", "metrics/grpo.json:strict_accuracy"} <= set(
        changed
    )
    assert not [c for c in changed if c.startswith(("train.beta", "grpo/", "stages/", "models/"))]
    shown = run(swept, "dvc", "metrics", "show", "--json")
    assert "dvclive/metrics.json" not in shown and "metrics/train.json" in shown
    assert "reward_change" in shown and "grad_norm" not in shown


def test_plots_diff_overlays_two_experiments(swept):
    names = sorted(_experiments(swept))
    out = json.loads(run(swept, "dvc", "plots", "diff", *names[:2], "--json"))
    assert not out.get("errors"), out.get("errors")
    assert set(out["data"]) == PLOTS
    for plot in out["data"].values():
        (spec,) = plot
        assert spec["revisions"] == names[:2]
        rows = spec["content"]["data"]["values"]
        assert {row["rev"] for row in rows} == set(names[:2])
    bars = out["data"]["strict_accuracy"][0]["content"]["data"]["values"]
    assert sorted(row["model"] for row in bars) == sorted(["base", "sft", "grpo"] * 2)
