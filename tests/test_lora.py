"""LoRA training (peft): only adapters train (fp32, on a base kept in its own dtype); the
reference is the base with the adapters disabled, never a copy; the result saves merged or as an
adapter, and evaluation loads either."""

from __future__ import annotations

import argparse
import copy
import json
import logging

import pytest
import tiny
import torch
from test_trainer import LengthReward, _cfg, _records
from transformers import AutoModelForCausalLM

from grpo import config, distributed, model
from grpo.config import Params
from grpo.errors import UserError
from grpo.scoring import completion_logprobs
from grpo.trainer import GRPOTrainer
from stages import train as train_stage


def _params(train=None, **model_keys) -> Params:
    raw = config.default_params_dict()
    raw["model"].update({"lora_rank": 4, "lora_alpha": 8.0, **model_keys})
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
    with caplog.at_level(logging.INFO, logger="grpo.run"):
        train_stage.train(params, args, distributed.Dist(), "ddp")
    assert "step-000002 (step 2)" in caplog.text  # resumed, not restarted
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "grpo").state_dict()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name


def _lora_policy(tokenizer):
    """A LoRA policy whose adapters change its output (peft starts them at zero), and a deep copy
    of its base model taken before the adapters went in."""
    base = tiny.build_model(tokenizer, seed=0)
    reference = copy.deepcopy(base).eval()
    policy = model.add_lora(base, 4, 8.0, ["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return policy, reference


def _no_model_copies(monkeypatch):
    def refuse(self, memo):
        raise AssertionError(f"deep copy of a {type(self).__name__}")

    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", refuse, raising=False)


def _lora_trainer(policy, tokenizer, cfg, tmp_path) -> GRPOTrainer:
    """A trainer of the tiny fixture's records around a LoRA `policy`."""
    return GRPOTrainer(
        policy,
        tokenizer,
        _records(),
        cfg,
        LengthReward(),
        system="Respond",
        eos_ids=[2],
        checkpoint_dir=tmp_path / "checkpoints",
    )


def test_lora_reference_is_the_base_with_adapters_disabled_and_nothing_is_copied(
    tmp_path, monkeypatch
):
    tokenizer = tiny.build_tokenizer()
    policy, reference = _lora_policy(tokenizer)
    _no_model_copies(monkeypatch)
    trainer = _lora_trainer(policy, tokenizer, _cfg(beta=0.04, num_steps=1), tmp_path)
    assert trainer.ref is None  # no second model
    trainer.start_iteration(0)
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    assert trained == adapters  # the optimizer holds exactly the adapters
    ro = trainer.rollout(1)
    gen = ro.gen
    with torch.no_grad():
        expected = completion_logprobs(
            reference,
            gen.prompt_ids,
            gen.prompt_mask,
            gen.completion_ids,
            chunk_size=4,
            completion_mask=gen.completion_mask,
        )  # (N, T)
        with_adapters = trainer._logprobs(trainer.policy, gen)  # (N, T)
    torch.testing.assert_close(ro.ref_logp, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(with_adapters, expected, atol=1e-3)  # the adapters matter


def test_lora_with_beta_zero_computes_no_reference_logprobs(tmp_path, monkeypatch):
    """beta 0 has no KL term: the adapters-off forward would be pure waste."""
    tokenizer = tiny.build_tokenizer()
    policy, _ = _lora_policy(tokenizer)
    trainer = _lora_trainer(policy, tokenizer, _cfg(beta=0.0, num_steps=1), tmp_path)
    trainer.start_iteration(0)

    def no_base_forward():
        raise AssertionError("the adapters were disabled for a reference forward")

    monkeypatch.setattr(trainer.policy, "disable_adapter", no_base_forward)
    ro = trainer.rollout(1)
    assert ro.ref_logp is None


def test_lora_refuses_more_than_one_iteration(tmp_path):
    tokenizer = tiny.build_tokenizer()
    policy, _ = _lora_policy(tokenizer)
    with pytest.raises(UserError, match=r"train\.num_iterations: 2 with LoRA"):
        _lora_trainer(policy, tokenizer, _cfg(num_iterations=2), tmp_path)


def test_lora_keeps_a_bf16_base_and_fp32_adapters():
    lm = tiny.build_model(tiny.build_tokenizer()).to(torch.bfloat16)
    peft_model = model.add_lora(lm, 4, 8.0, ["q_proj", "v_proj"])
    dtypes = {(p.requires_grad, p.dtype) for p in peft_model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


@pytest.mark.parametrize(("lora_rank", "expected"), [(4, "bfloat16"), (0, "float32")])
def test_stage_loads_a_lora_base_in_model_dtype(
    tmp_path, tiny_model_dir, records_file, monkeypatch, lora_rank, expected
):
    """LoRA's frozen base loads in model.dtype (bf16 on a GPU); full training in fp32."""
    seen = []

    def load_model(source, **kwargs):
        seen.append(kwargs["dtype"])
        raise RuntimeError("loaded")

    monkeypatch.setattr(train_stage.model, "load_model", load_model)
    params = _params(dtype="bfloat16", lora_rank=lora_rank)
    with pytest.raises(RuntimeError, match="loaded"):
        train_stage.train(
            params, _args(tmp_path, tiny_model_dir, records_file), distributed.Dist(), "ddp"
        )
    assert seen == [expected]
