"""The report: comparison table, flips, reward-curve summary, atomic outputs, tolerated missing
curves, user errors for missing inputs, and the stage CLI, on small hand-made files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grpo import eval_results, report
from grpo.errors import UserError
from grpo.stats import wilson_interval

REPO = Path(__file__).resolve().parent.parent
IDS = [f"test-{i:05d}" for i in range(8)]
# Strict correctness per model, one entry per id in IDS.
STRICT = {
    "base": [0, 0, 0, 0, 1, 1, 0, 0],
    "sft": [1, 0, 0, 1, 1, 0, 0, 0],
    "grpo": [1, 1, 1, 1, 0, 0, 1, 0],
}


def metrics_for(strict: float, lenient: float, fmt: float, tokens: float, trunc: float) -> dict:
    """The details of one greedy evaluation of IDS (every key `grpo.evaluate.summarize` gives)."""
    out: dict = {"n": len(IDS), "num_samples": 1, "temperature": 0.0}
    for rate, value in (("strict_accuracy", strict), ("lenient_accuracy", lenient)):
        out |= {rate: value, f"{rate}_ci_low": value / 2, f"{rate}_ci_high": (1 + value) / 2}
    out |= {"format_rate": fmt, "format_rate_ci_low": fmt / 2, "format_rate_ci_high": 1.0}
    lo, hi = wilson_interval(trunc * len(IDS), len(IDS))
    out |= {"truncation_rate": trunc, "truncation_rate_ci_low": lo, "truncation_rate_ci_high": hi}
    finished = round((1 - trunc) * len(IDS))
    out["n_finished"] = finished
    for rate, value in (("strict", strict), ("lenient", lenient)):
        key = f"{rate}_accuracy_finished"
        out |= {key: value * 1.5, f"{key}_ci_low": value, f"{key}_ci_high": 1.0}
    return out | {"mean_completion_tokens": tokens, "tokens_per_second": 90.1, "seconds": 200.0}


METRICS = {
    "base": metrics_for(0.02, 0.25, 0.1, 150.2, 0.4),
    "sft": metrics_for(0.375, 0.5, 0.875, 120.0, 0.125),
    "grpo": metrics_for(0.625, 0.7, 1.0, 80.4, 0.0),
}


def write_inputs(root: Path, labels=("base", "sft", "grpo")) -> tuple[dict, dict]:
    metrics_paths, predictions_paths = {}, {}
    for label in labels:
        metrics_paths[label] = root / "metrics" / f"{label}.json"
        predictions_paths[label] = root / "metrics" / "predictions" / f"{label}.jsonl"
        predictions_paths[label].parent.mkdir(parents=True, exist_ok=True)
        metrics_paths[label].write_text(json.dumps(eval_results.headline(METRICS[label])))
        details = eval_results.details_path(metrics_paths[label])
        details.parent.mkdir(parents=True, exist_ok=True)
        details.write_text(json.dumps(METRICS[label]))
        rows = [
            {
                "id": qid,
                "gold": "18",
                "completion": "<answer>18</answer>",
                "strict_answer": "18" if ok else None,
                "lenient_answer": "18",
                "strict_correct": bool(ok),
                "lenient_correct": True,
                "well_formed": bool(ok),
                "completion_tokens": 57,
                "truncated": False,
            }
            for qid, ok in zip(IDS, STRICT[label], strict=True)
        ]
        predictions_paths[label].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return metrics_paths, predictions_paths


def write_curve(log_dir: Path, name: str, steps, values, timestamp: bool = False) -> None:
    path = log_dir / "plots" / "metrics" / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    column = name.rsplit("/", 1)[-1]
    header = ["timestamp", "step", column] if timestamp else ["step", column]
    lines = ["\t".join(header)]
    for step, value in zip(steps, values, strict=True):
        row = [str(1700000000000 + step), str(step), str(value)] if timestamp else [step, value]
        lines.append("\t".join(map(str, row)))
    path.write_text("\n".join(lines) + "\n")


def write_log(log_dir: Path, n: int = 8) -> None:
    steps = range(1, n + 1)
    write_curve(log_dir, "reward/mean", steps, [0.1 * s for s in steps], timestamp=True)
    write_curve(log_dir, "reward/correctness", steps, [0.05 * s for s in steps])
    write_curve(log_dir, "reward/format", steps, [0.05 * s for s in steps])
    write_curve(log_dir, "completion/mean_length", steps, [200 - s for s in steps])
    write_curve(log_dir, "kl", steps, [0.001 * s for s in steps])
    write_curve(log_dir, "loss", steps, [0.0] * n)


def table_rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in table.splitlines()]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_comparison_table_values_intervals_and_deltas(tmp_path):
    metrics_paths, _ = write_inputs(tmp_path)
    metrics = eval_results.load_metrics(metrics_paths)
    assert list(metrics.index) == ["base", "sft", "grpo"]
    rows = table_rows(report.comparison_table(metrics, "base"))
    assert rows["metric"] == ["base", "sft", "grpo", "sft − base", "grpo − base", "grpo − sft"]
    assert rows["strict accuracy (%)"] == [
        "2.0 [1.0, 51.0]",
        "37.5 [18.8, 68.8]",
        "62.5 [31.2, 81.2]",
        "+35.5 pp",
        "+60.5 pp",
        "+25.0 pp",
    ]
    assert rows["lenient accuracy (%)"][3:] == ["+25.0 pp", "+45.0 pp", "+20.0 pp"]
    assert rows["format rate (%)"][:3] == [
        "10.0 [5.0, 100.0]",
        "87.5 [43.8, 100.0]",
        "100.0 [50.0, 100.0]",
    ]
    assert rows["mean completion tokens"] == ["150.2", "120.0", "80.4", "-30.2", "-69.8", "-39.6"]
    assert rows["truncation rate (%)"] == [
        "40.0 [15.2, 71.3]",  # Wilson: 3.2 of 8 questions
        "12.5 [2.2, 47.1]",
        "0.0 [0.0, 32.4]",
        "-27.5 pp",
        "-40.0 pp",
        "-12.5 pp",
    ]
    # beside each accuracy: the accuracy over the completions that finished, and their count
    assert rows["strict accuracy, finished only (%)"] == [
        "3.0 [2.0, 100.0] of 5",
        "56.2 [37.5, 100.0] of 7",
        "93.8 [62.5, 100.0] of 8",
        "+53.2 pp",
        "+90.8 pp",
        "+37.5 pp",
    ]
    assert rows["lenient accuracy, finished only (%)"][0] == "37.5 [25.0, 100.0] of 5"
    names = list(rows)
    assert (
        names.index("strict accuracy, finished only (%)") == names.index("strict accuracy (%)") + 1
    )
    assert "completions per question" not in rows  # greedy: no sampling row
    assert rows["questions"][:3] == ["8", "8", "8"]


def test_comparison_table_two_models_and_unknown_baseline(tmp_path):
    metrics_paths, _ = write_inputs(tmp_path, labels=("base", "grpo"))
    metrics = eval_results.load_metrics(metrics_paths)
    rows = table_rows(report.comparison_table(metrics, "base"))
    assert rows["metric"] == ["base", "grpo", "grpo − base"]
    with pytest.raises(UserError, match="baseline 'sft'"):
        report.comparison_table(metrics, "sft")


def test_write_report_outputs_and_no_temp_files(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    log_dir = tmp_path / "dvclive"
    write_log(log_dir, n=40)  # enough steps for the rolling mean
    out_md, out_png = tmp_path / "metrics" / "report.md", tmp_path / "metrics" / "report.png"
    out_md.write_text("stale")
    report.write_report(metrics_paths, predictions_paths, log_dir, out_md, out_png)

    text = out_md.read_text()
    assert text.startswith("# ")
    assert "| strict accuracy (%) | 2.0 [1.0, 51.0] |" in text
    assert "| sft → grpo | strict | 3 | 1 | +2 |" in text
    assert "### base → grpo (strict)" in text  # baseline vs last model, after consecutive pairs
    assert "- wrong → right (3): `test-00001`, `test-00002`, `test-00006`" in text
    assert "over 40 logged steps (1–40)" in text and "change +3.000" in text
    assert "![evaluation and training curves](report.png)" in text
    assert "Not in the training log" not in text
    assert out_png.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in out_md.parent.iterdir()) == [
        "base.json",
        "details",
        "grpo.json",
        "predictions",
        "report.md",
        "report.png",
        "sft.json",
    ]


def test_image_link_is_relative_to_the_markdown(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path, labels=("base", "grpo"))
    out_md, out_png = tmp_path / "docs" / "report.md", tmp_path / "figures" / "plots.png"
    report.write_report(metrics_paths, predictions_paths, tmp_path / "log", out_md, out_png)
    assert "](../figures/plots.png)" in out_md.read_text()
    assert out_png.is_file()


def test_missing_curves_are_tolerated_and_named(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    log_dir = tmp_path / "dvclive"
    write_curve(log_dir, "completion/mean_length", [1, 2], [100.0, 90.0])
    write_curve(log_dir, "kl", [], [])  # header only: no rows
    out_md, out_png = tmp_path / "report.md", tmp_path / "report.png"
    report.write_report(metrics_paths, predictions_paths, log_dir, out_md, out_png)
    text = out_md.read_text()
    assert "No `reward/mean` curve" in text
    assert "`reward/mean`, `reward/correctness`, `reward/format`, `kl`, `loss`" in text
    assert "`completion/mean_length`" not in text.split("Not in the training log")[1]
    assert out_png.is_file()


def test_missing_metrics_file_is_a_user_error_naming_it(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    metrics_paths["sft"].unlink()
    out_md = tmp_path / "report.md"
    with pytest.raises(UserError, match=r"sft\.json: metrics file not found; run dvc repro"):
        report.write_report(
            metrics_paths, predictions_paths, tmp_path, out_md, tmp_path / "report.png"
        )
    assert not out_md.exists()


def test_missing_predictions_and_short_predictions_are_user_errors(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    args = (tmp_path / "log", tmp_path / "r.md", tmp_path / "r.png")
    lines = predictions_paths["grpo"].read_text().splitlines()
    predictions_paths["grpo"].write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match=r"grpo\.jsonl: 7 rows but its metrics say n=8"):
        report.write_report(metrics_paths, predictions_paths, *args)
    predictions_paths["grpo"].unlink()
    with pytest.raises(UserError, match=r"grpo\.jsonl: predictions file not found; run dvc"):
        report.write_report(metrics_paths, predictions_paths, *args)


def test_cli(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    write_log(tmp_path / "dvclive")
    cmd = [sys.executable, "-m", "stages.report", "--train-log", str(tmp_path / "dvclive")]
    for label in metrics_paths:
        cmd += ["--model", f"{label}={metrics_paths[label]}:{predictions_paths[label]}"]
    out_md, out_png = tmp_path / "out" / "report.md", tmp_path / "out" / "report.png"
    cmd += ["--md", str(out_md), "--png", str(out_png)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| metric | base | sft | grpo |" in out_md.read_text()
    assert out_png.is_file()

    metrics_paths["grpo"].unlink()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error [report]: {metrics_paths['grpo']}: metrics file not found; run dvc repro"
    )
