"""The GRPO loop on a tiny random model: a step updates every parameter, runs are reproducible,
checkpoints are complete and loadable with weights_only=True."""

from __future__ import annotations

import json
import zlib

import pytest
import tiny
import torch

from grpo import config, schema
from grpo.checkpoint import COMPLETE
from grpo.run import Run
from grpo.trainer import GRPOTrainer


class LengthReward:
    """A deterministic stand-in reward with variance inside groups (random models never answer)."""

    names = ("correctness", "format")

    def score(self, completion: str, gold: str) -> dict[str, float]:
        return {"correctness": (zlib.crc32(completion.encode()) % 7) / 7.0, "format": 0.0}


def _cfg(**overrides) -> config.TrainConfig:
    raw = config.default_params_dict()["train"]
    raw.update(
        num_steps=2,
        batch_size=2,
        num_generations=3,
        max_completion_length=6,
        micro_batch_size=4,
        save_every=1,
        learning_rate=1e-3,
    )
    raw.update(overrides)
    return schema.build(config.TrainConfig, raw)


def _records():
    return [
        {"id": f"train-{i:05d}", "question": q, "solution": a, "gold": a.split("####")[-1].strip()}
        for i, (q, a) in enumerate(tiny.GSM8K_ROWS["train"])
    ]


def _trainer(tmp_path, cfg, seed=0, **kwargs):
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=seed)
    trainer = GRPOTrainer(
        model,
        tokenizer,
        _records(),
        cfg,
        LengthReward(),
        system="Respond",
        eos_ids=[2],
        checkpoint_dir=tmp_path / "out" / "checkpoints",
        **kwargs,
    )
    return trainer, model


def test_one_step_changes_every_parameter_and_loss_is_finite(tmp_path):
    cfg = _cfg(num_steps=1)
    trainer, model = _trainer(tmp_path, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = Run(trainer, tmp_path / "log", {}).train()
    assert summary["steps"] == 1
    metrics = json.loads((tmp_path / "log" / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["frac_reward_zero_std"] < 1.0
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


@pytest.mark.parametrize("overrides", [{}, {"mu": 2, "beta": 0.0, "loss_type": "dapo"}])
def test_same_seed_gives_identical_metrics(tmp_path, overrides):
    runs = []
    for name in ("a", "b"):
        trainer, model = _trainer(tmp_path / name, _cfg(**overrides))
        Run(trainer, tmp_path / name / "log", {}).train()
        metrics = json.loads((tmp_path / name / "log" / "metrics.json").read_text())
        metrics.pop("time")
        runs.append((metrics, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)


def test_checkpoints_are_complete_and_load_with_weights_only(tmp_path):
    trainer, _ = _trainer(tmp_path, _cfg(num_steps=3))
    Run(trainer, tmp_path / "log", {}).train()
    ckpts = sorted((tmp_path / "out" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000001", "step-000002"]  # none at the final step
    for ckpt in ckpts:
        assert (ckpt / COMPLETE).exists() and (ckpt / "model.safetensors").exists()
        state = json.loads((ckpt / "state.json").read_text())
        assert state["sampler"]["position"] == 2 * state["step"]
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
            torch.load(ckpt / name, weights_only=True)
    assert not list((tmp_path / "out" / "checkpoints").glob(".*"))  # no temp folders left


@pytest.mark.slow
def test_torch_compile_gives_the_same_step(tmp_path):
    results = []
    for flag in (False, True):
        trainer, model = _trainer(tmp_path / str(flag), _cfg(num_steps=1, torch_compile=flag))
        Run(trainer, tmp_path / str(flag) / "log", {}).train()
        results.append([p.detach().clone() for p in model.parameters()])
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    """Every GPU preset trains with gradient checkpointing: two steps with it end with the same
    weights and loss as two steps without (the recompute attends like the packed forward)."""
    weights, losses = [], []
    for on in (False, True):
        trainer, model = _trainer(tmp_path / str(on), _cfg(gradient_checkpointing=on, beta=0.04))
        Run(trainer, tmp_path / str(on) / "log", {}).train()
        assert model.is_gradient_checkpointing == on
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
        losses.append(json.loads((tmp_path / str(on) / "log" / "metrics.json").read_text())["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_each_step_runs_with_reproducible_cpu_kernels(tmp_path, monkeypatch):
    """Each update runs under `device.reproducible` (without it the backward of packed scoring
    adds in thread order, so two runs of one config differ in the last bits); decoding not."""
    trainer, _ = _trainer(tmp_path, _cfg(num_steps=2))
    seen = []
    for name in ("rollout", "update"):
        method = getattr(trainer, name)

        def spy(*args, method=method, name=name, **kwargs):
            seen.append((name, torch.are_deterministic_algorithms_enabled()))
            return method(*args, **kwargs)

        monkeypatch.setattr(trainer, name, spy)
    Run(trainer, tmp_path / "log", {}).train()
    assert seen == [("rollout", False), ("update", True)] * 2
    assert not torch.are_deterministic_algorithms_enabled()
