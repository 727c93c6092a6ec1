"""GRPOTrainer.rollout and .update checked value by value against the pieces they wire together
(grpo.loss, grpo.scoring): tests that kill the trainer mutants `make mutate` found alive.

One tiny model, one rollout with completions cut at varied lengths (as if EOS had come), then the
trainer's micro-batched update is compared with one full-batch `grpo_loss` on a copy of the model.
"""

from __future__ import annotations

import copy
import math
import time
import zlib

import pytest
import tiny
import torch

from grpo import config, schema
from grpo import trainer as trainer_module
from grpo.generation import generate
from grpo.loss import group_advantages, grpo_loss
from grpo.prompts import chat_prompt
from grpo.sampling import row_seeds
from grpo.scoring import completion_logprobs
from grpo.trainer import TOKEN_MEANS, GRPOTrainer, NonFiniteError


class CrcReward:
    """Deterministic rewards with variance inside groups; records the golds it was asked about."""

    names = ("correctness", "format")

    def __init__(self) -> None:
        self.golds: list[str] = []

    def score(self, completion: str, gold: str) -> dict[str, float]:
        self.golds.append(gold)
        crc = zlib.crc32(completion.encode())
        return {"correctness": (crc % 7) / 7.0, "format": (crc % 3) / 10.0}


def _records():
    return [
        {"id": f"train-{i:05d}", "question": q, "solution": a, "gold": a.split("####")[-1].strip()}
        for i, (q, a) in enumerate(tiny.GSM8K_ROWS["train"])
    ]


def _trainer(tmp_path, **overrides):
    raw = config.default_params_dict()["train"]
    raw.update(
        batch_size=2,
        num_generations=3,
        max_completion_length=5,
        micro_batch_size=2,  # 6 rows in 3 micro-batches: groups of 3 split across them
        max_grad_norm=1e9,  # no clipping: the update is the plain gradient step
        beta=0.04,
        mu=2,
        epsilon=0.02,
        epsilon_high=0.04,
        temperature=0.7,  # not completion_logprobs' default 1.0
    )
    raw.update(overrides)
    cfg = schema.build(config.TrainConfig, raw)
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, seed=0)
    reward = CrcReward()
    trainer = GRPOTrainer(
        model,
        tokenizer,
        _records(),
        cfg,
        reward,
        system="Respond",
        eos_ids=[2],
        checkpoint_dir=tmp_path / "checkpoints",
    )
    return trainer, model, reward


def _cut(ro) -> None:
    """Completion masks as if EOS ended rows at varied lengths (row 1: EOS first token)."""
    mask = ro.gen.completion_mask  # (N, T)
    for row, length in enumerate([5, 1, 3, 4, 2, 5]):
        mask[row, length:] = 0


def _sgd(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _expected(trainer, model, ro, loss_type: str):
    """`mu` SGD steps of the full-batch loss on a copy of `model`: (weights, last stats)."""
    cfg = trainer.cfg
    twin = copy.deepcopy(model).train()
    optimizer, _ = _sgd(twin)
    gen = ro.gen
    for _ in range(cfg.mu):
        optimizer.zero_grad()
        logp = completion_logprobs(
            twin,
            gen.prompt_ids,
            gen.prompt_mask,
            gen.completion_ids,
            temperature=cfg.temperature,
            completion_mask=gen.completion_mask,
        )  # (N, T)
        out = grpo_loss(
            logp,
            ro.old_logp,
            ro.ref_logp,
            ro.advantages,
            gen.completion_mask,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            loss_type=loss_type,
            max_completion_length=cfg.max_completion_length,
        )
        out.loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in twin.parameters()]))
        optimizer.step()
    stats = {"loss": out.loss.item(), **{name: getattr(out, name) for name in TOKEN_MEANS}}
    return {n: p.detach() for n, p in twin.named_parameters()}, stats | {"grad_norm": norm.item()}


@pytest.mark.parametrize(("loss_type", "beta"), [("grpo", 0.04), ("dapo", 0.0), ("dr_grpo", 0.04)])
def test_update_is_the_full_batch_loss_step(tmp_path, loss_type, beta):
    trainer, model, _ = _trainer(tmp_path, loss_type=loss_type, beta=beta)
    ro = trainer.rollout(0)
    _cut(ro)
    weights, expected = _expected(trainer, model, ro, loss_type)
    trainer.optimizer, trainer.scheduler = _sgd(model)
    stats = trainer.update(ro)
    assert expected["clip_ratio"] > 0  # the second update is off-policy
    assert (expected["kl"] > 0) == (beta > 0)  # beta 0: no reference at all
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    assert stats["nonfinite_skipped"] == 0.0
    assert trainer.scheduler.last_epoch == 2  # one scheduler step per optimizer update (mu = 2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[name], rtol=1e-4, atol=1e-6)
    assert not model.training  # back to eval mode for the next rollout


