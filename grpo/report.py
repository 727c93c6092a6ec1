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

import io
import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grpo.errors import UserError
from grpo.fsutil import atomic_write, read_jsonl

FIX = "run dvc repro"

# The proportions of a metrics JSON that carry a 95% interval, with their display names.
RATES = {
    "strict_accuracy": "strict accuracy",
    "lenient_accuracy": "lenient accuracy",
    "format_rate": "format rate",
}
METRIC_KEYS = (
    "n",
    *(f"{rate}{suffix}" for rate in RATES for suffix in ("", "_ci_low", "_ci_high")),
    "mean_completion_tokens",
    "truncation_rate",
)
PREDICTION_KEYS = ("id", "strict_correct", "lenient_correct")

# DVCLive step metrics the plot draws, when the training log has them.
REWARD_CURVES = {
    "reward/mean": "total",
    "reward/correctness": "correctness",
    "reward/format": "format",
}
REWARD_COLORS = ("C0", "C1", "C2")
LENGTH_CURVE = "completion/mean_length"
CURVES = (*REWARD_CURVES, LENGTH_CURVE, "kl", "loss")
# A curve with at least this many steps also gets a rolling mean (raw values drawn faint).
ROLLING_MIN_STEPS = 20
EXAMPLES = 10


def _require(path: Path, what: str) -> None:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; {FIX}")


# --- metrics -------------------------------------------------------------------------------


def _read_metrics_json(path: Path) -> dict[str, Any]:
    _require(path, "metrics file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON ({err.msg}, line {err.lineno}); {FIX}") from err
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object; {FIX}")
    return obj


def skipped_reason(path: Path) -> str | None:
    """Why a model was not evaluated, when its metrics JSON says it was skipped (the evaluate
    stage skips a model that is an unchanged copy of another, e.g. `models/sft` with SFT
    disabled); None for an evaluated model."""
    obj = _read_metrics_json(Path(path))
    if not obj.get("skipped"):
        return None
    return str(obj.get("reason", "not evaluated"))


def load_metrics(paths: Mapping[str, Path]) -> pd.DataFrame:
    """One row per model label (index `model`, in the order of `paths`), one column per key.

    UserError naming the file when it is missing, is not JSON, or lacks a key the report needs.
    """
    rows = {}
    for label, path in paths.items():
        path = Path(path)
        obj = _read_metrics_json(path)
        missing = [key for key in METRIC_KEYS if key not in obj]
        if missing:
            raise UserError(f"{path}: missing key(s) {', '.join(missing)}; {FIX}")
        wrong = [k for k in METRIC_KEYS if type(obj[k]) not in (int, float)]  # bool is no number
        if wrong:
            raise UserError(f"{path}: {', '.join(wrong)} not a number; {FIX}")
        rows[label] = obj
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "model"
    return frame


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


def comparison_table(metrics: pd.DataFrame, baseline: str) -> str:
    """Markdown table: one column per model (value and 95% interval) and one per comparison
    (each model minus the baseline, and minus the model before it), deltas in percentage points.

    >>> m = {"n": 100, "mean_completion_tokens": 150.0, "truncation_rate": 0.4}
    >>> for rate, value in [("strict_accuracy", 0.1), ("lenient_accuracy", 0.2),
    ...                     ("format_rate", 0.5)]:
    ...     m |= {rate: value, f"{rate}_ci_low": value - 0.05, f"{rate}_ci_high": value + 0.05}
    >>> frame = pd.DataFrame([m, m | {"strict_accuracy": 0.25}], index=["base", "grpo"])
    >>> print(comparison_table(frame, "base").splitlines()[2])
    | strict accuracy (%) | 10.0 [5.0, 15.0] | 25.0 [5.0, 15.0] | +15.0 pp |
    """
    labels = list(metrics.index)
    if baseline not in labels:
        raise UserError(f"baseline {baseline!r} is not one of the models ({', '.join(labels)})")
    pairs = _comparisons(labels, baseline)
    header = ["metric", *labels, *(f"{b} − {a}" for a, b in pairs)]
    rows = []
    for rate, name in RATES.items():
        cells = [
            f"{_pct(m[rate])} [{_pct(m[f'{rate}_ci_low'])}, {_pct(m[f'{rate}_ci_high'])}]"
            for _, m in metrics.iterrows()
        ]
        deltas = [
            _delta(100 * (metrics.at[b, rate] - metrics.at[a, rate]), " pp") for a, b in pairs
        ]
        rows.append([f"{name} (%)", *cells, *deltas])
    tokens = metrics["mean_completion_tokens"]
    rows.append(
        [
            "mean completion tokens",
            *(f"{v:.1f}" for v in tokens),
            *(_delta(tokens[b] - tokens[a], "") for a, b in pairs),
        ]
    )
    trunc = metrics["truncation_rate"]
    rows.append(
        [
            "truncation rate (%)",
            *(_pct(v) for v in trunc),
            *(_delta(100 * (trunc[b] - trunc[a]), " pp") for a, b in pairs),
        ]
    )
    rows.append(["questions", *(str(int(v)) for v in metrics["n"]), *([""] * len(pairs))])
    return _markdown_table(header, rows)


