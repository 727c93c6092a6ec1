"""The evaluate stage's results as the report and comparisons read them.

Owns the format of one evaluated model's outputs and reading them back with one-line
`UserError`s naming the file (missing, malformed, lacking a key, out of step with its partner).
No torch. Three files per model:

- metrics JSON, `metrics/<model>.json`, the DVC metric: only the headline, flat, in this order
  (`headline_keys`): `strict_accuracy`, `lenient_accuracy`, `format_rate`, `truncation_rate`,
  `n` (questions); with `num_samples` k > 1 also `pass@<k>` and `maj@<k>` (strict, for that k
  only) and `num_samples` (absent = 1). With k > 1 the three rates and the truncation rate are
  means over the n·k completions (strict accuracy = pass@1). Their 95% intervals are Wilson
  intervals over the n questions: `grpo.stats.wilson_interval(value * n, n)`.
- details JSON, `metrics/details/<model>.json` (`details_path`), a plain output: every metric,
  the headline's included, with `num_samples` and `temperature`: each rate with `_ci_low` /
  `_ci_high`, the accuracies over the completions that finished (`strict_accuracy_finished`,
  `lenient_accuracy_finished`, with intervals, over `n_finished` completions),
  `mean_completion_tokens`, `tokens_per_second`, `seconds`, and with k > 1 `pass@j`, `maj@j`,
  `lenient_pass@j`, `lenient_maj@j` for every j in 1..k with intervals (`sampled_keys`; pass@j
  with a percentile bootstrap interval over questions, maj@j with a Wilson interval).
- predictions JSONL: one row per question: `id`, `strict_correct`, `lenient_correct` (bools;
  with k > 1 the correctness of the majority answer, maj@k), `num_samples`,
  `strict_correct_count`, `lenient_correct_count`, and the graded completion (k = 1) or the
  first completion's text and every sample's graded fields (k > 1; see `grpo.evaluate`).
  Reading checks `PREDICTION_KEYS`.

A model the evaluate stage skipped (an unchanged copy of another) has `{"skipped": true,
"reason": ...}` as metrics and details and an empty predictions file.
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
HEADLINE_KEYS = ("strict_accuracy", "lenient_accuracy", "format_rate", "truncation_rate", "n")
# The accuracies over the completions that finished, with their display names.
FINISHED = {
    "strict_accuracy_finished": "strict accuracy, finished only",
    "lenient_accuracy_finished": "lenient accuracy, finished only",
}
DETAIL_KEYS = (
    "n",
    "num_samples",
    "temperature",
    *(
        f"{rate}{suffix}"
        for rate in (*RATES, "truncation_rate", *FINISHED)
        for suffix in ("", "_ci_low", "_ci_high")
    ),
    "n_finished",
    "mean_completion_tokens",
    "tokens_per_second",
    "seconds",
)
PREDICTION_KEYS = ("id", "strict_correct", "lenient_correct")  # what the report reads


def headline_keys(num_samples: int) -> tuple[str, ...]:
    """The keys of the metrics JSON, in order.

    >>> headline_keys(4)[4:]
    ('n', 'pass@4', 'maj@4', 'num_samples')
    """
    if num_samples == 1:
        return HEADLINE_KEYS
    return (*HEADLINE_KEYS, f"pass@{num_samples}", f"maj@{num_samples}", "num_samples")


def sampled_keys(num_samples: int) -> tuple[str, ...]:
    """The details keys of sampled evaluation (none for one sample per question).

    >>> sampled_keys(2)[:4]
    ('pass@1', 'pass@1_ci_low', 'pass@1_ci_high', 'maj@1')
    """
    if num_samples == 1:
        return ()
    return tuple(
        f"{prefix}{name}@{j}{suffix}"
        for prefix in ("", "lenient_")
        for j in range(1, num_samples + 1)
        for name in ("pass", "maj")
        for suffix in ("", "_ci_low", "_ci_high")
    )


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics JSON of a full set of metrics (`grpo.evaluate.summarize`)."""
    return {key: metrics[key] for key in headline_keys(metrics["num_samples"])}


def details_path(metrics_path: Path | str) -> Path:
    """Where the details of a metrics JSON live: `details/<same name>` beside it.

    >>> details_path("metrics/base.json").as_posix()
    'metrics/details/base.json'
    """
    path = Path(metrics_path)
    return path.parent / "details" / path.name


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


def _check_numbers(path: Path, obj: Mapping[str, Any], keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in obj]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}; {FIX}")
    wrong = [k for k in keys if type(obj[k]) not in (int, float)]  # bool is no number
    if wrong:
        raise UserError(f"{path}: {', '.join(wrong)} not a number; {FIX}")


def load_one(path: Path) -> dict[str, Any]:
    """The metrics of one evaluated model: its details JSON (`details_path`) checked against
    its metrics JSON, which must hold the same headline values.

    UserError naming the file when either is missing, is not JSON, lacks a key, or when the two
    disagree (one is left over from another run).
    """
    path = Path(path)
    top = _read_metrics_json(path)
    _check_numbers(path, top, HEADLINE_KEYS)
    k = top.get("num_samples", 1)
    if type(k) is not int or k < 1:
        raise UserError(f"{path}: num_samples must be a positive integer; {FIX}")
    _check_numbers(path, top, headline_keys(k))
    details = details_path(path)
    require(details, "details file")
    obj = _read_metrics_json(details)
    _check_numbers(details, obj, (*DETAIL_KEYS, *sampled_keys(k)))
    differ = [key for key in headline_keys(k) if obj.get(key) != top[key]]
    if differ:
        raise UserError(
            f"{details}: {', '.join(differ)} differ from {path} (left over from another run); {FIX}"
        )
    return obj


def load_metrics(paths: Mapping[str, Path]) -> pd.DataFrame:
    """One row per model label (index `model`, in the order of `paths`), one column per key of
    the details (`load_one`); models evaluated with fewer samples have NaN in the pass@k and
    maj@k columns of more samples."""
    rows = {label: load_one(Path(path)) for label, path in paths.items()}
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
