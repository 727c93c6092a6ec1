"""The GRPO trainer's wiring, tested end to end on rollouts that really stop: the policy learns a
toy verifiable reward, the loss sees only tokens up to the first EOS, the reference is refreshed
at each iteration and the KL is measured against it.

The tiny random model gets an LM-head bias toward EOS and a target token, so its sampled rows end
with EOS at varied positions, some with EOS alone, some truncated (the fixture asserts all three),
and a reward on the target token has variance inside groups.
"""

from __future__ import annotations

import copy

import pytest
import tiny
import torch

from grpo import config, schema
from grpo.loss import grpo_loss
from grpo.run import Run
from grpo.scoring import completion_logprobs
from grpo.trainer import GRPOTrainer

EOS = 2
TARGET = "?"  # the toy reward: 1 for a completion containing this text


class ContainsReward:
    """A verifiable toy reward: 1 when the completion contains `TARGET`, else 0."""

    names = ("correctness",)

    def score(self, completion: str, gold: str) -> dict[str, float]:
        return {"correctness": float(TARGET in completion)}


def _records():
    return [
        {"id": f"train-{i:05d}", "question": q, "solution": a, "gold": a.split("####")[-1].strip()}
        for i, (q, a) in enumerate(tiny.GSM8K_ROWS["train"])
    ]


def _biased_model(tokenizer, eos_bias: float, target_bias: float):
    """The tiny model with an LM-head bias (weights still tied to the embeddings) that makes EOS
    and the target token likely enough for short rollouts to stop and to earn rewards."""
    model = tiny.build_model(tokenizer, seed=0)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[EOS] = eos_bias
        head.bias[tokenizer.convert_tokens_to_ids(TARGET)] = target_bias
    model.lm_head = head
    return model


def _trainer(tmp_path, *, eos_bias=4.0, target_bias=3.0, **overrides):
    raw = config.default_params_dict()["train"]
    raw.update(
        num_steps=1,
        batch_size=2,
        num_generations=4,
        max_completion_length=8,
        micro_batch_size=3,  # 8 rows in 3 micro-batches: groups split across them
        temperature=1.0,
        beta=0.04,
        learning_rate=0.03,
        lr_scheduler="constant",
        warmup_steps=0,
        max_grad_norm=1e9,  # no clipping: the gradient is the loss's own
        save_every=0,
    )
    raw.update(overrides)
    cfg = schema.build(config.TrainConfig, raw)
    tokenizer = tiny.build_tokenizer()
    model = _biased_model(tokenizer, eos_bias, target_bias)
    trainer = GRPOTrainer(
        model,
        tokenizer,
        _records(),
        cfg,
        ContainsReward(),
        system="Respond",
        eos_ids=[EOS],
        checkpoint_dir=tmp_path / "checkpoints",
    )
    return trainer, model


def _assert_rows_stop_every_way(ro) -> None:
    """The rollout holds rows ending with EOS at >= 2 positions, EOS-only rows and truncated
    rows, and some non-zero advantages (else the fixture no longer exercises the masks)."""
    gen = ro.gen
    ended = [n for n, cut in zip(gen.num_tokens, gen.truncated, strict=True) if not cut]
    assert len({n for n in ended if n > 1}) >= 2, gen.num_tokens
    assert 1 in ended, gen.num_tokens
    assert any(gen.truncated), gen.truncated
    assert (gen.completion_mask.sum(dim=1) < gen.completion_mask.shape[1]).any()
    assert ro.advantages.abs().sum() > 0, ro.rewards


@pytest.fixture
def stepped(tmp_path):
    """One rollout and one update of a fresh trainer: (trainer, model before the update,
    rollout, update stats), the gradient of the update left in the policy's `.grad`."""
    trainer, model = _trainer(tmp_path)
    trainer.start_iteration(0)
    ro = trainer.rollout(1)
    _assert_rows_stop_every_way(ro)
    before = copy.deepcopy(model)
    stats = trainer.update(ro, 1)
    return trainer, before, ro, stats


def _full_batch_loss(trainer, model, ro, mask, ref_logp=None):
    """`grpo_loss` of the whole batch on `model` with `mask`, computed here from the pieces
    (with the rollout's reference log-probs unless `ref_logp` is given)."""
    cfg, gen = trainer.cfg, ro.gen
    logp = completion_logprobs(
        model,
        gen.prompt_ids,
        gen.prompt_mask,
        gen.completion_ids,
        temperature=cfg.temperature,
        completion_mask=mask,
    )  # (N, T)
    return grpo_loss(
        logp,
        ro.old_logp,
        ro.ref_logp if ref_logp is None else ref_logp,
        ro.advantages,
        mask,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
    )