# --- predictions ---------------------------------------------------------------------------


def load_predictions(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    """The rows of a predictions JSONL; UserError when missing, malformed, or (given `n`, the
    metrics' question count) of another length."""
    path = Path(path)
    _require(path, "predictions file")
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        missing = [key for key in PREDICTION_KEYS if key not in row]
        if missing:
            raise UserError(f"{path}: row {lineno} lacks {', '.join(missing)}; {FIX}")
    if n is not None and len(rows) != n:
        raise UserError(f"{path}: {len(rows)} rows but its metrics say n={n}; {FIX}")
    return rows


def _by_id(rows: Sequence[Mapping[str, Any]], key: str, name: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for row in rows:
        qid, value = row["id"], row[key]
        if qid in out:
            raise UserError(f"predictions of {name}: question id {qid} appears twice; {FIX}")
        if not isinstance(value, bool):
            raise UserError(f"predictions of {name}: {key} of {qid} is not true/false; {FIX}")
        out[qid] = value
    return out


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for `b` and `c` discordant pairs (binomial, p=1/2).

    >>> mcnemar_p(0, 0), mcnemar_p(5, 5), round(mcnemar_p(10, 1), 4)
    (1.0, 1.0, 0.0117)
    """
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def flips(
    pred_a: Sequence[Mapping[str, Any]],
    pred_b: Sequence[Mapping[str, Any]],
    key: str = "strict_correct",
    *,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, Any]:
    """Questions whose `key` changed from model a to model b, joined on question id.

    Ids are listed in the order of `pred_a`; `mcnemar_p` tests whether the two models differ.
    Different id sets (or a repeated id) are a UserError; `names` label the models in it.

    >>> a = [{"id": "q1", "ok": False}, {"id": "q2", "ok": True}, {"id": "q3", "ok": False}]
    >>> b = [{"id": "q3", "ok": True}, {"id": "q2", "ok": False}, {"id": "q1", "ok": True}]
    >>> f = flips(a, b, key="ok")
    >>> f["wrong_to_right"], f["right_to_wrong"], f["n_wrong_to_right"], f["n_right_to_wrong"]
    (['q1', 'q3'], ['q2'], 2, 1)
    """
    a, b = _by_id(pred_a, key, names[0]), _by_id(pred_b, key, names[1])
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        example = (only_a or only_b)[0]
        raise UserError(
            f"predictions of {names[0]} and {names[1]} cover different questions "
            f"({len(only_a)} only in {names[0]}, {len(only_b)} only in {names[1]}, "
            f"e.g. {example}); evaluate both on the same eval set ({FIX})"
        )
    up = [qid for qid in a if not a[qid] and b[qid]]
    down = [qid for qid in a if a[qid] and not b[qid]]
    return {
        "key": key,
        "n": len(a),
        "wrong_to_right": up,
        "right_to_wrong": down,
        "n_wrong_to_right": len(up),
        "n_right_to_wrong": len(down),
        "both_right": sum(a[qid] and b[qid] for qid in a),
        "both_wrong": sum(not a[qid] and not b[qid] for qid in a),
        "mcnemar_p": mcnemar_p(len(up), len(down)),
    }


def _flip_pairs(labels: Sequence[str], baseline: str) -> list[tuple[str, str]]:
    """Consecutive models, then baseline → last model when that is not already listed.

    >>> _flip_pairs(["base", "sft", "grpo"], "base")
    [('base', 'sft'), ('sft', 'grpo'), ('base', 'grpo')]
    >>> _flip_pairs(["base", "grpo"], "base")
    [('base', 'grpo')]
    """
    pairs = list(itertools.pairwise(labels))
    last = (baseline, labels[-1])
    if baseline != labels[-1] and last not in pairs:
        pairs.append(last)
    return pairs


# --- training curves -----------------------------------------------------------------------


def read_curve(log_dir: Path, name: str) -> pd.DataFrame | None:
    """Columns `step`, `value` of DVCLive metric `name` (e.g. "reward/mean"), sorted by step.

    None when the file is absent or has no rows. A repeated step (a resumed run logs it again)
    keeps its last value. A file without the `step` column or the metric's column is a UserError.
    """
    path = Path(log_dir) / "plots" / "metrics" / f"{name}.tsv"
    if not path.is_file():
        return None
    column = name.rsplit("/", 1)[-1]
    try:
        frame = pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError:
        return None
    except pd.errors.ParserError as err:
        raise UserError(f"{path}: malformed TSV ({err}); {FIX}") from err
    if "step" not in frame.columns or column not in frame.columns:
        raise UserError(f"{path}: expected columns 'step' and {column!r}; {FIX}")
    frame = frame[["step", column]].rename(columns={column: "value"})
    try:
        frame = frame.apply(pd.to_numeric)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path}: non-numeric values ({err}); {FIX}") from err
    frame = frame.dropna().drop_duplicates("step", keep="last").sort_values("step")
    return frame.reset_index(drop=True) if len(frame) else None


def missing_curves(log_dir: Path) -> list[str]:
    """The names in CURVES that the training log lacks (or has no rows for)."""
    return [name for name in CURVES if read_curve(log_dir, name) is None]


def curve_summary(log_dir: Path) -> dict[str, Any]:
    """First/last step of `reward/mean` and its mean over the first and last quarter of the
    logged steps (a quarter is max(1, n // 4) steps); empty when the log has no such curve.
    """
    curve = read_curve(log_dir, "reward/mean")
    if curve is None:
        return {}
    quarter = max(1, len(curve) // 4)
    first, last = curve["value"].iloc[:quarter].mean(), curve["value"].iloc[-quarter:].mean()
    return {
        "metric": "reward/mean",
        "steps": len(curve),
        "first_step": int(curve["step"].iloc[0]),
        "last_step": int(curve["step"].iloc[-1]),
        "quarter_steps": quarter,
        "first_quarter_mean": float(first),
        "last_quarter_mean": float(last),
        "change": float(last - first),
    }


# --- plot ----------------------------------------------------------------------------------


def _draw_curve(ax: Axes, curve: pd.DataFrame, label: str, color: str) -> None:
    """The curve; with many steps, faint raw values under a centred rolling mean."""
    if len(curve) < ROLLING_MIN_STEPS:
        ax.plot(curve["step"], curve["value"], color=color, label=label, marker=".")
        return
    window = max(5, len(curve) // 20)
    smooth = curve["value"].rolling(window, min_periods=1, center=True).mean()
    ax.plot(curve["step"], curve["value"], color=color, alpha=0.25, linewidth=0.8)
    ax.plot(curve["step"], smooth, color=color, label=f"{label} (mean of {window} steps)")


def _no_data(ax: Axes, names: Sequence[str]) -> None:
    ax.text(
        0.5,
        0.5,
        "not logged: " + ", ".join(names),
        ha="center",
        va="center",
        transform=ax.transAxes,
    )


def _accuracy_panel(ax: Axes, metrics: pd.DataFrame) -> None:
    """Grouped bars: one group per rate, one bar per model, 95% intervals as error bars."""
    width = 0.8 / len(metrics)
    for i, (label, m) in enumerate(metrics.iterrows()):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(RATES))]
        values = [100 * m[rate] for rate in RATES]
        # Clipped at 0: matplotlib rejects negative lengths (float noise at 0% or 100%).
        lows = [max(0.0, 100 * (m[rate] - m[f"{rate}_ci_low"])) for rate in RATES]
        highs = [max(0.0, 100 * (m[f"{rate}_ci_high"] - m[rate])) for rate in RATES]
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=3, label=str(label))
    ax.set_xticks(range(len(RATES)), list(RATES.values()))
    ax.set_ylabel("% of eval questions")
    ax.set_ylim(0, 105)
    ax.set_title("Evaluation (95% intervals)")
    ax.legend()


def plot(log_dir: Path, metrics: pd.DataFrame, out_png: Path) -> None:
    """One PNG, four panels: accuracies and format rate per model with their 95% intervals;
    reward over steps (total and components); completion length over steps; KL and loss.
    Curves missing from the training log are left out. Written atomically."""
    fig = Figure(figsize=(13, 9), layout="constrained")
    FigureCanvasAgg(fig)
    (acc_ax, reward_ax), (length_ax, kl_ax) = fig.subplots(2, 2)
    _accuracy_panel(acc_ax, metrics)

    present = {name: read_curve(log_dir, name) for name in CURVES}
    for (name, label), color in zip(REWARD_CURVES.items(), REWARD_COLORS, strict=True):
        curve = present[name]
        if curve is not None:
            _draw_curve(reward_ax, curve, label, color)
    reward_ax.set_title("Reward per step")
    if any(present[name] is not None for name in REWARD_CURVES):
        reward_ax.legend()
    else:
        _no_data(reward_ax, list(REWARD_CURVES))

    curve = present[LENGTH_CURVE]
    length_ax.set_title("Mean completion length per step")
    length_ax.set_ylabel("tokens")
    if curve is not None:
        _draw_curve(length_ax, curve, "mean length", "C3")
        length_ax.legend()
    else:
        _no_data(length_ax, [LENGTH_CURVE])

    # KL and loss differ in scale by orders of magnitude: one y-axis each.
    kl_ax.set_title("KL to reference (left) and loss (right)")
    kl, loss = present["kl"], present["loss"]
    if kl is not None:
        _draw_curve(kl_ax, kl, "kl", "C4")
        kl_ax.set_ylabel("kl")
    if loss is not None:
        loss_ax = kl_ax.twinx()
        _draw_curve(loss_ax, loss, "loss", "C5")
        loss_ax.set_ylabel("loss")
        # One legend for both axes, on the top axes so the loss line does not hide it.
        handles, labels = kl_ax.get_legend_handles_labels()
        loss_handles, loss_labels = loss_ax.get_legend_handles_labels()
        loss_ax.legend(handles + loss_handles, labels + loss_labels)
    elif kl is not None:
        kl_ax.legend()
    else:
        _no_data(kl_ax, ["kl", "loss"])

    for ax in (reward_ax, length_ax, kl_ax):
        ax.set_xlabel("step")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write(Path(out_png), lambda fh: fh.write(buffer.getvalue()), binary=True)


# --- report --------------------------------------------------------------------------------


def _flips_section(predictions: Mapping[str, list[dict[str, Any]]], baseline: str) -> list[str]:
    labels = list(predictions)
    pairs = _flip_pairs(labels, baseline)
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
        _require(Path(metrics_paths[label]), "metrics file")
        _require(Path(predictions_paths[label]), "predictions file")
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
        "number of the completion; format rate is the share of well-formed completions. "
        "Brackets hold 95% Wilson intervals; differences are in percentage points (pp).",
        "",
        "## Comparison",
        "",
        comparison_table(metrics, baseline),
        *(
            f"\n`{label}`: {reason}; not evaluated again, left out of the comparison."
            for label, reason in skipped.items()
        ),
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
