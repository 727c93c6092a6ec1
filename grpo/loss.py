"""Group-relative advantages and the clipped GRPO policy loss (torch only).

Owns the math of one GRPO update given per-token log-probs: how rewards become advantages
(`group_advantages`), the per-token clipped surrogate with the k3 KL penalty, and how tokens are
aggregated into one scalar (`grpo_loss`). No model, tokenizer or optimizer lives here.

Shapes: B prompts, G completions per prompt (`group_size`), N = B*G sequences stored as
consecutive blocks of G rows per prompt, T completion tokens.

Variants, each selected by one named option:
- ``scale_rewards="group"`` divides by the group std (the tutorial, DeepSeekMath GRPO);
  ``"none"`` keeps only the mean-centering (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783).
- ``loss_type="grpo"`` averages tokens within each sequence, then sequences (the tutorial);
  ``"dr_grpo"`` sums tokens and divides by the constant N * max_completion_length (Dr. GRPO);
  ``"dapo"`` averages over all tokens of the batch (DAPO, Yu et al. 2025, arXiv:2503.14476).
- ``epsilon_high`` is DAPO's clip-higher: a wider upper clip than lower.

>>> group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, scale_rewards="none")
tensor([-1.,  0.,  1.,  0.,  0.,  0.])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpo.config import LOSS_TYPES, SCALE_REWARDS, LossType, ScaleRewards


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """Rewards (N,) as (B, G) after checking that whole groups tile them."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.shape[0]
    if n == 0 or n % group_size != 0:
        raise ValueError(
            f"rewards has {n} entries, not a positive multiple of group_size={group_size}; "
            "each prompt's group of completions must be complete and consecutive"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    return rewards.view(-1, group_size)  # (B, G)


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    A = r - mean(group), divided by (std(group) + eps) when ``scale_rewards == "group"``. The std
    is the unbiased one (Bessel's correction, ``torch.std``'s default, as in the tutorial), so a
    group of two rewards {a, b} with a > b gets A = +-1/sqrt(2), not +-1. A group whose rewards
    are all equal carries no signal and gets exactly zero advantages (never NaN, never a rounding
    residue of the mean).

    rewards: (N,) with N = B*G, rows [b*G, (b+1)*G) the G completions of prompt b.
    Returns (N,) in the rewards' floating dtype.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    if group_size == 1:
        raise ValueError("group_size=1 makes every advantage zero; GRPO needs >= 2 per prompt")
    grouped = _groups(rewards, group_size)  # (B, G)
    if not torch.isfinite(grouped).all():
        raise ValueError("rewards contain NaN or inf")
    # 1. center on the group mean
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    # 2. optionally scale by the group's unbiased std
    if scale_rewards == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)  # (B, G)
    # 3. zero-std groups: exactly zero, whatever the mean's rounding
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    advantages = torch.where(constant, torch.zeros_like(centered), centered)  # (B, G)
    return advantages.reshape(-1)  # (N,)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (they contribute no policy gradient)."""
    grouped = _groups(rewards, group_size)  # (B, G)
    constant = (grouped == grouped[:, :1]).all(dim=1)  # (B,)
    return constant.float().mean().item()


@dataclass(frozen=True)
class LossOutput:
    """The scalar to backpropagate and plain-float statistics over the masked tokens."""

    loss: Tensor
    """Scalar, differentiable with respect to `logp`."""
    kl: float
    """Mean per-token k3 KL(policy || reference) over masked tokens; 0.0 without `ref_logp`."""
    clip_ratio: float
    """Fraction of masked tokens whose clipped branch was selected (low + high)."""
    clip_ratio_low: float
    """Fraction of masked tokens with ratio < 1 - epsilon and A < 0 (clipped from below)."""
    clip_ratio_high: float
    """Fraction of masked tokens with ratio > 1 + epsilon_high and A > 0 (clipped from above)."""
    ratio_mean: float
    """Mean importance ratio pi/pi_old over masked tokens (1.0 exactly when on-policy)."""
    num_tokens: float
    """Number of masked (completion) tokens in the batch."""


def _check_shape(name: str, x: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} like logp, got {tuple(x.shape)}")