def test_update_gradient_is_the_loss_over_tokens_up_to_eos(stepped):
    """The trainer's micro-batched gradient equals that of one full-batch `grpo_loss` on the
    completion masks (EOS included, padding after it excluded), and so does its loss."""
    trainer, before, ro, stats = stepped
    twin = before.train()
    out = _full_batch_loss(trainer, twin, ro, ro.gen.completion_mask)
    out.loss.backward()
    assert stats["loss"] == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-7)
    got = dict(trainer.plain_model().named_parameters())
    for name, param in twin.named_parameters():
        torch.testing.assert_close(got[name].grad, param.grad, rtol=1e-4, atol=1e-7, msg=name)
    # the same loss over every position (padding included) is a different one: the check bites
    ones = _full_batch_loss(trainer, before, ro, torch.ones_like(ro.gen.completion_mask))
    assert abs(ones.loss.item() - out.loss.item()) > 1e-4


def test_tokens_after_eos_change_nothing(tmp_path):
    """Garbage after each row's EOS leaves the update's loss and gradient unchanged."""
    grads, losses = [], []
    for garbage in (False, True):
        trainer, model = _trainer(tmp_path / str(garbage))
        trainer.start_iteration(0)
        ro = trainer.rollout(1)
        _assert_rows_stop_every_way(ro)
        if garbage:
            ids, mask = ro.gen.completion_ids, ro.gen.completion_mask  # (N, T)
            noise = torch.randint(3, 400, ids.shape, generator=torch.Generator().manual_seed(0))
            ro.gen.completion_ids = torch.where(mask.bool(), ids, noise)  # (N, T)
        stats = trainer.update(ro, 1)
        losses.append(stats["loss"])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-8)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_grpo_steps_raise_a_verifiable_reward(tmp_path):
    """Learning: a few GRPO steps at temperature 1 raise the mean reward of a toy task (contain
    `TARGET`) from about 1/3 to nearly 1; ascending the loss or misaligning advantages with rows
    drives it down instead."""
    trainer, _ = _trainer(
        tmp_path,
        eos_bias=2.0,
        num_steps=6,
        batch_size=4,
        num_generations=4,
        micro_batch_size=4,
        beta=0.0,
        max_grad_norm=1.0,
    )
    run = Run(trainer, tmp_path / "log", {})
    run.train()
    history = run.history  # mean reward of each step's 16 rollouts
    first, last = sum(history[:2]) / 2, sum(history[-2:]) / 2
    assert first < 0.5, history
    assert last > first + 0.4, history


def test_reference_is_the_policy_at_each_iteration_start(tmp_path):
    """num_iterations 2: during iteration 1 the reference holds the policy's weights at the end of
    iteration 0 (not the initial weights), and it stays frozen while the policy moves on."""
    trainer, model = _trainer(tmp_path, num_iterations=2)
    snapshots = []  # the policy's weights before each step
    run = Run(trainer, tmp_path / "log", {})
    step = run._step

    def spy(*args, **kwargs):
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return step(*args, **kwargs)

    run._step = spy
    run.train()
    assert len(snapshots) == 2
    ref = dict(trainer.ref.named_parameters())
    for name, value in snapshots[1].items():
        assert torch.equal(ref[name], value), name
    moved = [n for n in snapshots[0] if not torch.equal(ref[n], snapshots[0][n])]
    assert moved, "the reference still holds the initial weights"
    assert any(not torch.equal(ref[n], p) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in trainer.ref.parameters())


def test_kl_is_measured_against_the_reference(tmp_path):
    """The rollout's reference log-probs are the initial model's (iteration 0), and the reported
    KL is grpo_loss's KL of the current policy against them: 0 at the first step, > 0 once a step
    with beta > 0 has moved the policy."""
    trainer, model = _trainer(tmp_path, num_steps=2, beta=0.1)
    initial = copy.deepcopy(model).eval()
    seen = []  # (policy before the update, rollout, stats) of each step
    update = trainer.update

    def spy(ro, *args, **kwargs):
        before = copy.deepcopy(model).eval()
        seen.append((before, ro, update(ro, *args, **kwargs)))
        return seen[-1][2]

    trainer.update = spy
    Run(trainer, tmp_path / "log", {}).train()
    assert seen[0][2]["kl"] == pytest.approx(0.0, abs=1e-7)
    before, ro, stats = seen[1]
    gen = ro.gen
    with torch.no_grad():
        ref_logp = completion_logprobs(
            initial,
            gen.prompt_ids,
            gen.prompt_mask,
            gen.completion_ids,
            temperature=trainer.cfg.temperature,
            completion_mask=gen.completion_mask,
        )  # (N, T)
        keep = gen.completion_mask.bool()  # (N, T)
        torch.testing.assert_close(ro.ref_logp[keep], ref_logp[keep], rtol=1e-5, atol=1e-6)
        out = _full_batch_loss(trainer, before, ro, gen.completion_mask, ref_logp)
    assert out.kl > 1e-4
    assert stats["kl"] == pytest.approx(out.kl, rel=1e-4)
