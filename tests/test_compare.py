"""Comparing experiments (grpo.experiments, grpo.compare): `dvc exp show --json` parsing against a
recorded sample of DVC 3.67's output, params diffs, configs and seeds, mean ± sd, the paired
McNemar test and bootstrap on hand-made predictions."""

from __future__ import annotations

import dataclasses
import json
import statistics
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

from grpo import compare
from grpo.compare import Config, group_configs, paired_outcomes, paired_test, seed_series
from grpo.errors import UserError
from grpo.experiments import Experiment, config_label, params_diff, parse_exp_show
from stages import compare as cli
from stages.report import accuracy_rows

SAMPLE = Path(__file__).parent / "data" / "exp_show.json"
BASE_PARAMS = {"train.seed": 0, "train.learning_rate": 1e-3, "data.seed": 0, "eval.seed": 0}


def _metrics(strict: float, n: int = 100, lenient: float | None = None) -> dict[str, float]:
    return {
        "strict_accuracy": strict,
        "lenient_accuracy": strict if lenient is None else lenient,
        "format_rate": 0.5,
        "truncation_rate": 0.1,
        "n": n,
    }


def _run(name, *, kind="experiment", base=0.1, final=0.2, **params) -> Experiment:
    return Experiment(
        name=name,
        rev=f"{name:0<40}",
        kind=kind,
        status="success",
        baseline="b" * 40,
        params=BASE_PARAMS | params,
        metrics={"base": _metrics(base), "grpo": _metrics(final)},
    )


def _baseline(**kw) -> Experiment:
    run = _run("main", kind="baseline", **kw)
    return replace(run, rev="b" * 40)


# --- dvc exp show --json ----------------------------------------------------------------------


def test_parse_recorded_exp_show_sample():
    """`dvc exp show --json` (DVC 3.67) of the tiny pipeline: results not committed, one
    `dvc exp run`, a queued seed × learning-rate grid, a failed and a still-queued experiment."""
    runs = parse_exp_show(json.loads(SAMPLE.read_text()))
    statuses = {run.name: (run.kind, run.status) for run in runs}
    assert statuses == {
        "master": ("baseline", "success"),
        "lr2": ("experiment", "success"),
        "algal-miss": ("experiment", "success"),
        "glary-junk": ("experiment", "success"),
        "paler-gear": ("experiment", "success"),
        "leaky-prob": ("experiment", "success"),
        "bad": ("experiment", "failed"),
        "waiting": ("experiment", "queued"),
    }  # the workspace holds a copy of a run's results: left out
    base = runs[0]
    assert base.metrics == {} and len(base.rev) == 40  # metrics files never committed
    finished = [run for run in runs if run.metrics]
    assert [run.name for run in runs[1:6]] == [run.name for run in finished]  # oldest first
    for run in finished:
        assert run.baseline == base.rev and len(run.rev) == 40
        assert set(run.metrics) == {"base", "sft", "grpo"}
        assert set(run.metrics["grpo"]) == {*compare.RATE_NAMES, "truncation_rate", "n"}
        assert run.metrics["grpo"]["n"] == 4
        assert set(run.train) >= {"reward_first_quarter", "reward_last_quarter", "reward_change"}
    assert {"train.seed", "train.learning_rate", "model.lora_target_modules"} <= set(base.params)
    assert all(not run.metrics for run in runs if run.status != "success")
    configs = group_configs(runs)
    assert [
        (c.label, [r.name for r in c.runs], [r.name for r in c.duplicates]) for c in configs
    ] == [
        ("baseline", ["algal-miss", "paler-gear"], []),
        ("train.learning_rate=0.002", ["lr2", "leaky-prob"], ["glary-junk"]),
    ]


def test_workspace_kept_only_when_it_is_not_a_copy_of_a_run():
    def state(rev, strict, seed=0, name=None):
        metrics = {"metrics/grpo.json": {"data": _metrics(strict)}}
        params = {"params.yaml": {"data": {"train": {"seed": seed}}}}
        return {"rev": rev, "name": name, "data": {"params": params, "metrics": metrics}}

    exp = {"revs": [state("e" * 40, 0.3, seed=1, name="s1")], "name": "s1", "executor": None}
    baseline = state("b" * 40, 0.2, name="main") | {"experiments": [exp]}
    copy = parse_exp_show([state("workspace", 0.3, seed=1), baseline])
    assert [r.name for r in copy] == ["main", "s1"]
    own = parse_exp_show([state("workspace", 0.4), baseline])
    assert [r.name for r in own] == ["workspace", "main", "s1"]
    assert own[0].baseline == "b" * 40


def test_parse_keeps_only_contract_keys_and_reads_skipped_and_errors():
    data = {
        "params": {"params.yaml": {"data": {"train": {"seed": 3}}}},
        "metrics": {
            "metrics/base.json": {"data": _metrics(0.1) | {"strict_accuracy_ci_low": 0.05}},
            "metrics/sft.json": {"data": {"skipped": True, "reason": "sft disabled"}},
            "metrics/grpo.json": {"error": {"type": "FileNotFoundError", "msg": "gone"}},
        },
    }
    (run,) = parse_exp_show([{"rev": "c" * 40, "name": "main", "data": data}])
    assert run.metrics == {"base": _metrics(0.1)}
    assert run.skipped == {"sft": "sft disabled"}
    assert run.params == {"train.seed": 3} and run.seeds == (("train.seed", "3"),)
    with pytest.raises(UserError, match="expected a list"):
        parse_exp_show({"rev": "workspace"})