def grpo_loss(
    logp: Tensor,  # (N, T) current-policy log-prob of each completion token (requires grad)
    old_logp: Tensor | None,  # (N, T) log-probs at rollout time; None = on-policy (mu == 1)
    ref_logp: Tensor | None,  # (N, T) reference-model log-probs; None = no KL term (beta == 0)
    advantages: Tensor,  # (N,)
    mask: Tensor,  # (N, T) 1 for completion tokens up to and including the first EOS, 0 after
    *,
    beta: float,
    epsilon: float,
    epsilon_high: float | None = None,
    loss_type: LossType = "grpo",
    max_completion_length: int | None = None,
) -> LossOutput:
    """The clipped GRPO objective with a k3 KL penalty, negated into a loss.

    Per token: ratio = exp(logp - old_logp); surrogate = min(ratio*A, clip(ratio, 1 - epsilon,
    1 + epsilon_high)*A); KL = exp(ref - logp) - (ref - logp) - 1; loss_t = -(surrogate - beta*KL).
    `old_logp=None` uses `logp.detach()`: the ratio is exactly 1 but its gradient still flows, so
    the surrogate's gradient is A * grad(logp). `epsilon_high` defaults to `epsilon`. With
    `beta == 0` the KL is only measured (if `ref_logp` is given), never added to the loss.

    Aggregation (`loss_type`): "grpo" = mean over sequences of each sequence's token mean (an
    all-zero mask row contributes 0); "dr_grpo" = token sum / (N * max_completion_length);
    "dapo" = token sum / number of masked tokens.

    Values at masked-out positions are never used: any garbage there, including inf and NaN,
    changes neither the loss nor any gradient, and their gradient is exactly zero. The math runs
    in at least float32 (bf16 inputs are upcast); the mask may be bool, int or float 0/1.
    """
    # 1. validate options and shapes
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be 2-D (N, T), got shape {tuple(logp.shape)}")
    if not logp.is_floating_point():
        raise ValueError(f"logp must be a floating tensor, got {logp.dtype}")
    n, t = logp.shape
    if n == 0:
        raise ValueError("logp has no sequences (N == 0)")
    _check_shape("mask", mask, (n, t))
    if old_logp is not None:
        _check_shape("old_logp", old_logp, (n, t))
    if ref_logp is not None:
        _check_shape("ref_logp", ref_logp, (n, t))
    if tuple(advantages.shape) != (n,):
        raise ValueError(f"advantages must have shape ({n},), got {tuple(advantages.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (pass beta=0 to drop the KL term)")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"epsilon and epsilon_high must be >= 0, got {eps_low}, {eps_high}")
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must contain only 0 and 1")
    keep = mask != 0  # (N, T) bool
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError(
                "loss_type='dr_grpo' needs max_completion_length >= 1 "
                f"(got {max_completion_length})"
            )
        longest = int(keep.sum(dim=1).max().item())
        if longest > max_completion_length:
            raise ValueError(
                f"a sequence has {longest} masked tokens > max_completion_length="
                f"{max_completion_length}"
            )

    # 2. replace masked-out positions by 0 with `where` (not `*`), so NaN/inf never leak
    dtype = torch.promote_types(logp.dtype, torch.float32)
    weights = keep.to(dtype)  # (N, T)
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    cur = torch.where(keep, logp.to(dtype), zero)  # (N, T)
    old = cur.detach() if old_logp is None else torch.where(keep, old_logp.to(dtype), zero)
    adv = advantages.to(dtype).unsqueeze(1)  # (N, 1)

    # 3. clipped surrogate
    ratio = torch.exp(cur - old)  # (N, T), 1 at masked-out positions
    unclipped = ratio * adv  # (N, T)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv  # (N, T)
    per_token = -torch.minimum(unclipped, clipped)  # (N, T)

    # 4. k3 KL to the reference: exp(d) - d - 1 with d = ref - logp, >= 0, 0 iff equal
    kl = None
    if ref_logp is not None:
        d = torch.where(keep, ref_logp.to(dtype), zero) - cur  # (N, T), 0 at masked-out
        kl = torch.exp(d) - d - 1  # (N, T)
        if beta > 0:
            per_token = per_token + beta * kl  # (N, T)
    per_token = torch.where(keep, per_token, zero)  # (N, T)

    # 5. aggregate tokens into one scalar
    lengths = weights.sum(dim=1)  # (N,)
    num_tokens = lengths.sum()  # ()
    if loss_type == "grpo":
        loss = (per_token.sum(dim=1) / lengths.clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = per_token.sum() / (n * max_completion_length)
    else:
        loss = per_token.sum() / num_tokens.clamp(min=1)

    # 6. statistics over masked tokens, fetched to the host together
    with torch.no_grad():
        denom = num_tokens.clamp(min=1)
        low = keep & (ratio < 1 - eps_low) & (adv < 0)  # (N, T)
        high = keep & (ratio > 1 + eps_high) & (adv > 0)  # (N, T)
        kl_sum = zero if kl is None else torch.where(keep, kl, zero).sum()
        ratio_sum = torch.where(keep, ratio, zero).sum()
        kl_mean, clip, clip_low, clip_high, ratio_mean, count = torch.stack(
            [
                kl_sum / denom,
                (low | high).sum() / denom,
                low.sum() / denom,
                high.sum() / denom,
                ratio_sum / denom,
                num_tokens,
            ]
        ).tolist()
    return LossOutput(
        loss=loss,
        kl=kl_mean,
        clip_ratio=clip,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        ratio_mean=ratio_mean,
        num_tokens=count,
    )
