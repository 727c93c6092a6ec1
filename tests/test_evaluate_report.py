"""The report of a sampled evaluation (k completions per question): the pass@k / maj@k table with
intervals, the sampling notes per model, and the greedy wording when every model has k = 1."""

from __future__ import annotations

import json
from pathlib import Path

from test_report import IDS, table_rows, write_inputs, write_log

from grpo import eval_results, report
from grpo.evaluate import summarize

# Per question, which of the 4 samples are strictly right (the tagged answer "18" = the gold).
RIGHT = [
    [1, 1, 1, 1],
    [1, 0, 0, 0],
    [0, 1, 0, 1],
    [0, 0, 0, 0],
    [0, 0, 1, 1],
    [1, 1, 0, 0],
    [0, 0, 0, 1],
    [1, 1, 1, 0],
]


def sampled_predictions() -> list[dict]:
    rows = []
    for qid, right in zip(IDS, RIGHT, strict=True):
        samples = [
            {
                "strict_answer": "18" if ok else "7",
                "lenient_answer": "18" if ok else "7",
                "strict_correct": bool(ok),
                "lenient_correct": bool(ok),
                "well_formed": True,
                "completion_tokens": 40,
                "truncated": j == 3,
            }
            for j, ok in enumerate(right)
        ]
        rows.append(
            {
                "id": qid,
                "gold": "18",
                "completion": "<answer>18</answer>",
                "strict_correct": sum(right) > 2 or (sum(right) == 2 and right[0] == 1),
                "lenient_correct": sum(right) > 2 or (sum(right) == 2 and right[0] == 1),
                "num_samples": 4,
                "strict_correct_count": sum(right),
                "lenient_correct_count": sum(right),
                "samples": samples,
            }
        )
    return rows


def write_sampled(metrics_path: Path, predictions_path: Path) -> dict:
    predictions = sampled_predictions()
    metrics = summarize(predictions, seconds=10.0, temperature=0.7)
    metrics_path.write_text(json.dumps(eval_results.headline(metrics)))
    eval_results.details_path(metrics_path).write_text(json.dumps(metrics))
    predictions_path.write_text("".join(json.dumps(r) + "\n" for r in predictions))
    return metrics


def test_sampled_metrics_of_the_hand_made_predictions():
    metrics = summarize(sampled_predictions(), seconds=10.0, temperature=0.7)
    assert metrics["pass@1"] == metrics["strict_accuracy"] == 15 / 32
    # pass@2 per question: 1, 1/2, 5/6, 0, 5/6, 5/6, 1/2, 1 (1 - C(4-c, 2) / 6)
    assert abs(metrics["pass@2"] - (1 + 0.5 + 5 / 6 + 0 + 5 / 6 + 5 / 6 + 0.5 + 1) / 8) < 1e-12
    assert metrics["pass@4"] == 7 / 8
    # maj@2 over samples 1-2: ties go to the first sample's answer
    assert metrics["maj@2"] == sum(r[0] for r in RIGHT) / 8
    # maj@4: 3 or 4 right, or 2 right with the right answer seen first (questions 0, 5, 7)
    assert metrics["maj@4"] == 3 / 8
    assert metrics["truncation_rate"] == 0.25 and metrics["n_finished"] == 24


def test_report_with_sampled_and_greedy_models(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path, labels=("base", "grpo"))
    write_sampled(metrics_paths["grpo"], predictions_paths["grpo"])
    write_log(tmp_path / "dvclive")
    out_md = tmp_path / "report.md"
    report.write_report(
        metrics_paths, predictions_paths, tmp_path / "dvclive", out_md, tmp_path / "r.png"
    )
    text = out_md.read_text()
    assert "- `base`: greedy decoding, one completion per question (pass@1)." in text
    assert "- `grpo`: 4 completions per question sampled at temperature 0.7" in text
    table = text.split("Lenient variants are in the details files.")[1].split("\n\n")[1]
    rows = table_rows(table)
    assert rows["k"] == ["grpo pass@k (%)", "grpo maj@k (%)"]  # greedy models get no column
    assert list(rows)[2:] == ["1", "2", "4"]
    assert rows["4"][0].startswith("87.5 [")
    assert rows["4"][1] == "37.5 [13.7, 69.4]"  # Wilson of 3 of 8
    assert rows["2"][0].startswith("68.8 [")  # 5.5 / 8
    comparison = table_rows(text.split("## Comparison")[1].split("\n\n")[1])
    assert comparison["strict accuracy (%)"][1].startswith("46.9 [")  # 15 of 32 samples
    assert comparison["completions per question"][:2] == ["1", "4"]
    assert comparison["strict accuracy, finished only (%)"][1].endswith(" of 24")


def test_report_of_greedy_models_has_no_pass_at_k_table(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    out_md = tmp_path / "report.md"
    report.write_report(
        metrics_paths, predictions_paths, tmp_path / "log", out_md, tmp_path / "p.png"
    )
    text = out_md.read_text()
    assert text.count("greedy decoding, one completion per question (pass@1)") == 3
    assert "pass@k" not in text and "maj@" not in text
    assert "completions per question |" not in text
