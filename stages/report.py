"""Stage `report`: compare the evaluated models and plot the training curves.

    python -m stages.report \
        --model base=metrics/base.json:metrics/predictions/base.jsonl \
        --model sft=metrics/sft.json:metrics/predictions/sft.jsonl \
        --model grpo=metrics/grpo.json:metrics/predictions/grpo.jsonl \
        --train-log dvclive --md metrics/report.md --png metrics/report.png \
        --plots metrics/accuracy.json

Each `--model` is `label=metrics_json:predictions_jsonl`; the order of the flags is the model
order and the first model is the baseline. Writes the Markdown report and the PNG it links to,
and with `--plots` the accuracy bars' data for `dvc plots` (`accuracy_rows`).
Reads no params (`--params` is accepted like in every stage, and ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grpo.errors import UserError
from grpo.fsutil import check_writable, write_json_atomic
from grpo.report import write_report
from stages import _cli

log = logging.getLogger(__name__)

_LABEL = re.compile(r"[A-Za-z0-9_.-]+")


def model_spec(text: str) -> tuple[str, Path, Path]:
    """Parse `label=metrics_path:predictions_path`.

    >>> label, metrics, predictions = model_spec("sft=metrics/sft.json:predictions/sft.jsonl")
    >>> label, metrics.as_posix(), predictions.as_posix()
    ('sft', 'metrics/sft.json', 'predictions/sft.jsonl')
    """
    label, sep, paths = text.partition("=")
    parts = paths.split(":")
    if not sep or not _LABEL.fullmatch(label) or len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected label=metrics.json:predictions.jsonl "
            "(label of letters, digits, '_', '.', '-')"
        )
    return label, Path(parts[0]), Path(parts[1])


PLOTTED = {"strict_accuracy": "strict", "lenient_accuracy": "lenient", "format_rate": "format"}


def accuracy_rows(metrics_paths: Mapping[str, Path]) -> list[dict[str, Any]]:
    """The data of `dvc plots`' accuracy bars: one row per evaluated model (in model order,
    skipped ones left out) with its strict / lenient / format accuracy in %."""
    rows = []
    for label, path in metrics_paths.items():
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
        if not metrics.get("skipped"):
            rows.append({"model": label, **{n: 100 * metrics[k] for k, n in PLOTTED.items()}})
    return rows


def main(args: argparse.Namespace) -> None:
    labels = [label for label, _, _ in args.model]
    if len(set(labels)) != len(labels):
        raise UserError(f"--model labels repeat ({', '.join(labels)}); give each model once")
    check_writable(args.md, args.png, *([args.plots] if args.plots else []))
    write_report(
        metrics_paths={label: metrics for label, metrics, _ in args.model},
        predictions_paths={label: predictions for label, _, predictions in args.model},
        log_dir=Path(args.train_log),
        out_md=Path(args.md),
        out_png=Path(args.png),
        baseline=labels[0],
    )
    if args.plots:
        write_json_atomic(args.plots, accuracy_rows({label: m for label, m, _ in args.model}))
    log.info("wrote %s and %s (models: %s)", args.md, args.png, ", ".join(labels))


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument(
        "--model",
        type=model_spec,
        action="append",
        required=True,
        metavar="LABEL=METRICS:PREDICTIONS",
        help="one evaluated model; repeat in model order, the first is the baseline",
    )
    p.add_argument("--train-log", required=True, help="DVCLive folder of the train stage")
    p.add_argument("--md", required=True, help="Markdown report to write")
    p.add_argument("--png", required=True, help="PNG of the plots to write")
    p.add_argument("--plots", help="JSON rows of accuracy per model for `dvc plots` (optional)")
    _cli.run("report", main, p.parse_args())
