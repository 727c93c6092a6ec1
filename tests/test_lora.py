"""LoRA training (peft): only adapters train; the result saves merged or as an adapter, and
evaluation loads either."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import tiny
import torch
from test_trainer import LengthReward
from transformers import AutoModelForCausalLM

from grpo import config, distributed, model
from grpo.config import Params
from stages import train as train_stage


def _params(train=None, **model_keys) -> Params:
    raw = config.default_params_dict()
    raw["model"].update(lora_rank=4, lora_alpha=8.0, **model_keys)
    raw["train"].update(
        num_steps=1,
        batch_size=2,
        num_generations=2,
        max_completion_length=6,
        micro_batch_size=4,
        save_every=0,
        learning_rate=1e-2,
    )
    raw["train"].update(train or {})
    return Params.from_dict(raw)


def _args(tmp_path, model_dir, records_file) -> argparse.Namespace:
    return argparse.Namespace(
        model=str(model_dir),
        data=str(records_file),
        out=str(tmp_path / "grpo"),
        checkpoints=str(tmp_path / "checkpoints"),
        log_dir=str(tmp_path / "log"),
    )


@pytest.fixture
def records_file(tmp_path):
    path = tmp_path / "train.jsonl"
    with open(path, "w") as fh:
        for i, (q, a) in enumerate(tiny.GSM8K_ROWS["train"]):
            rec = {
                "id": f"train-{i:05d}",
                "question": q,
                "solution": a,
                "gold": a.split("####")[-1].strip(),
            }
            fh.write(json.dumps(rec) + "\n")
    return path


@pytest.mark.parametrize("save", ["merged", "adapter"])
def test_lora_training_saves_a_loadable_model(
    tmp_path, tiny_model_dir, records_file, save, monkeypatch
):
    monkeypatch.setattr(train_stage, "RewardFunctions", lambda cfg: LengthReward())
    params = _params(lora_save=save)
    train_stage.train(
        params, _args(tmp_path, tiny_model_dir, records_file), distributed.Dist(), "ddp"
    )
    out = tmp_path / "grpo"
    if save == "merged":
        assert not (out / model.ADAPTER_CONFIG).exists()
        trained = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert (out / model.ADAPTER_CONFIG).exists()
        trained = model.load_model(model.ModelSource("dir", str(out)))
        trained = trained.merge_and_unload()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "LoRA training changed nothing"
    assert all("proj" in n for n in changed)  # only the adapted projections moved


def test_lora_freezes_the_base_weights(tiny_model_dir):
    lm = model.load_model(model.ModelSource("dir", str(tiny_model_dir)))
    peft_model = model.add_lora(lm, 4, 8.0, ["q_proj", "v_proj"])
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_run_resumes_from_its_checkpoint(
    tmp_path, tiny_model_dir, records_file, monkeypatch, caplog
):
    """A rerun of the stage with the same params, inputs and code resumes from the checkpoint
    (adapters, base and optimizer state restored) and saves the same merged model."""
    monkeypatch.setattr(train_stage, "RewardFunctions", lambda cfg: LengthReward())
    params = _params(train={"num_steps": 3, "save_every": 2})
    args = _args(tmp_path, tiny_model_dir, records_file)
    train_stage.train(params, args, distributed.Dist(), "ddp")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "grpo").state_dict()
    assert (tmp_path / "checkpoints" / "step-000002" / "COMPLETE").exists()
    with caplog.at_level(logging.INFO, logger="grpo.trainer"):
        train_stage.train(params, args, distributed.Dist(), "ddp")
    assert "step-000002 (step 2)" in caplog.text  # resumed, not restarted
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "grpo").state_dict()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name
