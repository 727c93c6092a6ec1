"""The evaluate stage's results as the report and comparisons read them.

Owns the format of one evaluated model's outputs, a metrics JSON (`METRIC_KEYS`: the rates of
`RATES` with their 95% intervals, completion length and truncation) and a predictions JSONL
(`PREDICTION_KEYS` per question), and reading them back with one-line `UserError`s naming the
file: missing, malformed, or lacking a key. No torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from grpo.errors import UserError
from grpo.fsutil import read_jsonl

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


def require(path: Path, what: str) -> None:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; {FIX}")


def _read_metrics_json(path: Path) -> dict[str, Any]:
    require(path, "metrics file")
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


def load_predictions(path: Path, n: int | None = None) -> list[dict[str, Any]]:
    """The rows of a predictions JSONL; UserError when missing, malformed, or (given `n`, the
    metrics' question count) of another length."""
    path = Path(path)
    require(path, "predictions file")
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        missing = [key for key in PREDICTION_KEYS if key not in row]
        if missing:
            raise UserError(f"{path}: row {lineno} lacks {', '.join(missing)}; {FIX}")
    if n is not None and len(rows) != n:
        raise UserError(f"{path}: {len(rows)} rows but its metrics say n={n}; {FIX}")
    return rows


def by_id(rows: Sequence[Mapping[str, Any]], key: str, name: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for row in rows:
        qid, value = row["id"], row[key]
        if qid in out:
            raise UserError(f"predictions of {name}: question id {qid} appears twice; {FIX}")
        if not isinstance(value, bool):
            raise UserError(f"predictions of {name}: {key} of {qid} is not true/false; {FIX}")
        out[qid] = value
    return out
