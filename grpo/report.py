"""The evaluation report: a Markdown comparison of the evaluated models and one PNG of plots.

Owns how the outputs of the `evaluate` stage (one metrics JSON and one predictions JSONL per
model) and the DVCLive step metrics of the `train` stage become `metrics/report.md` and
`metrics/report.png`: the comparison table (accuracies and format rate with their 95% intervals,
deltas in percentage points), the questions that flipped between models, a summary of the reward
curve, and the plots. Run it through the stage CLI:

    python -m stages.report --model base=metrics/base.json:metrics/predictions/base.jsonl \
        --model grpo=metrics/grpo.json:metrics/predictions/grpo.jsonl \
        --train-log dvclive --md metrics/report.md --png metrics/report.png

A missing metrics or predictions file is a `UserError` (the pipeline has not produced it yet);
a missing training curve is not: the curve is left out and the report says so. A model whose
metrics say `"skipped": true` (an unchanged copy of another model, e.g. `sft` with SFT disabled)
is named with its reason, e.g. "sft disabled (same weights as base)", and left out of the
comparisons. Plain pandas and
matplotlib (Agg canvas, no pyplot state); no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from grpo.errors import UserError
from grpo.eval_results import (
    FINISHED,
    FIX,
    RATES,
    load_metrics,
    load_predictions,
    require,
    skipped_reason,
)
from grpo.figures import curve_summary, missing_curves, plot
from grpo.flips import flip_pairs, flips
from grpo.fsutil import atomic_write

EXAMPLES = 10


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _delta(value: float, unit: str) -> str:
    # `+ 0.0` turns a rounded -0.0 into 0.0, so no change prints as "+0.0".
    return f"{round(value, 1) + 0.0:+.1f}{unit}"


def _comparisons(labels: Sequence[str], baseline: str) -> list[tuple[str, str]]:
    """(reference, model) pairs for the delta columns: each model vs the baseline, and vs the
    model before it in the order when that is not the baseline.

    >>> _comparisons(["base", "sft", "grpo"], "base")
    [('base', 'sft'), ('base', 'grpo'), ('sft', 'grpo')]
    """
    pairs = []
    for i, label in enumerate(labels):
        if label == baseline:
            continue
        pairs.append((baseline, label))
        if i > 0 and labels[i - 1] not in (baseline, label):
            pairs.append((labels[i - 1], label))
    return pairs


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _interval_cell(m: pd.Series, key: str) -> str:
    return f"{_pct(m[key])} [{_pct(m[f'{key}_ci_low'])}, {_pct(m[f'{key}_ci_high'])}]"


def comparison_table(metrics: pd.DataFrame, baseline: str) -> str:
    """Markdown table: one column per model (value and 95% interval) and one per comparison
    (each model minus the baseline, and minus the model before it), deltas in percentage points.
    Each accuracy is followed by the accuracy over the completions that finished (with their
    count), and the truncation rate sits with them: an accuracy measured on cut-off answers
    shows it.

    >>> m = {"n": 100, "num_samples": 1, "mean_completion_tokens": 150.0, "n_finished": 60}
    >>> for rate, value in [("strict_accuracy", 0.1), ("lenient_accuracy", 0.2),
    ...                     ("format_rate", 0.5), ("truncation_rate", 0.4),
    ...                     ("strict_accuracy_finished", 0.15),
    ...                     ("lenient_accuracy_finished", 0.3)]:
    ...     m |= {rate: value, f"{rate}_ci_low": value - 0.05, f"{rate}_ci_high": value + 0.05}
    >>> frame = pd.DataFrame([m, m | {"strict_accuracy": 0.25}], index=["base", "grpo"])
    >>> table = comparison_table(frame, "base").splitlines()
    >>> print(table[2])
    | strict accuracy (%) | 10.0 [5.0, 15.0] | 25.0 [5.0, 15.0] | +15.0 pp |
    >>> table[3].split(" | ")[:2]
    ['| strict accuracy, finished only (%)', '15.0 [10.0, 20.0] of 60']
    """
    labels = list(metrics.index)
    if baseline not in labels:
        raise UserError(f"baseline {baseline!r} is not one of the models ({', '.join(labels)})")
    pairs = _comparisons(labels, baseline)
    header = ["metric", *labels, *(f"{b} − {a}" for a, b in pairs)]

    def pp_deltas(key: str) -> list[str]:
        return [_delta(100 * (metrics.at[b, key] - metrics.at[a, key]), " pp") for a, b in pairs]

    rows = []
    for rate, name in (*RATES.items(), ("truncation_rate", "truncation rate")):
        cells = [_interval_cell(m, rate) for _, m in metrics.iterrows()]
        rows.append([f"{name} (%)", *cells, *pp_deltas(rate)])
        finished = f"{rate}_finished"
        if finished in FINISHED:
            cells = [
                f"{_interval_cell(m, finished)} of {int(m['n_finished'])}"
                for _, m in metrics.iterrows()
            ]
            rows.append([f"{FINISHED[finished]} (%)", *cells, *pp_deltas(finished)])
    tokens = metrics["mean_completion_tokens"]
    rows.append(
        [
            "mean completion tokens",
            *(f"{v:.1f}" for v in tokens),
            *(_delta(tokens[b] - tokens[a], "") for a, b in pairs),
        ]
    )
    rows.append(["questions", *(str(int(v)) for v in metrics["n"]), *([""] * len(pairs))])
    if (metrics["num_samples"] > 1).any():
        samples = [str(int(v)) for v in metrics["num_samples"]]
        rows.append(["completions per question", *samples, *([""] * len(pairs))])
    return _markdown_table(header, rows)


def sample_counts(num_samples: int) -> list[int]:
    """The k of the pass@k / maj@k table: 1, 2, 4, ... below `num_samples`, then `num_samples`.

    >>> sample_counts(8), sample_counts(5), sample_counts(1)
    ([1, 2, 4, 8], [1, 2, 4, 5], [1])
    """
    ks = [1]
    while ks[-1] * 2 < num_samples:
        ks.append(ks[-1] * 2)
    return ks if num_samples == 1 else [*ks, num_samples]


def sampled_table(metrics: pd.DataFrame) -> str:
    """Markdown table of strict pass@k and maj@k with 95% intervals (bootstrap over questions
    for pass@k, Wilson for maj@k), one row per k of `sample_counts`, two columns per model
    evaluated with several samples ("—" where a model has fewer than k)."""
    sampled = metrics[metrics["num_samples"] > 1]
    header = [
        "k",
        *(f"{label} {name}@k (%)" for label in sampled.index for name in ("pass", "maj")),
    ]
    rows = []
    for k in sample_counts(int(sampled["num_samples"].max())):
        cells = [
            _interval_cell(m, f"{name}@{k}") if k <= m["num_samples"] else "—"
            for _, m in sampled.iterrows()
            for name in ("pass", "maj")
        ]
        rows.append([str(k), *cells])
    return _markdown_table(header, rows)


def _sampling_section(metrics: pd.DataFrame) -> list[str]:
    """How the completions were generated; with several samples per question, the pass@k and
    maj@k table."""
    lines = []
    for label, m in metrics.iterrows():
        if m["num_samples"] == 1 and m["temperature"] == 0:
            lines.append(f"- `{label}`: greedy decoding, one completion per question (pass@1).")
        elif m["num_samples"] == 1:
            lines.append(
                f"- `{label}`: one completion per question sampled at temperature "
                f"{m['temperature']:g}."
            )
        else:
            lines.append(
                f"- `{label}`: {int(m['num_samples'])} completions per question sampled at "
                f"temperature {m['temperature']:g}; accuracies and rates above are means over "
                f"all completions (pass@1), and `strict_correct` in its predictions is the "
                f"majority answer's (maj@{int(m['num_samples'])})."
            )
    if (metrics["num_samples"] > 1).any():
        lines += [
            "",
            "Unbiased pass@k (Chen et al. 2021: the chance that k of the completions hold a "
            "correct one; 95% percentile bootstrap over questions) and maj@k (the most frequent "
            "tagged answer of the first k completions, ties to the answer seen first; 95% "
            "Wilson interval), strict answers. Lenient variants are in the details files.",
            "",
            sampled_table(metrics),
        ]
    return lines


def _flips_section(predictions: Mapping[str, list[dict[str, Any]]], baseline: str) -> list[str]:
    labels = list(predictions)
    pairs = flip_pairs(labels, baseline)
    if not pairs:
        return ["Only one model: no question-level comparison."]
    results = {
        (a, b, key): flips(predictions[a], predictions[b], key, names=(a, b))
        for a, b in pairs
        for key in ("strict_correct", "lenient_correct")
    }
    rows = []
    for (a, b, key), f in results.items():
        net = f["n_wrong_to_right"] - f["n_right_to_wrong"]
        rows.append(
            [
                f"{a} → {b}",
                key.removesuffix("_correct"),
                str(f["n_wrong_to_right"]),
                str(f["n_right_to_wrong"]),
                f"{net:+d}",
                f"{f['mcnemar_p']:.3g}",
            ]
        )
    lines = [
        "Questions (joined on id) that the first model of a pair got wrong and the second got "
        "right, and the reverse. The McNemar p-value (exact, two-sided) says how surprising the "
        "imbalance would be if the two models were equally accurate.",
        "",
        _markdown_table(
            ["models", "answer", "wrong → right", "right → wrong", "net", "McNemar p"], rows
        ),
    ]
    for a, b in pairs:
        f = results[(a, b, "strict_correct")]
        lines += ["", f"### {a} → {b} (strict)", ""]
        for direction, title in (
            ("wrong_to_right", "wrong → right"),
            ("right_to_wrong", "right → wrong"),
        ):
            ids = f[direction]
            shown = ", ".join(f"`{qid}`" for qid in ids[:EXAMPLES]) or "none"
            more = f" (first {EXAMPLES} shown)" if len(ids) > EXAMPLES else ""
            lines.append(f"- {title} ({len(ids)}): {shown}{more}")
    return lines


def _curve_section(log_dir: Path) -> list[str]:
    summary = curve_summary(log_dir)
    if summary:
        lines = [
            f"Mean total reward (`reward/mean`) over {summary['steps']} logged steps "
            f"({summary['first_step']}–{summary['last_step']}): "
            f"{summary['first_quarter_mean']:.3f} over the first {summary['quarter_steps']} "
            f"→ {summary['last_quarter_mean']:.3f} over the last {summary['quarter_steps']} "
            f"(change {summary['change']:+.3f})."
        ]
    else:
        lines = [f"No `reward/mean` curve in `{log_dir}`: no reward summary."]
    missing = missing_curves(log_dir)
    if missing:
        names = ", ".join(f"`{name}`" for name in missing)
        lines += ["", f"Not in the training log, left out of the plot: {names}."]
    return lines


def write_report(
    metrics_paths: Mapping[str, Path],
    predictions_paths: Mapping[str, Path],
    log_dir: Path,
    out_md: Path,
    out_png: Path,
    baseline: str = "base",
) -> None:
    """Write the Markdown report and its PNG (both atomically) for the models in the order of
    `metrics_paths`; `predictions_paths` must have the same labels."""
    labels = list(metrics_paths)
    if not labels:
        raise UserError("no models to report on; pass at least one --model")
    if list(predictions_paths) != labels:
        raise UserError(
            f"metrics are for {', '.join(labels)} but predictions for "
            f"{', '.join(predictions_paths)}; give both files for every model"
        )
    if baseline not in labels:
        raise UserError(f"baseline {baseline!r} is not one of the models ({', '.join(labels)})")
    for label in labels:
        require(Path(metrics_paths[label]), "metrics file")
        require(Path(predictions_paths[label]), "predictions file")
    skipped = {label: skipped_reason(metrics_paths[label]) for label in labels}
    skipped = {label: reason for label, reason in skipped.items() if reason is not None}
    if baseline in skipped:
        raise UserError(
            f"{metrics_paths[baseline]}: the baseline {baseline!r} was not evaluated "
            f"({skipped[baseline]}); {FIX}"
        )
    labels = [label for label in labels if label not in skipped]
    metrics = load_metrics({label: metrics_paths[label] for label in labels})
    predictions = {
        label: load_predictions(predictions_paths[label], int(metrics.at[label, "n"]))
        for label in labels
    }
    out_md, out_png = Path(out_md), Path(out_png)
    image = Path(os.path.relpath(out_png.resolve(), out_md.resolve().parent)).as_posix()

    lines = [
        "# GRPO on GSM8K: evaluation report",
        "",
        f"Models in pipeline order: {' → '.join(metrics_paths)}; baseline `{baseline}`. "
        "Strict accuracy scores the answer inside the `<answer>` tag, lenient accuracy the last "
        "number of the completion; format rate is the share of well-formed completions, "
        "truncation rate the share that hit the token cap (`eval.max_new_tokens`) before "
        'ending; "finished only" is the accuracy over the completions that ended, of the '
        "count given. Brackets hold 95% Wilson intervals; differences are in percentage "
        "points (pp).",
        "",
        "## Comparison",
        "",
        comparison_table(metrics, baseline),
        *(
            f"\n`{label}`: {reason}; not evaluated again, left out of the comparison."
            for label, reason in skipped.items()
        ),
        "",
        "## Sampling",
        "",
        *_sampling_section(metrics),
        "",
        "## Questions that changed",
        "",
        *_flips_section(predictions, baseline),
        "",
        "## Training curve",
        "",
        *_curve_section(Path(log_dir)),
        "",
        "## Plots",
        "",
        f"![evaluation and training curves]({image})",
        "",
    ]
    plot(Path(log_dir), metrics, out_png)
    atomic_write(out_md, lambda fh: fh.write("\n".join(lines)))