def test_rollout_scores_groups_of_the_sampled_prompts(tmp_path):
    trainer, model, reward = _trainer(tmp_path, mu=2, beta=0.04, seed=7)
    sampler = copy.deepcopy(trainer.sampler)
    start = time.perf_counter()
    ro = trainer.rollout(3)
    assert 0 < ro.generation_seconds <= time.perf_counter() - start
    records = [_records()[i] for i in sampler.next(2)]
    golds = [r["gold"] for r in records for _ in range(3)]
    assert reward.golds == golds  # row r answers prompt r // G of this step's draw
    gen = ro.gen
    # the same rows from `generate` itself: system prompt, per-row seeds of (seed, step, row)
    prompts = [chat_prompt(trainer.tokenizer, r["question"], "Respond") for r in records]
    seeds = row_seeds(7, 3, range(6))
    again = generate(
        model,
        trainer.tokenizer,
        prompts,
        trainer.gen_config,
        sampling=trainer.sampling,
        seeds=seeds,
        num_return_sequences=3,
    )
    assert torch.equal(gen.prompt_ids, again.prompt_ids)
    assert torch.equal(gen.completion_ids, again.completion_ids)
    assert ro.components == ("correctness", "format")
    scores = [reward.score(t, g) for t, g in zip(gen.texts, golds, strict=True)]
    expected = torch.tensor(
        [
            [s["correctness"] + s["format"], n, float(cut), s["correctness"], s["format"]]
            for s, n, cut in zip(scores, gen.num_tokens, gen.truncated, strict=True)
        ]
    )
    torch.testing.assert_close(ro.table, expected)
    torch.testing.assert_close(ro.advantages, group_advantages(expected[:, 0], 3))
    ref = completion_logprobs(
        model,
        gen.prompt_ids,
        gen.prompt_mask,
        gen.completion_ids,
        temperature=0.7,
        completion_mask=gen.completion_mask,
    )  # (N, T) the policy equals the reference before any update
    torch.testing.assert_close(ro.old_logp, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ro.ref_logp, ref, rtol=1e-5, atol=1e-6)


def test_rollout_skips_the_forwards_it_does_not_need(tmp_path):
    trainer, _, _ = _trainer(tmp_path, mu=1, beta=0.0, scale_rewards="none")
    ro = trainer.rollout(0)
    assert ro.old_logp is None and ro.ref_logp is None
    torch.testing.assert_close(ro.advantages, group_advantages(ro.rewards, 3, scale_rewards="none"))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_nonfinite_rewards_give_nan_advantages_and_a_skipped_update(tmp_path):
    trainer, model, reward = _trainer(tmp_path, nonfinite="skip")
    reward.score = lambda completion, gold: {"correctness": float("nan"), "format": 0.0}
    ro = trainer.rollout(0)
    assert torch.isnan(ro.advantages).all()
    before = [p.detach().clone() for p in model.parameters()]
    trainer.optimizer, trainer.scheduler = _sgd(model)
    stats = trainer.update(ro)
    assert stats == {"nonfinite_skipped": 1.0}
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert trainer.scheduler.last_epoch == 2  # both mu = 2 updates dropped, the schedule moves on
    trainer.nonfinite = "stop"
    with pytest.raises(NonFiniteError, match=r"non-finite reward \(6 completions\) at step 5;"):
        trainer.update(ro, step=5)


def test_a_nonfinite_second_update_is_skipped_and_the_schedule_still_advances(tmp_path):
    # an infinite step size makes the weights non-finite, so the second of mu = 2 updates fails
    trainer, model, _ = _trainer(tmp_path, nonfinite="skip")
    ro = trainer.rollout(0)
    trainer.optimizer = torch.optim.SGD(model.parameters(), lr=math.inf)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda _: 1.0)
    stats = trainer.update(ro)
    assert sorted(stats) == sorted(["grad_norm", "loss", "nonfinite_skipped", *TOKEN_MEANS])
    assert math.isnan(stats["loss"]) and stats["nonfinite_skipped"] == 1.0
    assert trainer.scheduler.last_epoch == 2  # the good update's step and the dropped one's
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_a_nonfinite_loss_stops_naming_the_step(tmp_path):
    trainer, _, _ = _trainer(tmp_path, nonfinite="stop", mu=1)
    ro = trainer.rollout(0)
    ro.advantages[:] = math.nan  # finite rewards, a NaN loss
    trainer.optimizer, trainer.scheduler = _sgd(trainer.policy)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 4;"):
        trainer.update(ro, step=4)
    with pytest.raises(NonFiniteError, match=r"at step 0;"):  # the default step
        trainer.update(ro)


@pytest.mark.parametrize("stop", [True, False])
def test_rollout_cuts_at_the_answer_only_when_asked(tmp_path, monkeypatch, stop):
    calls = []

    def spy(gen, tokenizer):
        calls.append(tokenizer)
        return gen

    monkeypatch.setattr(trainer_module, "truncate_at_answer", spy)
    trainer, _, _ = _trainer(tmp_path, stop_at_answer=stop)
    trainer.rollout(0)
    assert calls == ([trainer.tokenizer] if stop else [])
