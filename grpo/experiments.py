"""The experiments of a DVC repo as `dvc exp show --json` describes them, grouped into configs.

Owns reading that JSON (DVC 3.x: a list of baseline commits, the first the workspace, each with
its `experiments`, each a range of `revs` carrying `params` and `metrics` per file) into one
`Experiment` per run: its params flattened to dotted keys, the headline metrics of each
evaluated model (`metrics/<model>.json`, only the keys of `HEADLINE_KEYS`), and the train
stage's run summary (`metrics/train.json`). Also owns what makes two runs the same config: equal
params once the seed keys (`SEED_KEY`: `train.seed`, `data.seed`, any `*.seed`) are set aside.
Plain Python, no torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from dvc.exceptions import DvcException

from grpo.errors import UserError

PARAMS_FILE = "params.yaml"
SEED_KEY = re.compile(r"(^|\.)seed$")
RATE_KEYS = ("strict_accuracy", "lenient_accuracy", "format_rate")
HEADLINE_KEYS = (*RATE_KEYS, "truncation_rate", "n")
TRAIN_SUMMARY = "metrics/train.json"
PREDICTIONS = "metrics/predictions/{model}.jsonl"
FIX = "run it in the repo root with DVC 3 (`dvc exp show --json`)"


@dataclass(frozen=True)
class Experiment:
    """One run: the workspace, a baseline commit, or a `dvc exp` experiment."""

    name: str
    rev: str  # a commit sha, or "workspace"
    kind: str  # workspace | baseline | experiment
    status: str  # success | queued | running | failed | ... (DVC's executor state)
    baseline: str  # sha of the commit it derives from (its own for a baseline)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> HEADLINE_KEYS
    skipped: dict[str, str] = field(default_factory=dict)  # model -> why it was not evaluated
    train: dict[str, float] = field(default_factory=dict)

    @property
    def seeds(self) -> tuple[tuple[str, str], ...]:
        """The run's seed keys and values, the identity of a run within its config."""
        return tuple((k, _text(v)) for k, v in sorted(self.params.items()) if SEED_KEY.search(k))

    def same_run(self, other: Experiment) -> bool:
        return (self.params, self.metrics, self.skipped) == (
            other.params,
            other.metrics,
            other.skipped,
        )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists stay values.

    >>> flatten({"train": {"seed": 0, "lr": 1e-3}, "model": {"targets": ["q", "k"]}})
    {'train.seed': 0, 'train.lr': 0.001, 'model.targets': ['q', 'k']}
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _text(value: Any) -> str:
    """A param value as the user writes it after `-S key=`.

    >>> _text(2e-05), _text(True), _text(None), _text("strict"), _text(["q", "k"])
    ('2e-05', 'true', 'null', 'strict', '["q", "k"]')
    """
    return value if isinstance(value, str) else json.dumps(value)


def params_diff(params: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, str]:
    """The keys whose value differs from `base`, as text (`<absent>` for a removed key).

    >>> params_diff({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 0})
    {'b': '2', 'c': '3', 'd': '<absent>'}
    """
    keys = sorted(params.keys() | base.keys(), key=lambda k: (k not in params, k))
    return {
        k: _text(params[k]) if k in params else "<absent>"
        for k in keys
        if k not in params or k not in base or params[k] != base[k]
    }


def config_label(params: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    """The non-seed params that differ from the baseline, `k=v` joined by spaces; `baseline`
    when none do.

    >>> config_label({"train.seed": 1, "train.lr": 2e-05}, {"train.seed": 0, "train.lr": 1e-3})
    'train.lr=2e-05'
    >>> config_label({"train.seed": 1}, {"train.seed": 0})
    'baseline'
    """
    diff = {k: v for k, v in params_diff(params, base).items() if not SEED_KEY.search(k)}
    return " ".join(f"{k}={v}" for k, v in diff.items()) or "baseline"


def _file_data(files: Any, where: str) -> dict[str, Any]:
    """{path: parsed contents} of the files of one `params` or `metrics` entry; files DVC could
    not read (`{"error": ...}`, e.g. metrics never committed) are left out."""
    if not isinstance(files, Mapping):
        raise UserError(f"dvc exp show --json: {where} is not an object; {FIX}")
    return {
        path: entry["data"]
        for path, entry in files.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("data"), Mapping)
    }


