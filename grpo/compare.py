"""Comparing experiments: the headline per run, seed sweeps with variance, and paired tests.

Owns what `python -m stages.compare` prints and plots from the runs of `grpo.experiments`:

- the headline of each run: the params that differ from its baseline commit and, per evaluated
  model, strict / lenient / format accuracy with 95% Wilson intervals (recomputed from the value
  and `n`), truncation, and the base → final change in percentage points;
- per config (runs whose params differ only in seed keys; runs with the same seeds count once),
  the mean ± sd across seeds of each headline rate and of final − base;
- between two configs, a paired test on the same questions: the runs of the two configs with
  equal seed values are paired (seed i of A with seed i of B; unmatched seeds are left out),
  their per-question outcomes pooled, tested with the exact McNemar test, and the accuracy
  difference given with a seeded percentile bootstrap interval that resamples questions
  (with all their seed pairs, since one question's outcomes are correlated across seeds).

Plain Python, numpy and matplotlib (Agg canvas); no torch.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grpo.errors import UserError
from grpo.eval_results import by_id
from grpo.experiments import RATE_KEYS, Experiment, baseline_params, config_label, params_diff
from grpo.fsutil import atomic_write
from grpo.stats import mcnemar_p, wilson_interval

BASE, FINAL = "base", "grpo"
MODEL_ORDER = ("base", "sft", "grpo")
RATE_NAMES = {"strict_accuracy": "strict", "lenient_accuracy": "lenient", "format_rate": "format"}


def _models(runs: Sequence[Experiment]) -> list[str]:
    """Every evaluated model of `runs`, pipeline order first."""
    found = {m for run in runs for m in run.metrics}
    return [m for m in MODEL_ORDER if m in found] + sorted(found - set(MODEL_ORDER))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned columns of plain text."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def rate_cell(value: float, n: int) -> str:
    """A rate in % with its 95% Wilson interval (successes = value × n, fractional for a mean
    over samples).

    >>> rate_cell(0.25, 100)
    '25.0 [17.5, 34.3]'
    """
    low, high = wilson_interval(value * n, int(n))
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _pp(value: float) -> str:
    return f"{round(100 * value, 1) + 0.0:+.1f} pp"  # + 0.0: no "-0.0"


# --- the headline of each run ---------------------------------------------------------------


def headline(runs: Sequence[Experiment]) -> list[str]:
    """Per run: its name, kind and changed params, then a table of its evaluated models."""
    lines = []
    for run in runs:
        diff = params_diff(run.params, baseline_params(runs, run))
        changed = " ".join(f"{k}={v}" for k, v in diff.items()) or "no params changed"
        lines.append(f"{run.name} ({run.kind} {run.rev[:7]}, {run.status}): {changed}")
        if not run.metrics:
            lines += ["  no evaluation results", ""]
            continue
        header = ["model", *(f"{RATE_NAMES[k]} % [95% CI]" for k in RATE_KEYS), "trunc %", "n"]
        rows = []
        for model in _models([run]):
            m = run.metrics[model]
            cells = [rate_cell(m[k], m["n"]) for k in RATE_KEYS]
            rows.append([model, *cells, f"{100 * m['truncation_rate']:.1f}", str(int(m["n"]))])
        if BASE in run.metrics and FINAL in run.metrics:
            base, final = run.metrics[BASE], run.metrics[FINAL]
            changes = [_pp(final[k] - base[k]) for k in RATE_KEYS]
            rows.append([f"{FINAL} − {BASE}", *changes, "", ""])
        lines += _table(header, rows, indent="  ")
        lines += [f"  {model}: {reason}" for model, reason in run.skipped.items()]
        if run.train:
            t = run.train
            lines.append(
                f"  train: reward {t.get('reward_first_quarter', float('nan')):.3f} → "
                f"{t.get('reward_last_quarter', float('nan')):.3f} (first → last quarter of "
                f"{int(t.get('steps', 0))} steps), nonfinite skipped "
                f"{int(t.get('nonfinite_skipped', 0))}"
            )
        lines.append("")
    return lines


# --- configs and seeds ----------------------------------------------------------------------


@dataclass
class Config:
    """The finished runs of one config, one per seed assignment."""

    label: str
    runs: list[Experiment] = field(default_factory=list)
    duplicates: list[Experiment] = field(default_factory=list)  # same seeds as a kept run

    def names(self) -> set[str]:
        return {run.name for run in [*self.runs, *self.duplicates]}


def group_configs(runs: Sequence[Experiment]) -> list[Config]:
    """Finished runs (with metrics) grouped by config: the baseline's first, then in order of
    first appearance."""
    configs: dict[tuple[str, str], Config] = {}
    for run in runs:
        if not run.metrics:
            continue
        label = config_label(run.params, baseline_params(runs, run))
        config = configs.setdefault((run.baseline, label), Config(label))
        if any(kept.seeds == run.seeds for kept in config.runs):
            config.duplicates.append(run)
        else:
            config.runs.append(run)
    if len({baseline for baseline, _ in configs}) > 1:  # the same label from other code
        for (baseline, _), config in configs.items():
            config.label = f"{config.label} @{baseline[:7]}"
    return sorted(configs.values(), key=lambda c: not c.label.startswith("baseline"))


def seed_series(config: Config) -> dict[tuple[str, str], list[float]]:
    """{(model, rate): value per run} for models every run evaluated, and (final − base, rate)."""
    series: dict[tuple[str, str], list[float]] = {}
    models = [m for m in _models(config.runs) if all(m in r.metrics for r in config.runs)]
    for model in models:
        for rate in RATE_KEYS:
            series[(model, rate)] = [r.metrics[model][rate] for r in config.runs]
    if BASE in models and FINAL in models:
        for rate in RATE_KEYS:
            delta = [r.metrics[FINAL][rate] - r.metrics[BASE][rate] for r in config.runs]
            series[(f"{FINAL} − {BASE}", rate)] = delta
    return series


def mean_sd(values: Sequence[float], signed: bool = False) -> str:
    """Mean ± sample sd in % (a signed change in pp), and the count; `± n/a` for one value.

    >>> mean_sd([0.2, 0.3, 0.4]), mean_sd([0.5]), mean_sd([-0.1, 0.1], signed=True)
    ('30.0 ± 10.0 (3)', '50.0 ± n/a (1)', '+0.0 ± 14.1 pp (2)')
    """
    mean = round(100 * statistics.fmean(values), 1) + 0.0  # + 0.0: no "-0.0"
    sd = f"{100 * statistics.stdev(values):.1f}" if len(values) > 1 else "n/a"
    if signed:
        return f"{mean:+.1f} ± {sd} pp ({len(values)})"
    return f"{mean:.1f} ± {sd} ({len(values)})"


def seed_table(configs: Sequence[Config]) -> list[str]:
    """Mean ± sd across seeds of each headline rate, per config and model, and of the reward
    gain over training (`metrics/train.json`'s `reward_change`) where every run has it."""
    header = ["config", "runs", "model", *(f"{RATE_NAMES[k]} %" for k in RATE_KEYS)]
    rows = []
    for config in configs:
        series = seed_series(config)
        for i, model in enumerate(dict.fromkeys(m for m, _ in series)):
            first = [config.label, str(len(config.runs))] if i == 0 else ["", ""]
            signed = model not in config.runs[0].metrics  # the final − base change
            cells = [mean_sd(series[(model, k)], signed) for k in RATE_KEYS]
            rows.append([*first, model, *cells])
    lines = _table(header, rows)
    for config in configs:
        gains = [run.train["reward_change"] for run in config.runs if "reward_change" in run.train]
        if gains and len(gains) == len(config.runs):
            sd = f"{statistics.stdev(gains):.3f}" if len(gains) > 1 else "n/a"
            lines.append(
                f"{config.label}: reward gain in training (mean reward, last − first quarter of "
                f"the steps) {statistics.fmean(gains):+.3f} ± {sd} ({len(gains)})"
            )
    for config in configs:
        if config.duplicates:
            names = ", ".join(run.name for run in config.duplicates)
            lines.append(f"{config.label}: {names} repeat the seeds of another run, counted once")
    return lines


# --- paired tests ---------------------------------------------------------------------------


@dataclass
class Paired:
    """Config B against config A on the same questions, runs paired by seed."""

    a: str
    b: str
    model: str
    seeds: list[str]  # the seed assignments paired
    units: int  # question × seed pairs pooled
    acc_a: float
    acc_b: float
    only_a: int  # right in A, wrong in B
    only_b: int
    p: float  # exact McNemar, two-sided
    ci: tuple[float, float]  # bootstrap 95% interval of acc_b − acc_a

    @property
    def diff(self) -> float:
        return self.acc_b - self.acc_a


def paired_outcomes(
    pairs: Sequence[tuple[Mapping[str, bool], Mapping[str, bool]]],
    *,
    boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Pooled paired statistics of `pairs` ({question id: correct} of A, of B), one pair per
    seed: accuracies, discordant counts, McNemar p, and a percentile bootstrap 95% interval of
    B − A that resamples question ids (each with all its seed pairs), seeded by `seed`.

    >>> a = {"q1": True, "q2": False, "q3": False}
    >>> b = {"q1": True, "q2": True, "q3": True}
    >>> r = paired_outcomes([(a, b), (a, b)], boot=200)
    >>> r["units"], r["only_a"], r["only_b"], round(r["p"], 4), r["ci"][1]
    (6, 0, 4, 0.125, 1.0)
    """
    sums: dict[str, list[int]] = {}  # question id -> [sum of B − A, pairs]
    right_a = right_b = only_a = only_b = units = 0
    for outcome_a, outcome_b in pairs:
        if outcome_a.keys() != outcome_b.keys():
            raise UserError(
                "paired test: the two runs of a seed were evaluated on different questions; "
                "compare configs that share data.* and eval.* params"
            )
        for qid, ok_a in outcome_a.items():
            ok_b = outcome_b[qid]
            units += 1
            right_a, right_b = right_a + ok_a, right_b + ok_b
            only_a, only_b = only_a + (ok_a and not ok_b), only_b + (ok_b and not ok_a)
            entry = sums.setdefault(qid, [0, 0])
            entry[0] += int(ok_b) - int(ok_a)
            entry[1] += 1
    if units == 0:
        raise UserError("paired test: no questions to compare")
    diffs, counts = np.array(list(sums.values())).T  # (Q,), (Q,)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), size=(boot, len(diffs)))  # (boot, Q)
    resampled = diffs[picks].sum(axis=1) / counts[picks].sum(axis=1)  # (boot,)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {
        "units": units,
        "acc_a": right_a / units,
        "acc_b": right_b / units,
        "only_a": only_a,
        "only_b": only_b,
        "p": mcnemar_p(only_a, only_b),
        "ci": (float(low), float(high)),
    }


Reader = Callable[[Experiment, str], list[dict[str, Any]]]


def paired_test(
    a: Config, b: Config, read: Reader, model: str = FINAL, **boot: int
) -> Paired | None:
    """Config B against A on `model`'s strict correctness; None when no seeds match."""
    seeds_b = {run.seeds: run for run in b.runs}
    matched = [(run, seeds_b[run.seeds]) for run in a.runs if run.seeds in seeds_b]
    if not matched:
        return None
    pairs = [
        tuple(
            by_id(read(run, model), "strict_correct", f"{model} of {run.name}")
            for run in (run_a, run_b)
        )
        for run_a, run_b in matched
    ]
    r = paired_outcomes(pairs, **boot)
    seeds = [" ".join(f"{k}={v}" for k, v in run.seeds) for run, _ in matched]
    return Paired(a.label, b.label, model, seeds, **r)


def pick_config(configs: Sequence[Config], name: str) -> Config:
    """The config labelled `name`, or holding the run named `name`."""
    for config in configs:
        if name == config.label or name in config.names():
            return config
    known = ", ".join(repr(c.label) for c in configs)
    raise UserError(f"{name!r}: no config or experiment of that name; one of {known}")


def paired_table(results: Sequence[Paired]) -> list[str]:
    """One row per test: the pairs pooled, both accuracies, B − A with its bootstrap interval,
    the discordant counts (right only in A, only in B) and the McNemar p-value."""
    header = ["A → B", "seed pairs", "units", "A %", "B %", "B − A [95% CI]", "A only", "B only"]
    header.append("McNemar p")
    rows = [
        [
            f"{r.a} → {r.b}",
            str(len(r.seeds)),
            str(r.units),
            f"{100 * r.acc_a:.1f}",
            f"{100 * r.acc_b:.1f}",
            f"{_pp(r.diff)} [{100 * r.ci[0]:+.1f}, {100 * r.ci[1]:+.1f}]",
            str(r.only_a),
            str(r.only_b),
            f"{r.p:.3g}",
        ]
        for r in results
    ]
    return _table(header, rows)


# --- figure ---------------------------------------------------------------------------------


def plot(configs: Sequence[Config], results: Sequence[Paired], out_png: Path) -> None:
    """Left: strict accuracy per config and model, mean ± sd bars with each seed as a dot.
    Right: each paired test's B − A with its bootstrap 95% interval. Written atomically."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, diff_ax = fig.subplots(1, 2)
    models = _models([run for c in configs for run in c.runs])
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        for j, config in enumerate(configs):
            values = [
                100 * r.metrics[model]["strict_accuracy"] for r in config.runs if model in r.metrics
            ]
            if not values:
                continue
            x = j + (i - (len(models) - 1) / 2) * width
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            acc_ax.bar(
                x,
                statistics.fmean(values),
                width,
                yerr=sd,
                capsize=3,
                color=f"C{i}",
                label=model if j == 0 else None,
            )
            acc_ax.plot([x] * len(values), values, "k.", markersize=4)
    acc_ax.set_xticks(range(len(configs)), [c.label for c in configs], rotation=15, ha="right")
    acc_ax.set_ylim(0, 100)
    acc_ax.set_ylabel("strict accuracy (%)")
    acc_ax.set_title("Strict accuracy: mean ± sd across seeds (dots: seeds)")
    acc_ax.legend()
    for i, r in enumerate(results):
        low, high = 100 * (r.diff - r.ci[0]), 100 * (r.ci[1] - r.diff)
        diff_ax.errorbar(
            100 * r.diff, i, xerr=[[max(0.0, low)], [max(0.0, high)]], fmt="o", capsize=4
        )
    if not results:
        diff_ax.text(0.5, 0.5, "no paired test", ha="center", transform=diff_ax.transAxes)
    diff_ax.axvline(0, color="grey", linewidth=0.8)
    diff_ax.set_yticks(range(len(results)), [f"{r.b}\nvs {r.a}" for r in results])
    diff_ax.set_xlabel("strict accuracy difference B − A (pp)")
    diff_ax.set_title("Paired on the same questions (bootstrap 95% CI)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(Path(out_png), lambda fh: fh.write(buffer.getvalue()), binary=True)