def test_params_diff_and_config_label_set_seeds_aside():
    base = {"train.seed": 0, "data.seed": 0, "train.lr": 1e-3, "model.targets": ["q"]}
    run = {"train.seed": 2, "data.seed": 1, "train.lr": 2e-5, "model.targets": ["q", "k"]}
    assert params_diff(run, base) == {
        "data.seed": "1",
        "model.targets": '["q", "k"]',
        "train.lr": "2e-05",
        "train.seed": "2",
    }
    assert config_label(run, base) == 'model.targets=["q", "k"] train.lr=2e-05'
    assert config_label(base | {"train.seed": 5, "data.seed": 7}, base) == "baseline"
    assert config_label(base | {"train.seedling": 1}, base) == "train.seedling=1"


# --- configs and seeds ----------------------------------------------------------------------


def test_group_configs_by_non_seed_params_and_count_a_seed_once():
    runs = [
        _baseline(final=0.2),
        _run("s0", final=0.2, **{"train.seed": 0}),  # the baseline's own params again
        _run("s1", final=0.4, **{"train.seed": 1}),
        _run("lr0", final=0.3, **{"train.learning_rate": 2e-3}),
        _run("lr1", final=0.5, **{"train.learning_rate": 2e-3, "train.seed": 1}),
        Experiment("queued", "q" * 40, "experiment", "queued", "b" * 40, BASE_PARAMS),
    ]
    configs = group_configs(runs)
    assert [c.label for c in configs] == ["baseline", "train.learning_rate=0.002"]
    base, lr = configs
    assert [r.name for r in base.runs] == ["main", "s1"]
    assert [r.name for r in base.duplicates] == ["s0"]
    assert [r.name for r in lr.runs] == ["lr0", "lr1"]


def test_seed_series_mean_and_sd():
    config = Config(
        "c",
        [
            _run("a", base=0.1, final=0.2),
            _run("b", base=0.1, final=0.4),
            _run("c", base=0.2, final=0.9),
        ],
    )
    series = seed_series(config)
    assert series[("grpo", "strict_accuracy")] == [0.2, 0.4, 0.9]
    assert series[("grpo − base", "strict_accuracy")] == pytest.approx([0.1, 0.3, 0.7])
    lines = "\n".join(compare.seed_table([config]))
    mean, sd = statistics.fmean([0.1, 0.3, 0.7]), statistics.stdev([0.1, 0.3, 0.7])
    assert f"+{100 * mean:.1f} ± {100 * sd:.1f} pp (3)" in lines
    assert f"50.0 ± {100 * statistics.stdev([0.2, 0.4, 0.9]):.1f} (3)" in lines
    assert compare.mean_sd([0.5]) == "50.0 ± n/a (1)"
    assert "reward gain" not in lines  # no run has a train summary
    gains = (0.1, 0.2, 0.6)
    config.runs = [
        dataclasses.replace(run, train={"reward_change": gain})
        for run, gain in zip(config.runs, gains, strict=True)
    ]
    lines = "\n".join(compare.seed_table([config]))
    assert "c: reward gain in training (mean reward, last − first quarter" in lines
    assert f"of the steps) +0.300 ± {statistics.stdev(gains):.3f} (3)" in lines


# --- paired tests ---------------------------------------------------------------------------


def _outcomes(pattern: str) -> dict[str, bool]:
    return {f"q{i}": c == "1" for i, c in enumerate(pattern)}


def test_paired_outcomes_pool_seeds_for_mcnemar():
    # seed 0: B gains q1, q2 and loses q3; seed 1: B gains q1, q2, q4
    pairs = [
        (_outcomes("10010"), _outcomes("11100")),
        (_outcomes("10000"), _outcomes("11101")),
    ]
    r = paired_outcomes(pairs, boot=500, seed=1)
    assert r["units"] == 10 and (r["only_a"], r["only_b"]) == (1, 5)
    assert r["acc_a"] == pytest.approx(0.3) and r["acc_b"] == pytest.approx(0.7)
    assert r["p"] == pytest.approx(compare.mcnemar_p(1, 5))
    low, high = r["ci"]
    assert low <= 0.4 <= high and -1 <= low < high <= 1
    assert paired_outcomes(pairs, boot=500, seed=1)["ci"] == r["ci"]  # seeded
    assert paired_outcomes(pairs, boot=500, seed=2)["ci"] != r["ci"]


def test_bootstrap_resamples_questions_not_seed_pairs():
    """One question decides every seed: resampling whole questions keeps the seeds together, so
    the interval is that of 2 questions (0 or 1 wins), not of 20 independent pairs."""
    pairs = [(_outcomes("00"), _outcomes("10"))] * 10
    low, high = paired_outcomes(pairs, boot=2000, seed=0)["ci"]
    assert (low, high) == (0.0, 1.0)