def _experiment(state: Mapping[str, Any], kind: str, name: str, status: str, base: str):
    data = state.get("data")
    rev = str(state.get("rev", ""))
    if not isinstance(data, Mapping):
        return Experiment(name, rev, kind, status if state.get("error") is None else "failed", base)
    params = {}
    for path, tree in _file_data(data.get("params", {}), f"{name}: params").items():
        prefix = "" if path == PARAMS_FILE else f"{path}:"
        params |= flatten(tree, prefix)
    metrics, skipped, train = {}, {}, {}
    # a queued, running or failed run's files are not its results
    results = data.get("metrics", {}) if status == "success" else {}
    for path, values in _file_data(results, f"{name}: metrics").items():
        model = PurePosixPath(path).stem
        if path == TRAIN_SUMMARY:
            train = {k: v for k, v in values.items() if isinstance(v, int | float)}
        elif values.get("skipped"):
            skipped[model] = str(values.get("reason", "not evaluated"))
        elif all(isinstance(values.get(k), int | float) for k in HEADLINE_KEYS):
            metrics[model] = {k: values[k] for k in HEADLINE_KEYS}
    return Experiment(name, rev, kind, status, base, params, metrics, skipped, train)


def parse_exp_show(rows: Any) -> list[Experiment]:
    """The runs of `dvc exp show --json` output: baselines in order, each followed by its
    experiments oldest first (metrics only for finished ones). The workspace is kept only when
    it is not a copy of another run (after `dvc exp run` it holds the last experiment's results)."""
    if not isinstance(rows, list):
        raise UserError(f"dvc exp show --json: expected a list of commits; {FIX}")
    runs: list[Experiment] = []
    workspace = None
    for row in rows:
        if not isinstance(row, Mapping) or "rev" not in row:
            raise UserError(f"dvc exp show --json: a commit without `rev`; {FIX}")
        if row["rev"] == "workspace":
            workspace = _experiment(row, "workspace", "workspace", "success", "workspace")
            continue
        sha = str(row["rev"])
        runs.append(_experiment(row, "baseline", str(row.get("name") or sha[:7]), "success", sha))
        exps = []
        for exp in reversed(row.get("experiments") or []):  # DVC lists the newest first
            revs = exp.get("revs") or []
            if not revs:
                continue
            executor = exp.get("executor") or {}
            status = str(executor.get("state") or "success")
            name = str(exp.get("name") or revs[0].get("name") or str(revs[0].get("rev"))[:7])
            created = str((revs[0].get("data") or {}).get("timestamp") or "")
            exps.append((created, _experiment(revs[0], "experiment", name, status, sha)))
        runs += [run for _, run in sorted(exps, key=lambda pair: pair[0])]
    if workspace is not None:
        if runs and workspace.baseline == "workspace":
            workspace = replace(workspace, baseline=runs[0].baseline)
        if not any(workspace.same_run(run) for run in runs):
            runs.insert(0, workspace)
    return runs


def baseline_params(runs: Sequence[Experiment], run: Experiment) -> dict[str, Any]:
    """The params of the commit `run` derives from (the workspace's own when none is listed)."""
    for other in runs:
        if other.kind == "baseline" and other.rev == run.baseline:
            return other.params
    return run.params


def exp_show(root: Path) -> Any:
    """The parsed output of `dvc exp show --json` run in `root` (the DVC of this Python)."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"{root}: `dvc exp show --json` failed ({last}); {FIX}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{root}: `dvc exp show --json` printed no JSON ({err.msg}); {FIX}"
        ) from err


def read_predictions(root: Path, run: Experiment, model: str) -> list[dict[str, Any]]:
    """The predictions JSONL of `model` in `run`: the workspace's file, or the DVC-cached one of
    a commit or experiment (read through its dvc.lock, so queued runs' temporary workspaces are
    not needed)."""
    path = PREDICTIONS.format(model=model)
    try:
        if run.kind == "workspace":
            text = (root / path).read_text(encoding="utf-8")
        else:
            import dvc.api  # seconds to import: only the paired test needs it

            text = dvc.api.read(path, repo=str(root), rev=run.rev, encoding="utf-8")
    except (OSError, DvcException) as err:
        raise UserError(
            f"{path} of {run.name} ({run.rev[:7]}): cannot read ({type(err).__name__}: {err}); "
            "`dvc exp apply` it and `dvc repro`, or `dvc pull` its outputs"
        ) from err
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path} of {run.name}: line {lineno} is not JSON ({err.msg})") from err
    return rows
