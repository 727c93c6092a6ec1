"""TRL 1.16.0 as an oracle: our `GRPOTrainer.update` gives the loss and every parameter's gradient
that TRL's `GRPOTrainer` computes on the same inputs, and the two documented differences hold.

One fixed batch: 3 prompts of unequal length (left-padded) x 4 completions of unequal length
(EOS at varied positions, an EOS-only row, truncated rows without EOS), rewards with variance in
every group, old log-probs that clip on both sides, and reference log-probs that differ from the
policy's. Our side runs `update` with micro-batches of 3 rows, which split the groups of 4; TRL's
side scores the whole batch with `_compute_loss` (eval mode: no accumulation normaliser). The
gradient is read at `optimizer.step()` with clipping made a no-op.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig
from trl import GRPOTrainer as TRLTrainer

from grpo import config, schema
from grpo.generation import Generated
from grpo.loss import group_advantages
from grpo.scoring import completion_logprobs
from grpo.trainer import GRPOTrainer, Rollout

G = 4  # completions per prompt
T = 6  # max_completion_length
TEMPERATURE = 0.7
EOS = 2  # <|im_end|>, also the pad token of tiny.build_tokenizer
PROMPTS = ["Tom has 3 apples.", "A book costs $12. How much do 3 books cost?", "Sam ran 5 miles."]
# completion lengths; None = truncated (T tokens, no EOS); 1 = the EOS-only row
LENGTHS = [3, 1, None, 5, 6, None, 2, 4, None, 3, 5, 2]
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.25, 1.5, 0.0, 1.0, 0.75, 0.5, 0.0, 1.25]
LOSS_TOL = 1e-6  # absolute, on the loss
GRAD_TOL = 5e-6  # max |ours - TRL| over a tensor, relative to that tensor's max |TRL|


class _NoRewards:
    names = ()


class _GradCapture:
    """A stand-in optimizer: keeps every parameter's gradient at the first `step`, changes
    nothing (so each of the mu updates sees the same weights)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.grads: dict[str, torch.Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}


