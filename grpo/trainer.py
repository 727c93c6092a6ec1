"""The GRPO loop: sample prompts, roll out groups, score, update, log and checkpoint.

Owns the order of one GRPO step (numbered below) and the state a run carries: the prompt sampler
position, optimizer, scheduler and RNG states (all in each checkpoint, ready for resume). Loss
math lives in `grpo.loss`, generation and log-probs in `grpo.rollout`, rewards in `grpo.rewards`.

Differences from the tutorial, each on purpose (see SEED.md): rollouts use the KV cache in eval
mode and sample the raw policy; master weights and AdamW states stay fp32 (bf16 autocast only on
a bf16-capable GPU); the old-policy forward is skipped when mu == 1 and the reference forward when
beta == 0; every metric the tutorial lacked is logged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo.config import TrainConfig
from grpo.fsutil import atomic_dir
from grpo.loss import group_advantages, grpo_loss, zero_std_fraction
from grpo.rewards import RewardFunctions
from grpo.rollout import (
    ANSWER_CLOSE,
    Generated,
    chat_prompt,
    completion_logprobs,
    generate,
    sampling_config,
    truncate_at_answer,
)

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
KEEP_CHECKPOINTS = 2


class PromptSampler:
    """Seeded epochs over the records: each epoch a fresh permutation, no repeats within one."""

    def __init__(self, num_records: int, seed: int) -> None:
        self.num_records = num_records
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_records))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self, count: int) -> list[int]:
        """The next `count` record indices."""
        out = []
        while len(out) < count:
            if self.position == self.num_records:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def lr_lambda(cfg: TrainConfig, total_updates: int):
    """Multiplier of the peak learning rate at each optimizer update of one iteration."""

    kind, warmup = cfg.lr_scheduler, cfg.warmup_steps

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (update - warmup) / max(1, total_updates - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_context(device: torch.device):
    """bf16 autocast on a bf16-capable GPU; nothing elsewhere (bf16 on CPU is ~10x slower)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class MetricsLogger:
    """Step metrics to DVCLive (for `dvc plots show`) and optionally to Weights & Biases."""

    def __init__(self, log_dir: Path, cfg: TrainConfig, run_config: Mapping[str, Any]) -> None:
        from dvclive import Live

        self.live = Live(dir=str(log_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        self.wandb = None
        mode, project = cfg.wandb, cfg.wandb_project
        if mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=project, mode=mode, config=dict(run_config), dir=str(log_dir)
            )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.next_step()
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        self.live.end()
        if self.wandb is not None:
            self.wandb.finish()


@dataclass
class Rollout:
    """One step's rollouts with everything the update needs."""

    gen: Generated
    rewards: torch.Tensor  # (N,)
    components: dict[str, list[float]]
    advantages: torch.Tensor  # (N,)
    old_logp: torch.Tensor | None  # (N, T)
    ref_logp: torch.Tensor | None  # (N, T)
    generation_seconds: float


def save_checkpoint(
    folder: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: Mapping[str, Any],
) -> Path:
    """Write `checkpoints/step-XXXXXX` atomically, with a COMPLETE marker; keep the newest few."""
    target = folder / CHECKPOINTS / f"step-{state['step']:06d}"
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / COMPLETE).write_text("")
    done = sorted(p for p in (folder / CHECKPOINTS).glob("step-*") if (p / COMPLETE).exists())
    for old in done[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return target


class GRPOTrainer:
    """Runs `cfg.num_iterations` x `cfg.num_steps` GRPO steps on `policy` in place."""

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        records: Sequence[Mapping[str, str]],
        cfg: TrainConfig,
        rewards: RewardFunctions,
        *,
        system: str,
        eos_ids: Sequence[int],
        out_dir: Path,
        progress: bool = True,
    ) -> None:
        self.policy = policy
        self.tokenizer = tokenizer
        self.records = records
        self.cfg = cfg
        self.reward_fns = rewards
        self.system = system
        self.eos_ids = list(eos_ids)
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.device = next(policy.parameters()).device
        self.sampler = PromptSampler(len(records), cfg.seed)
        self.gen_config = sampling_config(
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            eos_ids=self.eos_ids,
            pad_id=tokenizer.pad_token_id,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop_strings=[ANSWER_CLOSE] if cfg.stop_at_answer else [],
        )
        if cfg.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            policy.config.use_cache = False

    # -- one step ------------------------------------------------------------------------------

    def _logprobs(self, model: PreTrainedModel, gen: Generated) -> torch.Tensor:
        with autocast_context(self.device):
            return completion_logprobs(
                model,
                gen.prompt_ids,
                gen.prompt_mask,
                gen.completion_ids,
                temperature=self.cfg.temperature,
                chunk_size=self.cfg.micro_batch_size,
            )  # (N, T)

    def rollout(self, ref: PreTrainedModel | None) -> Rollout:
        cfg = self.cfg
        # 1. sample B prompts and generate G completions each (KV cache, eval mode)
        batch = [self.records[i] for i in self.sampler.next(cfg.batch_size)]
        prompts = [chat_prompt(self.tokenizer, r["question"], self.system) for r in batch]
        start = time.perf_counter()
        with autocast_context(self.device):
            gen = generate(
                self.policy,
                self.tokenizer,
                prompts,
                self.gen_config,
                num_return_sequences=cfg.num_generations,
            )
        if cfg.stop_at_answer:
            gen = truncate_at_answer(gen, self.tokenizer)
        generation_seconds = time.perf_counter() - start
        # 2. score every completion against its prompt's gold answer
        golds = [r["gold"] for r in batch for _ in range(cfg.num_generations)]
        scores = [self.reward_fns.score(t, g) for t, g in zip(gen.texts, golds, strict=True)]
        components = {name: [s[name] for s in scores] for name in self.reward_fns.names}
        rewards = torch.tensor([sum(s.values()) for s in scores], dtype=torch.float32)  # (N,)
        # 3. group-relative advantages (groups = consecutive G rows, never split)
        advantages = group_advantages(
            rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards
        ).to(self.device)  # (N,)
        # 4. old-policy log-probs only when mu > 1; reference log-probs only when beta > 0
        with torch.inference_mode():
            old_logp = self._logprobs(self.policy, gen) if cfg.mu > 1 else None
            ref_logp = self._logprobs(ref, gen) if ref is not None else None
        return Rollout(gen, rewards, components, advantages, old_logp, ref_logp, generation_seconds)

    def update(self, ro: Rollout, optimizer, scheduler) -> dict[str, float]:
        """`mu` optimizer updates on one rollout batch, micro-batched."""
        cfg = self.cfg
        n = ro.gen.completion_ids.shape[0]
        total_tokens = float(ro.gen.completion_mask.sum())
        stats: dict[str, float] = {}
        self.policy.train()
        for _ in range(cfg.mu):
            optimizer.zero_grad(set_to_none=True)
            loss_sum = kl_sum = clip_sum = 0.0
            for begin in range(0, n, cfg.micro_batch_size):
                rows = slice(begin, begin + cfg.micro_batch_size)
                mask = ro.gen.completion_mask[rows]  # (m, T)
                with autocast_context(self.device):
                    logp = completion_logprobs(
                        self.policy,
                        ro.gen.prompt_ids[rows],
                        ro.gen.prompt_mask[rows],
                        ro.gen.completion_ids[rows],
                        temperature=cfg.temperature,
                        chunk_size=cfg.micro_batch_size,
                    )  # (m, T)
                out = grpo_loss(
                    logp,
                    None if ro.old_logp is None else ro.old_logp[rows],
                    None if ro.ref_logp is None else ro.ref_logp[rows],
                    ro.advantages[rows],
                    mask,
                    beta=cfg.beta,
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.epsilon_high,
                    loss_type=cfg.loss_type,
                    max_completion_length=cfg.max_completion_length,
                )
                # weight so the accumulated gradient equals the full-batch loss's gradient
                share = out.num_tokens / max(total_tokens, 1.0)
                weight = share if cfg.loss_type == "dapo" else mask.shape[0] / n
                (out.loss * weight).backward()
                loss_sum += out.loss.item() * weight
                kl_sum += out.kl * out.num_tokens
                clip_sum += out.clip_ratio * out.num_tokens
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            stats = {
                "loss": loss_sum,
                "kl": kl_sum / max(total_tokens, 1.0),
                "clip_ratio": clip_sum / max(total_tokens, 1.0),
                "grad_norm": float(grad_norm),
            }
        self.policy.eval()
        return stats

    # -- the loop ------------------------------------------------------------------------------

    def train(self, log_dir: Path, run_config: Mapping[str, Any]) -> dict[str, float]:
        """Run every iteration and step; return a summary of the run."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        logger = MetricsLogger(log_dir, cfg, run_config)
        total_steps = cfg.num_iterations * cfg.num_steps
        bar = tqdm(total=total_steps, desc="grpo", unit="step", disable=not self.progress)
        history: list[float] = []
        step = 0
        try:
            for iteration in range(cfg.num_iterations):
                # reference = frozen copy of the current policy; fresh optimizer and schedule
                ref = None
                if cfg.beta > 0:
                    ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
                optimizer = torch.optim.AdamW(
                    self.policy.parameters(),
                    lr=cfg.learning_rate,
                    weight_decay=cfg.weight_decay,
                    **({"fused": True} if self.device.type == "cuda" else {}),
                )
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lr_lambda(cfg, cfg.num_steps * cfg.mu)
                )
                for _ in range(cfg.num_steps):
                    step += 1
                    start = time.perf_counter()
                    lr = scheduler.get_last_lr()[0]
                    ro = self.rollout(ref)
                    stats = self.update(ro, optimizer, scheduler)
                    seconds = time.perf_counter() - start
                    metrics = self._step_metrics(ro, stats, lr, seconds)
                    metrics["iteration"] = iteration
                    logger.log(step, metrics)
                    history.append(metrics["reward/mean"])
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", s=f"{seconds:.0f}")
                    if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                        state = {
                            "step": step,
                            "iteration": iteration,
                            "sampler": self.sampler.state(),
                        }
                        save_checkpoint(self.out_dir, self.policy, optimizer, scheduler, state)
        finally:
            bar.close()
            logger.close()
        quarter = max(1, len(history) // 4)
        return {
            "steps": step,
            "reward_first_quarter": sum(history[:quarter]) / quarter,
            "reward_last_quarter": sum(history[-quarter:]) / quarter,
        }

    def _step_metrics(
        self, ro: Rollout, stats: Mapping[str, float], lr: float, seconds: float
    ) -> dict[str, float]:
        gen_s = ro.generation_seconds
        lengths = torch.tensor(ro.gen.num_tokens, dtype=torch.float32)
        metrics = {
            "reward/mean": ro.rewards.mean().item(),
            "reward/std": ro.rewards.std().item(),
        }
        for name, values in ro.components.items():
            t = torch.tensor(values)
            metrics[f"reward/{name}"] = t.mean().item()
            metrics[f"reward/{name}_std"] = t.std().item()
        metrics |= {
            "frac_reward_zero_std": zero_std_fraction(ro.rewards, self.cfg.num_generations),
            "completion/mean_length": lengths.mean().item(),
            "completion/max_length": lengths.max().item(),
            "completion/truncated_rate": sum(ro.gen.truncated) / len(ro.gen.truncated),
            "learning_rate": lr,
            "time/step_seconds": seconds,
            "time/generation_seconds": gen_s,
            "time/generated_tokens_per_second": lengths.sum().item() / max(gen_s, 1e-9),
            **stats,
        }
        return metrics
