"""Hand-computed tests of grpo/loss.py on tiny tensors: advantages, clipping, KL, aggregation.

Run: .venv/bin/python -m pytest tests/test_loss.py -q
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import grpo.loss
from grpo.loss import LOSS_TYPES, group_advantages, grpo_loss, zero_std_fraction

F64 = torch.float64


def t(values: list, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def leaf(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=F64, requires_grad=True)


def test_module_doctests() -> None:
    result = doctest.testmod(grpo.loss)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- advantages


def test_group_advantages_hand_example() -> None:
    # group [1, 2, 3]: mean 2, centered [-1, 0, 1], unbiased var (1 + 0 + 1) / 2 = 1, std 1
    # group [0, 2, 4]: mean 2, centered [-2, 0, 2], unbiased var (4 + 0 + 4) / 2 = 4, std 2
    eps = 1e-4
    adv = group_advantages(t([1, 2, 3, 0, 2, 4]), 3)
    expected = t([-1 / (1 + eps), 0, 1 / (1 + eps), -2 / (2 + eps), 0, 2 / (2 + eps)])
    torch.testing.assert_close(adv, expected)


def test_group_advantages_unbiased_std_for_two() -> None:
    # [0, 2.8]: mean 1.4, centered [-1.4, 1.4], unbiased var (1.96 + 1.96) / 1 = 3.92,
    # std 1.4 * sqrt(2), so A = +-1.4 / (1.4 * sqrt(2) + eps) ~ +-1/sqrt(2) (biased std gives +-1)
    adv = group_advantages(t([0.0, 2.8]), 2)
    a = 1.4 / (1.4 * math.sqrt(2) + 1e-4)
    torch.testing.assert_close(adv, t([-a, a]))


def test_scale_rewards_none_only_centers() -> None:
    # Dr. GRPO: [1, 2, 3] - 2 and [0, 2, 4] - 2, no std division
    adv = group_advantages(t([1, 2, 3, 0, 2, 4]), 3, scale_rewards="none")
    torch.testing.assert_close(adv, t([-1, 0, 1, -2, 0, 2]))


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_zero_std_group_gives_exact_zeros(scale_rewards: str, eps: float) -> None:
    # 2.8 * 12 in float32: the mean is off by ~5e-7, which / (0 + 1e-4) would be 5e-3, not 0
    rewards = torch.cat([torch.full((12,), 2.8), torch.arange(12.0)])  # (24,) float32
    adv = group_advantages(rewards, 12, scale_rewards=scale_rewards, eps=eps)
    assert adv.dtype == torch.float32
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[:12], torch.zeros(12))
    assert (adv[12:] != 0).any()


def test_integer_rewards_are_accepted() -> None:
    adv = group_advantages(torch.tensor([0, 2, 0, 0]), 2, scale_rewards="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_zero_std_fraction() -> None:
    assert zero_std_fraction(t([1, 1, 1, 0, 2, 0, 0.5, 0.5, 0.5]), 3) == pytest.approx(2 / 3)
    assert zero_std_fraction(t([0, 1, 2, 3]), 2) == 0.0


@pytest.mark.parametrize(
    ("rewards", "group_size", "kwargs", "match"),
    [
        (t([1, 2, 3, 4]), 1, {}, "group_size=1"),
        (t([1, 2, 3, 4, 5]), 2, {}, "multiple of group_size=2"),
        (t([]), 2, {}, "multiple of group_size"),
        (t([[1, 2], [3, 4]]), 2, {}, "1-D"),
        (t([1, 2, 3, 4]), 2, {"scale_rewards": "batch"}, "'group', 'none'"),
        (t([1, float("nan"), 3, 4]), 2, {}, "NaN"),
    ],
)
def test_group_advantages_errors(rewards, group_size, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size, **kwargs)


def test_zero_std_fraction_errors() -> None:
    with pytest.raises(ValueError, match="multiple"):
        zero_std_fraction(t([1, 2, 3]), 2)


# ---------------------------------------------------------------- padding, masks, EOS


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """N=4 sequences of lengths 3, 1, 4, 2 in T=4, off-policy, with a reference model."""
    g = torch.Generator().manual_seed(seed)
    n, tt = 4, 4
    mask = (torch.arange(tt)[None, :] < torch.tensor([3, 1, 4, 2])[:, None]).long()  # (N, T)
    logp = -torch.rand(n, tt, generator=g, dtype=F64) * 2  # (N, T)
    old = logp + 0.3 * torch.randn(n, tt, generator=g, dtype=F64)  # (N, T) some ratios clip
    ref = logp + 0.2 * torch.randn(n, tt, generator=g, dtype=F64)  # (N, T)
    adv = t([1.0, -0.5, 0.7, -1.2])  # (N,)
    return {"logp": logp, "old_logp": old, "ref_logp": ref, "advantages": adv, "mask": mask}


def _run(b: dict[str, torch.Tensor], loss_type: str, **kw):
    logp = b["logp"].clone().requires_grad_(True)
    out = grpo_loss(
        logp,
        b["old_logp"],
        b["ref_logp"],
        b["advantages"],
        b["mask"],
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type=loss_type,
        max_completion_length=8,
        **kw,
    )
    out.loss.backward()
    return out, logp.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_never_changes_loss_or_gradient(loss_type: str) -> None:
    b = _batch()
    base, base_grad = _run(b, loss_type)
    assert base.clip_ratio > 0  # the example exercises the clipped branch
    # 1. garbage at the existing padded positions (huge values whose exp overflows) ...
    # 2. ... and 3 appended columns of garbage (finite, huge, inf, NaN) with mask 0
    garbage = t([[1e30, -1e30, float("inf")], [float("nan"), 7.0, -float("inf")]] * 2)  # (4, 3)
    fill = {"logp": -3e4, "old_logp": 5e4, "ref_logp": 5e4}
    padded = {}
    for key, value in fill.items():
        x = torch.where(b["mask"].bool(), b[key], t(value))  # (4, 4)
        junk = garbage.flip(1) if key == "ref_logp" else garbage  # (4, 3)
        padded[key] = torch.cat([x, junk], dim=1)  # (4, 7)
    padded["mask"] = torch.cat([b["mask"], torch.zeros(4, 3, dtype=torch.long)], dim=1)
    padded["advantages"] = b["advantages"]
    out, grad = _run(padded, loss_type)
    # equal up to float64 summation order (wider rows are reduced in a different order)
    torch.testing.assert_close(out.loss, base.loss)
    torch.testing.assert_close(grad[:, :4], base_grad)
    assert torch.equal(grad[:, 4:], torch.zeros(4, 3, dtype=F64))
    assert (grad[:, :4][b["mask"] == 0] == 0).all()
    for stat in ("kl", "clip_ratio", "ratio_mean", "num_tokens"):
        assert getattr(out, stat) == pytest.approx(getattr(base, stat))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.long, torch.float32, F64])
def test_mask_dtypes_are_equivalent(dtype: torch.dtype) -> None:
    b = _batch()
    base, base_grad = _run(b, "grpo")
    out, grad = _run({**b, "mask": b["mask"].to(dtype)}, "grpo")
    assert torch.equal(out.loss, base.loss)
    assert torch.equal(grad, base_grad)


def test_eos_token_contributes() -> None:
    # lengths 3 and 2: the EOS (last masked token) sits at t=2 and t=1
    b = _batch()
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    logp = b["logp"][:2].clone().requires_grad_(True)
    out = grpo_loss(logp, None, None, t([1.0, -1.0]), mask, beta=0.0, epsilon=0.2)
    out.loss.backward()
    assert logp.grad[0, 2] != 0 and logp.grad[1, 1] != 0
    assert logp.grad[0, 3] == 0 and logp.grad[1, 2] == 0


def test_all_zero_mask_row_is_not_nan() -> None:
    # row 1 has no tokens: it contributes 0 to its sequence mean, so loss = (-1 + 0) / 2
    logp = leaf([[-1.0, -2.0], [-1.0, -2.0]])
    mask = t([[1, 0], [0, 0]])
    for loss_type in LOSS_TYPES:
        out = grpo_loss(
            logp,
            None,
            None,
            t([1.0, 3.0]),
            mask,
            beta=0.0,
            epsilon=0.2,
            loss_type=loss_type,
            max_completion_length=2,
        )
        assert torch.isfinite(out.loss)
    out = grpo_loss(logp, None, None, t([1.0, 3.0]), mask, beta=0.0, epsilon=0.2)
    assert out.loss.item() == pytest.approx(-0.5)
    empty = grpo_loss(logp, None, None, t([1.0, 3.0]), torch.zeros(2, 2), beta=0.0, epsilon=0.2)
    assert empty.loss.item() == 0.0 and empty.num_tokens == 0.0 and empty.kl == 0.0


def test_bf16_inputs_compute_in_float32() -> None:
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    out = grpo_loss(logp, None, None, t([2.0]), torch.ones(1, 2), beta=0.0, epsilon=0.2)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert logp.grad.dtype == torch.bfloat16
    assert logp.grad.tolist() == [[-1.0, -1.0]]  # -A / len = -2 / 2


# ---------------------------------------------------------------- clipping


def _one_token(ratio: float, a: float, epsilon: float = 0.2, epsilon_high: float | None = None):
    """Loss and gradient for a single token with old_logp = 0 and logp = log(ratio)."""
    logp = leaf([[math.log(ratio)]])
    eps = {"epsilon": epsilon, "epsilon_high": epsilon_high}
    out = grpo_loss(logp, t([[0.0]]), None, t([a]), t([[1]]), beta=0.0, **eps)
    out.loss.backward()
    return out, logp.grad.item()


@pytest.mark.parametrize(
    ("ratio", "a"), [(1.1, 1.0), (0.9, 1.0), (1.1, -1.0), (0.9, -1.0), (1.0, 2.0)]
)
def test_ratio_inside_trust_region_is_unclipped(ratio: float, a: float) -> None:
    # loss = -ratio * A, d loss / d logp = -ratio * A (d ratio / d logp = ratio)
    out, grad = _one_token(ratio, a)
    assert out.loss.item() == pytest.approx(-ratio * a)
    assert grad == pytest.approx(-ratio * a)
    assert out.clip_ratio == 0.0


def test_ratio_above_upper_bound_with_positive_advantage_is_clipped() -> None:
    # min(1.5 * 1, 1.2 * 1) = 1.2 (constant): loss -1.2, no gradient
    out, grad = _one_token(1.5, 1.0)
    assert out.loss.item() == pytest.approx(-1.2)
    assert grad == 0.0
    assert (out.clip_ratio, out.clip_ratio_high, out.clip_ratio_low) == (1.0, 1.0, 0.0)


def test_ratio_below_lower_bound_with_negative_advantage_is_clipped() -> None:
    # min(0.5 * -1, 0.8 * -1) = -0.8 (constant): loss 0.8, no gradient
    out, grad = _one_token(0.5, -1.0)
    assert out.loss.item() == pytest.approx(0.8)
    assert grad == 0.0
    assert (out.clip_ratio, out.clip_ratio_high, out.clip_ratio_low) == (1.0, 0.0, 1.0)


@pytest.mark.parametrize(("ratio", "a"), [(1.5, -1.0), (0.5, 1.0)])
def test_outside_region_in_the_harmless_direction_is_unclipped(ratio: float, a: float) -> None:
    # ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5; ratio 0.5, A=1: min(0.5, 0.8) = 0.5
    out, grad = _one_token(ratio, a)
    assert out.loss.item() == pytest.approx(-ratio * a)
    assert grad == pytest.approx(-ratio * a)
    assert out.clip_ratio == 0.0


def test_epsilon_high_widens_only_the_upper_side() -> None:
    # upper bound 1 + 0.6 = 1.6: ratio 1.5 with A=1 now unclipped (grad -1.5) ...
    out, grad = _one_token(1.5, 1.0, epsilon_high=0.6)
    assert (grad, out.clip_ratio) == (pytest.approx(-1.5), 0.0)
    # ... ratio 1.7 clipped at 1.6 ...
    out, grad = _one_token(1.7, 1.0, epsilon_high=0.6)
    assert (out.loss.item(), grad, out.clip_ratio_high) == (pytest.approx(-1.6), 0.0, 1.0)
    # ... and the lower bound stays 1 - 0.2 = 0.8
    out, grad = _one_token(0.5, -1.0, epsilon_high=0.6)
    assert (out.loss.item(), grad, out.clip_ratio_low) == (pytest.approx(0.8), 0.0, 1.0)


def test_clip_ratio_counts_only_masked_tokens() -> None:
    # tokens: ratio 1.5 (clipped, A=1), ratio 1.0 (inside), padding with ratio e^5 (ignored)
    logp = leaf([[math.log(1.5), 0.0, 5.0]])
    out = grpo_loss(logp, t([[0.0, 0.0, 0.0]]), None, t([1.0]), t([[1, 1, 0]]), beta=0, epsilon=0.2)
    assert out.clip_ratio == 0.5
    assert out.ratio_mean == pytest.approx((1.5 + 1.0) / 2)
    assert out.num_tokens == 2.0


# ---------------------------------------------------------------- KL


def test_kl_zero_when_policy_equals_reference() -> None:
    logp = leaf([[-1.0, -2.5, -0.3]])
    out = grpo_loss(
        logp, None, logp.detach().clone(), t([0.0]), torch.ones(1, 3), beta=0.5, epsilon=0.2
    )
    out.loss.backward()
    assert out.kl == 0.0
    assert out.loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(1, 3, dtype=F64))


def test_kl_matches_k3_by_hand() -> None:
    # d = ref - logp = -1.5 - (-1.0) = -0.5; k3 = exp(-0.5) - (-0.5) - 1 = 0.60653066 - 0.5
    # = 0.10653066. With A = 0 the loss is beta * k3; d k3 / d logp = 1 - exp(d) = 0.39346934.
    beta = 0.1
    logp = leaf([[-1.0]])
    out = grpo_loss(logp, None, t([[-1.5]]), t([0.0]), t([[1]]), beta=beta, epsilon=0.2)
    out.loss.backward()
    assert out.kl == pytest.approx(0.10653066)
    assert out.loss.item() == pytest.approx(beta * 0.10653066)
    assert logp.grad.item() == pytest.approx(beta * 0.39346934)


def test_kl_is_positive_and_averaged_over_masked_tokens() -> None:
    # tokens d = +0.5 and -0.5: k3 = (exp(.5) - 1.5) + (exp(-.5) - .5) = 0.14872127 + 0.10653066
    logp = leaf([[-1.0, -1.0, -9.0]])
    ref = t([[-0.5, -1.5, 0.0]])
    out = grpo_loss(logp, None, ref, t([0.0]), t([[1, 1, 0]]), beta=0.0, epsilon=0.2)
    assert out.kl == pytest.approx((0.14872127 + 0.10653066) / 2)
    assert out.loss.item() == 0.0  # beta = 0: measured, not in the loss


# ---------------------------------------------------------------- on-policy and aggregation


def test_on_policy_value_and_gradient_grpo() -> None:
    # lengths 3 and 2, A = [0.5, -1.5], ratio == 1: loss = -mean_i(A_i) = -(0.5 - 1.5) / 2 = 0.5
    # d loss / d logp_it = -A_i / (len_i * N): row 0 -0.5 / 6 = -1/12, row 1 1.5 / 4 = 0.375
    logp = leaf([[-0.2, -1.3, -0.7, -4.0], [-2.2, -0.1, -5.0, -6.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = grpo_loss(logp, None, None, t([0.5, -1.5]), mask, beta=0.0, epsilon=0.2)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.5)
    expected = t([[-1 / 12, -1 / 12, -1 / 12, 0], [0.375, 0.375, 0, 0]])
    torch.testing.assert_close(logp.grad, expected)
    assert out.ratio_mean == 1.0 and out.clip_ratio == 0.0


@pytest.mark.parametrize(
    ("loss_type", "loss", "grad_row0", "grad_row1"),
    [
        # per token loss is -A_i; row 0 has 1 token, row 1 has 3; A = [2, -1]
        # grpo: mean(-2 / 1, 3 / 3) = -0.5; grads -A_i / (len_i * N) = -1, 1/6
        ("grpo", -0.5, -1.0, 1 / 6),
        # dr_grpo: sum (-2 + 3) / (N * L = 2 * 4) = 0.125; grads -A_i / 8 = -0.25, 0.125
        ("dr_grpo", 0.125, -0.25, 0.125),
        # dapo: sum (-2 + 3) / 4 tokens = 0.25; grads -A_i / 4 = -0.5, 0.25
        ("dapo", 0.25, -0.5, 0.25),
    ],
)
def test_aggregations_on_unequal_lengths(loss_type, loss, grad_row0, grad_row1) -> None:
    logp = leaf([[-1.0, -7.0, -7.0], [-0.5, -0.25, -2.0]])
    mask = t([[1, 0, 0], [1, 1, 1]])
    out = grpo_loss(
        logp,
        None,
        None,
        t([2.0, -1.0]),
        mask,
        beta=0.0,
        epsilon=0.2,
        loss_type=loss_type,
        max_completion_length=4,
    )
    out.loss.backward()
    assert out.loss.item() == pytest.approx(loss)
    expected = t([[grad_row0, 0, 0], [grad_row1] * 3])
    torch.testing.assert_close(logp.grad, expected)


# ---------------------------------------------------------------- errors


def _call(**overrides):
    args = {
        "logp": torch.zeros(2, 3),
        "old_logp": None,
        "ref_logp": None,
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
        "beta": 0.0,
        "epsilon": 0.2,
    }
    args.update(overrides)
    return grpo_loss(**args)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"loss_type": "ppo"}, "'grpo', 'dr_grpo', 'dapo'"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"loss_type": "dr_grpo", "max_completion_length": 2}, "3 masked tokens"),
        ({"beta": 0.04}, "needs ref_logp"),
        ({"beta": -1.0, "ref_logp": torch.zeros(2, 3)}, "beta must be >= 0"),
        ({"epsilon": -0.1}, "epsilon"),
        ({"epsilon_high": -0.1}, "epsilon"),
        ({"mask": torch.ones(2, 4)}, "mask must have shape"),
        ({"old_logp": torch.zeros(3, 3)}, "old_logp must have shape"),
        ({"ref_logp": torch.zeros(2, 2)}, "ref_logp must have shape"),
        ({"advantages": torch.zeros(2, 1)}, "advantages must have shape"),
        ({"logp": torch.zeros(6)}, "2-D"),
        ({"logp": torch.zeros(2, 3, dtype=torch.long)}, "floating"),
        ({"logp": torch.zeros(0, 3), "mask": torch.ones(0, 3), "advantages": torch.zeros(0)}, "N"),
        ({"mask": torch.full((2, 3), 0.5)}, "only 0 and 1"),
    ],
)
def test_grpo_loss_errors(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


# ---------------------------------------------------------------- edges found by `make mutate`


def test_group_size_one_is_a_valid_grouping_for_the_zero_std_fraction() -> None:
    # a group of one reward is constant; 0 is no grouping at all
    assert zero_std_fraction(t([1.0, 2.0]), 1) == 1.0
    with pytest.raises(ValueError, match=r"^group_size must be >= 1, got 0$"):
        zero_std_fraction(t([1.0, 2.0]), 0)


@pytest.mark.parametrize(
    ("rewards", "group_size", "message"),
    [
        (t([1, 2, 3]), 2, "each prompt's group of completions must be complete and consecutive"),
        (t([1, 2]), 1, "group_size=1 makes every advantage zero; GRPO needs >= 2 per prompt"),
        (t([1, float("inf")]), 2, "rewards contain NaN or inf"),
    ],
)
def test_group_advantages_error_messages(rewards, group_size: int, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        group_advantages(rewards, group_size)
    assert str(caught.value).endswith(message)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"logp": torch.zeros(0, 3), "mask": torch.ones(0, 3), "advantages": torch.zeros(0)},
            "logp has no sequences (N == 0)",
        ),
        ({"mask": torch.full((2, 3), 2.0)}, "mask must contain only 0 and 1"),
        (
            {"loss_type": "dr_grpo", "max_completion_length": 0},
            "loss_type='dr_grpo' needs max_completion_length >= 1 (got 0)",
        ),
    ],
)
def test_grpo_loss_error_messages(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        _call(**overrides)
    assert str(caught.value) == message


def test_zero_epsilons_and_a_full_length_row_are_accepted() -> None:
    # epsilon 0 is a trust region of width 0, not an error; dr_grpo accepts a row exactly
    # max_completion_length long. On-policy at epsilon 0 the ratio sits on both bounds: unclipped
    logp = leaf([[-1.0], [-2.0]])
    out = grpo_loss(
        logp,
        logp.detach().clone(),
        None,
        t([1.0, -1.0]),
        t([[1], [1]]),
        beta=0.0,
        epsilon=0.0,
        epsilon_high=0.0,
        loss_type="dr_grpo",
        max_completion_length=1,
    )
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0)  # -(1 - 1) / (2 * 1)
    assert logp.grad.tolist() == [[-0.5], [0.5]]
    assert (out.clip_ratio, out.clip_ratio_low, out.clip_ratio_high) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(("ratio", "a"), [(0.5, 0.0), (0.5, 0.5), (1.5, 0.0)])
def test_a_zero_or_positive_advantage_is_not_clipped_from_below(ratio: float, a: float) -> None:
    out, _ = _one_token(ratio, a)
    assert (out.clip_ratio, out.clip_ratio_low, out.clip_ratio_high) == (0.0, 0.0, 0.0)


def test_clip_fractions_divide_by_the_token_count() -> None:
    # 4 tokens: one clipped from above, one from below, two inside
    logp = leaf([[math.log(1.5), math.log(0.5), 0.0, 0.0]])
    old = t([[0.0, 0.0, 0.0, 0.0]])
    up = grpo_loss(logp, old, None, t([1.0]), torch.ones(1, 4), beta=0.0, epsilon=0.2)
    down = grpo_loss(logp, old, None, t([-1.0]), torch.ones(1, 4), beta=0.0, epsilon=0.2)
    assert (up.clip_ratio_high, up.clip_ratio_low) == (0.25, 0.0)
    assert (down.clip_ratio_high, down.clip_ratio_low) == (0.0, 0.25)


def test_beta_zero_never_adds_the_kl_even_when_it_overflows() -> None:
    # ref - logp = 1000: exp overflows to inf; with beta 0 it is measured, not added (0 * inf)
    logp = leaf([[-1000.0]])
    out = grpo_loss(logp, None, t([[0.0]]), t([1.0]), t([[1]]), beta=0.0, epsilon=0.2)
    out.loss.backward()
    assert out.loss.item() == -1.0
    assert out.kl == math.inf
    assert logp.grad.tolist() == [[-1.0]]


def test_dapo_with_one_token_divides_by_one() -> None:
    logp = leaf([[-1.0, -1.0]])
    out = grpo_loss(
        logp, None, None, t([3.0]), t([[1, 0]]), beta=0.0, epsilon=0.2, loss_type="dapo"
    )
    assert out.loss.item() == -3.0