class _NoSchedule:
    def step(self) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tensors this small gain nothing from threads, and lose much to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch():
    """The fixed token batch: (prompt_ids, prompt_mask, completion_ids, completion_mask)."""
    tokenizer = tiny.build_tokenizer()
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(len(ids) for ids in encoded)
    assert len({len(ids) for ids in encoded}) == len(PROMPTS)  # left padding is exercised
    prompt_ids = torch.full((len(LENGTHS), width), EOS)  # (N, P)
    prompt_mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)  # (N, P)
    completion_ids = torch.full((len(LENGTHS), T), EOS)  # (N, T) padded with pad == EOS
    completion_mask = torch.zeros(len(LENGTHS), T, dtype=torch.long)  # (N, T)
    gen = torch.Generator().manual_seed(0)
    for row, length in enumerate(LENGTHS):
        ids = encoded[row // G]
        prompt_ids[row, width - len(ids) :] = torch.tensor(ids)
        prompt_mask[row, width - len(ids) :] = 1
        tokens = torch.randint(3, len(tokenizer), (T,), generator=gen)  # (T,) no special token
        n = T if length is None else length
        completion_ids[row, :n] = tokens[:n]
        if length is not None:
            completion_ids[row, n - 1] = EOS
        completion_mask[row, :n] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _cfg(**overrides) -> config.TrainConfig:
    raw = config.default_params_dict()["train"]
    raw.update(
        num_steps=1,
        batch_size=len(PROMPTS),
        num_generations=G,
        max_completion_length=T,
        temperature=TEMPERATURE,
        micro_batch_size=3,  # splits the groups of 4 over micro-batches
        max_grad_norm=1e12,  # clipping scales by exactly 1
        epsilon=0.2,
        epsilon_high=0.28,
        save_every=0,
    )
    raw.update(overrides)
    return schema.build(config.TrainConfig, raw)


def _old_and_ref(model, batch, off_policy: bool):
    """Old and reference log-probs: the current ones moved by fixed noise, 0 past each mask."""
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    with torch.no_grad():
        logp = completion_logprobs(
            model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            temperature=TEMPERATURE,
            completion_mask=completion_mask,
        )  # (N, T)
    gen = torch.Generator().manual_seed(1)
    keep = completion_mask.bool()
    ref = torch.where(keep, logp + 0.3 * torch.randn(logp.shape, generator=gen), 0.0)  # (N, T)
    old = None
    if off_policy:
        old = torch.where(keep, logp + 0.4 * torch.randn(logp.shape, generator=gen), 0.0)  # (N, T)
    return old, ref


def _ours(model_dir, batch, cfg, advantages, old, ref, tmp_path):
    """Our loss (as `update` reports it) and each parameter's gradient."""
    tokenizer = tiny.build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    records = [{"question": p, "gold": "0"} for p in PROMPTS]
    trainer = GRPOTrainer(
        model,
        tokenizer,
        records,
        cfg,
        _NoRewards(),
        system="",
        eos_ids=[EOS],
        checkpoint_dir=tmp_path / "checkpoints",
    )
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    lengths = completion_mask.sum(dim=1)  # (N,)
    truncated = [n is None for n in LENGTHS]
    gen = Generated(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        truncated,
        [""] * len(LENGTHS),
        lengths.tolist(),
    )
    table = torch.stack(
        [torch.tensor(REWARDS), lengths.float(), torch.tensor(truncated, dtype=torch.float32)],
        dim=1,
    )  # (N, 3)
    assert any(rows.start % G for rows, _ in trainer.micro_batches)  # a group is split
    rollout = Rollout(gen, table, (), advantages, old, ref if cfg.beta > 0 else None, 0.0)
    optimizer = _GradCapture(model)
    trainer.optimizer, trainer.scheduler = optimizer, _NoSchedule()
    stats = trainer.update(rollout)
    return stats["loss"], optimizer.grads


def _trl_trainer(tmp_path, model_dir, **args) -> TRLTrainer:
    """A real TRL GRPOTrainer on the tiny model in `model_dir` (TRL loads its reference from
    the same folder), on CPU, offline, logging nothing."""
    settings = {
        "per_device_train_batch_size": len(LENGTHS),
        "num_generations": G,
        "max_completion_length": T,
        "temperature": TEMPERATURE,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "use_bias_correction_kl": False,
        **args,
    }
    return TRLTrainer(
        model=str(model_dir),
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=GRPOConfig(
            output_dir=str(tmp_path / "trl"),
            activation_checkpointing=False,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
            logging_strategy="no",
            **settings,
        ),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tiny.build_tokenizer(),
    )


def _trl(model_dir, batch, tmp_path, advantages, old, ref, **args):
    """TRL's loss on the same inputs (one batch, eval mode) and each parameter's gradient."""
    trainer = _trl_trainer(tmp_path, model_dir, **args)
    prompt_ids, prompt_mask, completion_ids, completion_mask = batch
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = old
    model = trainer.model
    assert not model.training  # eval mode: the loss is not divided for gradient accumulation
    model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _grad_errors(ours, theirs) -> dict[str, float]:
    """Per parameter: max |ours - TRL| relative to max |TRL|."""
    assert ours.keys() == theirs.keys()
    return {
        n: ((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp(min=1e-30)).item()
        for n in theirs
    }


def _inputs(model_dir, batch, off_policy, scale_rewards="group"):
    advantages = group_advantages(torch.tensor(REWARDS), G, scale_rewards=scale_rewards)  # (N,)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    old, ref = _old_and_ref(model, batch, off_policy)
    return advantages, old, ref


def test_batch_clips_on_both_sides(tiny_model_dir, batch):
    """The off-policy inputs select the clipped branch from below and from above."""
    advantages, old, _ = _inputs(tiny_model_dir, batch, off_policy=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        logp = completion_logprobs(
            model, *batch[:3], temperature=TEMPERATURE, completion_mask=batch[3]
        )  # (N, T)
    ratio = torch.exp(logp - old)  # (N, T)
    keep, adv = batch[3].bool(), advantages[:, None]  # (N, T), (N, 1)
    assert (keep & (ratio < 0.8) & (adv < 0)).any()
    assert (keep & (ratio > 1.28) & (adv > 0)).any()


@pytest.mark.parametrize("off_policy", [False, True], ids=["mu1", "mu2"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(
    ("loss_type", "scale_rewards"), [("grpo", "group"), ("dr_grpo", "none"), ("dapo", "group")]
)
def test_update_matches_trl(
    tiny_model_dir, batch, tmp_path, loss_type, scale_rewards, beta, off_policy
):
    """Loss within 1e-6 and every parameter's gradient within 5e-6 (relative) of TRL's, with
    TRL's KL set to the k3 KL we use (`use_bias_correction_kl=False`)."""
    advantages, old, ref = _inputs(tiny_model_dir, batch, off_policy, scale_rewards)
    cfg = _cfg(
        loss_type=loss_type, scale_rewards=scale_rewards, beta=beta, mu=2 if off_policy else 1
    )
    loss, grads = _ours(tiny_model_dir, batch, cfg, advantages, old, ref, tmp_path)
    trl_loss, trl_grads = _trl(
        tiny_model_dir,
        batch,
        tmp_path,
        advantages,
        old,
        ref,
        loss_type=loss_type,
        scale_rewards=scale_rewards,
        beta=beta,
    )
    assert abs(loss - trl_loss) < LOSS_TOL, (loss, trl_loss)
    errors = _grad_errors(grads, trl_grads)
    assert max(errors.values()) < GRAD_TOL, errors
    flat, trl_flat = (
        torch.cat([g[n].flatten() for n in sorted(g)]).double() for g in (grads, trl_grads)
    )
    cosine = torch.nn.functional.cosine_similarity(flat, trl_flat, dim=0).item()
    assert cosine > 1 - 1e-10


def test_all_equal_group_advantages_differ_from_trl(tiny_model_dir, tmp_path):
    """Documented difference: a group of 12 equal rewards 0.7 gets exactly 0 from us; TRL divides
    the float32 mean's rounding residue (~1e-7) by a ~1e-7 std + 1e-4, a non-zero advantage.
    A group with varied rewards gets the same advantages from both."""
    group = 12
    rewards = [0.7] * group + [0.1 * k for k in range(group)]
    ours = group_advantages(torch.tensor(rewards), group)  # (24,)
    trainer = _trl_trainer(
        tmp_path, tiny_model_dir, num_generations=group, per_device_train_batch_size=24
    )
    prompt = trainer.processing_class("Tom has 3 apples.")["input_ids"]

    def fixed_rollouts(prompts):  # stands in for generation: one EOS-ended completion per row
        completions = [[5 + row % 7, EOS] for row in range(len(prompts))]
        texts = trainer.processing_class.batch_decode(completions)
        return [prompt] * len(prompts), completions, None, texts, None, {}, None, None

    trainer._generate = fixed_rollouts
    trainer.reward_funcs = [lambda completions, reward, **_: reward]
    out = trainer._generate_and_score_completions(
        [{"prompt": "Tom has 3 apples.", "reward": r} for r in rewards]
    )
    theirs = out["advantages"]  # (24,)
    assert torch.equal(ours[:group], torch.zeros(group))
    assert theirs[:group].abs().min() > 1e-4  # the residue over (std + 1e-4): ~1e-3 here
    assert (ours[group:] - theirs[group:]).abs().max() < 1e-6


@pytest.mark.parametrize("off_policy", [False, True], ids=["mu1", "mu2"])
def test_trl_default_ratio_weighted_kl_differs(tiny_model_dir, batch, tmp_path, off_policy):
    """Documented difference: TRL's default `use_bias_correction_kl=True` multiplies the k3 KL by
    the importance ratio; ours is the DeepSeekMath k3 KL. On-policy the ratio is 1, so the losses
    agree, but its gradient still differs; off-policy the loss differs too. Turned off, TRL
    equals ours (`test_update_matches_trl`)."""
    advantages, old, ref = _inputs(tiny_model_dir, batch, off_policy)
    cfg = _cfg(loss_type="grpo", beta=0.04, mu=2 if off_policy else 1)
    loss, grads = _ours(tiny_model_dir, batch, cfg, advantages, old, ref, tmp_path)
    trl_loss, trl_grads = _trl(
        tiny_model_dir,
        batch,
        tmp_path,
        advantages,
        old,
        ref,
        loss_type="grpo",
        scale_rewards="group",
        beta=0.04,
        use_bias_correction_kl=True,
    )
    errors = _grad_errors(grads, trl_grads)
    if off_policy:
        assert abs(loss - trl_loss) > 50 * LOSS_TOL  # 1.2e-4 here
    else:
        assert abs(loss - trl_loss) < LOSS_TOL
    assert max(errors.values()) > 1e-3
