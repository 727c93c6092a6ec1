"""The report's figure and the training curves it draws, read from the DVCLive log.

Owns how the `train` stage's step metrics (DVCLive TSVs) are read (`read_curve`, with one-line
errors for malformed files) and summarised (`curve_summary`), and the one PNG of the report:
accuracies and truncation per model with their intervals, reward, completion length, KL and
loss per step. Plain pandas and matplotlib (Agg canvas, no pyplot state); no torch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from grpo.errors import UserError
from grpo.eval_results import FIX, RATES
from grpo.fsutil import atomic_write

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
    """Grouped bars: one group per rate (the truncation rate last), one bar per model, 95%
    intervals as error bars."""
    rates = RATES | {"truncation_rate": "truncation rate"}
    width = 0.8 / len(metrics)
    for i, (label, m) in enumerate(metrics.iterrows()):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(rates))]
        values = [100 * m[rate] for rate in rates]
        # Clipped at 0: matplotlib rejects negative lengths (float noise at 0% or 100%).
        lows = [max(0.0, 100 * (m[rate] - m[f"{rate}_ci_low"])) for rate in rates]
        highs = [max(0.0, 100 * (m[f"{rate}_ci_high"] - m[rate])) for rate in rates]
        ax.bar(xs, values, width, yerr=[lows, highs], capsize=3, label=str(label))
    ax.set_xticks(range(len(rates)), list(rates.values()))
    ax.set_ylabel("% of eval questions")
    ax.set_ylim(0, 105)
    ax.set_title("Evaluation (95% intervals)")
    ax.legend()


def plot(log_dir: Path, metrics: pd.DataFrame, out_png: Path) -> None:
    """One PNG, four panels: accuracies, format and truncation rate per model with their 95%
    intervals; reward over steps (total and components); completion length over steps; KL and
    loss. Curves missing from the training log are left out. Written atomically."""
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