def test_paired_outcomes_reject_different_questions():
    with pytest.raises(UserError, match="different questions"):
        paired_outcomes([(_outcomes("10"), _outcomes("101"))])


def test_paired_test_pairs_runs_with_equal_seeds_only():
    a = Config("A", [_run("a0"), _run("a1", **{"train.seed": 1})])
    b = Config("B", [_run("b1", **{"train.seed": 1}), _run("b2", **{"train.seed": 2})])
    answers = {"a1": "0011", "b1": "1111"}
    read_calls = []

    def read(run, model):
        read_calls.append((run.name, model))
        return [
            {"id": qid, "strict_correct": ok} for qid, ok in _outcomes(answers[run.name]).items()
        ]

    r = paired_test(a, b, read, "grpo", boot=200, seed=0)
    assert sorted(read_calls) == [("a1", "grpo"), ("b1", "grpo")]
    assert r.seeds == ["data.seed=0 eval.seed=0 train.seed=1"]
    assert (r.units, r.only_a, r.only_b, r.diff) == (4, 0, 2, 0.5)
    assert "A → B" in "\n".join(compare.paired_table([r]))
    assert paired_test(a, Config("C", [_run("c5", **{"train.seed": 5})]), read) is None


def test_pick_config_by_label_or_experiment_name():
    configs = group_configs([_baseline(), _run("lr", **{"train.learning_rate": 2e-3})])
    assert compare.pick_config(configs, "lr").label == "train.learning_rate=0.002"
    assert compare.pick_config(configs, "baseline") is configs[0]
    with pytest.raises(UserError, match="no config or experiment"):
        compare.pick_config(configs, "nope")


# --- output ---------------------------------------------------------------------------------


def test_headline_gives_changed_params_wilson_intervals_and_the_change():
    runs = [_baseline(base=0.25, final=0.25), _run("lr", base=0.25, final=0.4, **{"train.seed": 2})]
    text = "\n".join(compare.headline(runs))
    assert "main (baseline bbbbbbb, success): no params changed" in text
    assert "lr (experiment lr00000, success): train.seed=2" in text
    assert "25.0 [17.5, 34.3]" in text  # Wilson interval of 25/100, recomputed
    assert "grpo − base  +15.0 pp" in text


def test_plot_writes_a_png(tmp_path):
    configs = [Config("A", [_run("a")]), Config("B", [_run("b", final=0.5)])]
    r = compare.Paired("A", "B", "grpo", ["s"], 10, 0.2, 0.5, 1, 4, 0.375, (0.0, 0.6))
    compare.plot(configs, [r], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_rows_for_dvc_plots_leave_skipped_models_out(tmp_path):
    (tmp_path / "base.json").write_text(json.dumps(_metrics(0.25, lenient=0.5)))
    (tmp_path / "sft.json").write_text(json.dumps({"skipped": True, "reason": "disabled"}))
    paths = {name: tmp_path / f"{name}.json" for name in ("base", "sft")}
    assert accuracy_rows(paths) == [
        {"model": "base", "strict": 25.0, "lenient": 50.0, "format": 50.0}
    ]


def test_run_summary_puts_the_reward_change_first():
    from stages.train import run_summary  # imports torch: only this test needs it

    s = run_summary(
        {
            "steps": 8,
            "reward_first_quarter": 0.25,
            "reward_last_quarter": 1.0,
            "nonfinite_skipped": 2,
        }
    )
    assert list(s) == [
        "reward_first_quarter",
        "reward_last_quarter",
        "reward_change",
        "steps",
        "nonfinite_skipped",
    ]
    assert s["reward_change"] == 0.75 and s["nonfinite_skipped"] == 2


def test_cli_prints_the_headline_configs_and_paired_tests(tmp_path, monkeypatch, capsys):
    """`python -m stages.compare` on the recorded sample, predictions read by a stand-in: every
    finished run of the baseline config right on q0, of the learning-rate config on q0 and q1."""

    def read(root, run, model):
        right = {"q0", "q1"} if run.params["train.learning_rate"] == 0.002 else {"q0"}
        return [{"id": q, "strict_correct": q in right} for q in ("q0", "q1", "q2")]

    monkeypatch.setattr(cli, "read_predictions", read)
    args = {"repo": tmp_path, "model": "grpo", "boot": 100, "boot_seed": 0, "from_json": SAMPLE}
    args |= {"a": None, "b": None}
    cli.main(Namespace(**args, png=tmp_path / "c.png"))
    out = capsys.readouterr().out
    assert "lr2 (experiment 756a919, success): train.learning_rate=0.002" in out
    assert "bad (experiment f0f6d2f, failed)" in out
    (line,) = [x for x in out.splitlines() if x.startswith("baseline → ")]
    assert line.split()[3:9] == ["2", "6", "33.3", "66.7", "+33.3", "pp"]  # 2 seeds × 3 questions
    assert (tmp_path / "c.png").is_file()
    with pytest.raises(UserError, match="--a and --b go together"):
        cli.main(Namespace(**{**args, "a": "lr2"}, png=None))
