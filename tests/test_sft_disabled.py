"""`sft.enabled: false`: models/sft is a marked copy of models/base, evaluate does not evaluate it
again (honest metrics, no accuracies), and the report names it instead of failing."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml
from test_report import write_inputs, write_log

from grpo import config, model, report
from grpo.errors import UserError
from stages import evaluate as evaluate_stage
from stages import sft as sft_stage


@pytest.fixture
def params_file(tmp_path):
    raw = config.default_params_dict()
    raw["sft"]["enabled"] = False
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_disabled_sft_copy_is_skipped_by_evaluate(
    tmp_path, tiny_model_dir, params_file, monkeypatch
):
    out = tmp_path / "models" / "sft"
    sft_stage.main(
        argparse.Namespace(
            params=str(params_file), model=str(tiny_model_dir), data="unused", out=str(out)
        )
    )
    assert model.sft_copy_of(out) == str(tiny_model_dir)
    assert model.sft_copy_of(tiny_model_dir) is None  # a model of its own is evaluated

    def no_loading(*args, **kwargs):
        raise AssertionError("a copy of an evaluated model was loaded again")

    monkeypatch.setattr(model, "load_model", no_loading)
    metrics, predictions = tmp_path / "metrics" / "sft.json", tmp_path / "predictions" / "sft.jsonl"
    evaluate_stage.main(
        argparse.Namespace(
            params=str(params_file),
            model=str(out),
            data="unused",
            metrics=str(metrics),
            predictions=str(predictions),
        )
    )
    written = json.loads(metrics.read_text())
    assert written == {
        "skipped": True,
        "reason": f"sft disabled (same weights as {tiny_model_dir.name})",
    }
    assert predictions.read_text() == ""


def test_report_names_the_skipped_model_and_compares_the_others(tmp_path):
    metrics_paths, predictions_paths = write_inputs(tmp_path)
    metrics_paths["sft"].write_text(json.dumps(evaluate_stage.skipped_metrics("models/base")))
    predictions_paths["sft"].write_text("")
    write_log(tmp_path / "dvclive")
    out_md = tmp_path / "report.md"
    report.write_report(
        metrics_paths, predictions_paths, tmp_path / "dvclive", out_md, tmp_path / "r.png"
    )
    text = out_md.read_text()
    assert "`sft`: sft disabled (same weights as base); not evaluated again" in text
    assert "| metric | base | grpo | grpo − base |" in text
    assert "### base → grpo (strict)" in text and "### sft" not in text

    metrics_paths["base"].write_text(json.dumps(evaluate_stage.skipped_metrics("models/x")))
    with pytest.raises(UserError, match=r"base\.json: the baseline 'base' was not evaluated"):
        report.write_report(
            metrics_paths, predictions_paths, tmp_path / "dvclive", out_md, tmp_path / "r.png"
        )
