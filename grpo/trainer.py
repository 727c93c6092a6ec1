"""One GRPO step: roll out groups for a batch of prompts, score them, update the policy.

Owns the order of one step (`rollout`, then `update`, numbered below) and the state it needs: the
policy and its reference, the optimizer and schedule of the current iteration, the prompt
sampler, and this rank's share of the global batch. The loop around it (iterations, resume,
signals, checkpoints) is `grpo.run`; what is logged, `grpo.metrics`. Loss math lives in
`grpo.loss`, generation in `grpo.generation`, log-probs in `grpo.scoring`, rewards in
`grpo.rewards`.

Differences from the tutorial, each on purpose (README lists its flaws): rollouts use the KV
cache in eval mode and sample the raw policy; master weights and AdamW states stay fp32 (bf16
autocast only on a bf16-capable GPU); the old-policy forward is skipped when mu == 1 and the
reference forward when beta == 0; every metric the tutorial lacked is logged.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo import checkpoint, distributed, model
from grpo.answer_format import ANSWER_CLOSE
from grpo.batches import PromptSampler, micro_batches
from grpo.config import TrainConfig
from grpo.device import autocast
from grpo.errors import UserError
from grpo.generation import Generated, generate, generation_config, truncate_at_answer
from grpo.loss import group_advantages, grpo_loss
from grpo.prompts import chat_prompt
from grpo.rewards import RewardFunctions
from grpo.sampling import Sampling, row_seeds
from grpo.schedule import lr_factor
from grpo.scoring import completion_logprobs

log = logging.getLogger(__name__)
# `grpo.loss.LossOutput` statistics logged as means over the global batch's completion tokens
TOKEN_MEANS = ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "ratio_mean")


class NonFiniteError(UserError):
    """A non-finite reward, loss or gradient with `train.nonfinite: stop`."""


def autocast_context(device: torch.device):
    """bf16 autocast where bf16 is native; nothing elsewhere (`grpo.device.autocast`)."""
    return autocast(device)


@dataclass
class Rollout:
    """One step's rollouts: this rank's rows, with what the update and the metrics need."""

    gen: Generated  # this rank's n rows
    table: torch.Tensor  # (N, 3 + C) every row of the global batch: reward, length, truncated, C
    components: tuple[str, ...]  # names of the C reward components in `table`
    advantages: torch.Tensor  # (n,) this rank's rows
    old_logp: torch.Tensor | None  # (n, T)
    ref_logp: torch.Tensor | None  # (n, T)
    generation_seconds: float

    @property
    def rewards(self) -> torch.Tensor:
        return self.table[:, 0]  # (N,)


class GRPOTrainer:
    """Runs `cfg.num_iterations` x `cfg.num_steps` GRPO steps on `policy` in place.

    With several processes (`grpo.launch`), every rank draws the same global batch of B prompts from
    the seeded sampler; its N = B x G rows are split over ranks in contiguous slices
    (`distributed.split_sizes`, uneven when N does not divide), so a group may span ranks.
    Rows are sampled with per-row seeds from their global index and rewards are gathered
    before the group advantages, so the run is the same at any process count.

    A LoRA policy (peft) has no reference copy: the reference is the policy with its adapters
    disabled, i.e. the frozen base, which is the policy at the start of the only iteration
    (more iterations would need the adapters of the previous one: refused).
    """

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
        checkpoint_dir: Path,
        dist: distributed.Dist | None = None,
        strategy: str = "ddp",
    ) -> None:
        self.dist = dist or distributed.Dist(device=next(policy.parameters()).device)
        self.lora = hasattr(policy, "disable_adapter")  # a peft model
        if self.lora and cfg.num_iterations > 1:
            raise UserError(
                f"params.yaml: train.num_iterations: {cfg.num_iterations} with LoRA "
                f"(model.lora_rank > 0), whose reference is the base model; set "
                f"train.num_iterations: 1, or model.lora_rank: 0"
            )
        self.tokenizer = tokenizer
        self.records = records
        self.cfg = cfg
        self.reward_fns = rewards
        self.system = system
        self.eos_ids = list(eos_ids)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.skipped = 0  # updates dropped for a non-finite reward, loss or gradient
        self.optimizer: torch.optim.Optimizer | None = None  # set by `start_iteration`
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.nonfinite = cfg.nonfinite  # read up front: it decides only when a fault happens
        self.device = self.dist.device
        self.sampler = PromptSampler(len(records), cfg.seed)
        self.sampling = Sampling(cfg.temperature, cfg.top_p, cfg.top_k)
        self.gen_config = generation_config(
            max_new_tokens=cfg.max_completion_length,
            eos_ids=self.eos_ids,
            pad_id=tokenizer.pad_token_id,
            stop_strings=[ANSWER_CLOSE] if cfg.stop_at_answer else [],
        )
        # this rank's contiguous rows of the global batch, and its micro-batches
        num_rows = cfg.batch_size * cfg.num_generations
        self.row_sizes = distributed.split_sizes(num_rows, self.dist.world)
        self.rows = distributed.shard(range(num_rows), self.dist)  # global row ids
        self.micro_batches = micro_batches(
            len(self.rows), max(self.row_sizes), cfg.micro_batch_size
        )
        if cfg.gradient_checkpointing:
            model.enable_activation_checkpointing(policy)
        policy.to(self.device)
        # the reference starts as a frozen copy of the policy (beta == 0: none at all; LoRA:
        # the policy with its adapters disabled); under FSDP it is sharded like the policy, so
        # no rank ever holds a full second copy
        self.ref = None
        if cfg.beta > 0 and not self.lora:
            self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        # FSDP all-gathers weights in the autocast dtype (bf16 on a GPU), not fp32
        param_dtype = getattr(autocast_context(self.device), "fast_dtype", None)
        self.engine = distributed.wrap(policy, strategy, self.dist, param_dtype=param_dtype)
        self.sharded = distributed.is_sharded(self.engine)
        if self.ref is not None and self.sharded:
            self.ref = distributed.wrap(self.ref, "fsdp", self.dist, param_dtype=param_dtype)
        # generation and no-grad forwards: the plain model, or the sharded one under FSDP
        self.policy = self.engine if self.sharded else distributed.unwrap(self.engine)
        # the training forward, optionally compiled (generation keeps the eager model)
        self.scorer = torch.compile(self.engine, dynamic=True) if cfg.torch_compile else self.engine

    def start_iteration(self, iteration: int, resume: checkpoint.Checkpoint | None = None) -> None:
        """Reference = frozen copy of the current policy, a fresh AdamW and schedule; or, when
        resuming inside this iteration, the saved reference, optimizer and schedule."""
        cfg = self.cfg
        if self.ref is not None and iteration > 0:
            if resume is not None:
                if resume.ref_state is None:
                    raise UserError(f"{resume.path}: ref.safetensors is missing; delete the folder")
                distributed.load_full_state_dict(self.ref, resume.ref_state)
            else:
                distributed.copy_parameters(self.ref, self.engine)
        self.optimizer = optimizer = torch.optim.AdamW(
            [p for p in self.engine.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            # one fused kernel per step; FSDP's sharded DTensor parameters keep the default
            **({"fused": True} if self.device.type in ("cuda", "cpu") and not self.sharded else {}),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(cfg.lr_scheduler, cfg.warmup_steps, cfg.num_steps * cfg.mu)
        )
        if resume is not None:
            distributed.load_full_optimizer_state(self.engine, optimizer, resume.optimizer_state)
            self.scheduler.load_state_dict(resume.scheduler_state)

    # -- one step ------------------------------------------------------------------------------

    def _logprobs(self, model: PreTrainedModel, gen: Generated) -> torch.Tensor:
        """No-grad log-probs of this rank's rows, one forward per micro-batch (the same count
        on every rank: each FSDP forward is a collective)."""
        parts = []
        with autocast_context(self.device):
            for rows, real in self.micro_batches:
                logp = completion_logprobs(
                    model,
                    gen.prompt_ids[rows],
                    gen.prompt_mask[rows],
                    gen.completion_ids[rows],
                    temperature=self.cfg.temperature,
                    chunk_size=self.cfg.micro_batch_size,
                    completion_mask=gen.completion_mask[rows],
                )  # (m, T)
                if real:
                    parts.append(logp)
        return torch.cat(parts, dim=0)  # (n, T)

    def rollout(self, step: int) -> Rollout:
        cfg, d = self.cfg, self.dist
        G = cfg.num_generations
        # 1. the same global batch of B prompts on every rank; this rank takes rows self.rows
        global_idx = self.sampler.next(cfg.batch_size)
        copies: dict[int, int] = {}  # prompt -> its rows on this rank, in order
        for row in self.rows:
            copies[row // G] = copies.get(row // G, 0) + 1
        per = math.gcd(*copies.values())  # completions per prompt copy: G for whole groups
        records = {b: self.records[global_idx[b]] for b in copies}
        texts = {
            b: chat_prompt(self.tokenizer, r["question"], self.system) for b, r in records.items()
        }
        prompts = [texts[b] for b, count in copies.items() for _ in range(count // per)]
        # 2. this rank's completions (KV cache, eval mode, per-row seeds of the global rows)
        start = time.perf_counter()
        with autocast_context(self.device):
            gen = generate(
                self.policy,
                self.tokenizer,
                prompts,
                self.gen_config,
                sampling=self.sampling,
                seeds=row_seeds(cfg.seed, step, self.rows),
                num_return_sequences=per,
                synced_gpus=self.sharded,
            )
        if cfg.stop_at_answer:
            gen = truncate_at_answer(gen, self.tokenizer)
        generation_seconds = time.perf_counter() - start
        # 3. score this rank's completions, then gather every row's results in global order
        golds = [records[row // G]["gold"] for row in self.rows]
        scores = [self.reward_fns.score(t, g) for t, g in zip(gen.texts, golds, strict=True)]
        names = tuple(self.reward_fns.names)
        local = torch.tensor(
            [
                [sum(s.values()), length, float(cut), *(s[name] for name in names)]
                for s, length, cut in zip(scores, gen.num_tokens, gen.truncated, strict=True)
            ],
            dtype=torch.float32,
        )  # (n, 3 + C)
        table = distributed.all_gather_rows(local.to(self.device), self.row_sizes, d).cpu()
        rewards = table[:, 0]  # (N,)
        # 4. group-relative advantages over whole groups (every rank), then this rank's rows
        if torch.isfinite(rewards).all():
            advantages = group_advantages(rewards, G, scale_rewards=cfg.scale_rewards)  # (N,)
        else:  # `update` skips or stops before using them
            advantages = torch.full_like(rewards, math.nan)  # (N,)
        advantages = advantages[self.rows[0] : self.rows[-1] + 1].to(self.device)  # (n,)
        # 5. old-policy log-probs only when mu > 1; reference log-probs only when beta > 0
        with torch.no_grad():
            old_logp = self._logprobs(self.policy, gen) if cfg.mu > 1 else None
            ref_logp = None
            if self.ref is not None:
                ref_logp = self._logprobs(self.ref, gen)
            elif self.lora and cfg.beta > 0:
                with self.policy.disable_adapter():  # the frozen base: no copy of the model
                    ref_logp = self._logprobs(self.policy, gen)
        return Rollout(gen, table, names, advantages, old_logp, ref_logp, generation_seconds)

    def update(self, ro: Rollout, step: int = 0) -> dict[str, float]:
        """`mu` optimizer updates on one rollout batch, micro-batched.

        A non-finite reward, loss or gradient norm (the same verdict on every rank: rewards
        are gathered, the loss and gradient norm reduced over ranks) drops the update
        (`nonfinite: skip`, the schedule still advances) or raises NonFiniteError
        (`nonfinite: stop`).
        """
        cfg, d = self.cfg, self.dist
        num_rows = ro.table.shape[0]  # N, the global batch
        bad_rewards = int((~torch.isfinite(ro.rewards)).sum())
        (total_tokens,) = distributed.all_reduce_sum([float(ro.gen.completion_mask.sum())], d)
        stats: dict[str, float] = {}
        if bad_rewards:
            self._nonfinite_update(f"reward ({bad_rewards} completions)", step, cfg.mu)
            return {"nonfinite_skipped": float(self.skipped)}
        self.engine.train()
        for update in range(cfg.mu):
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, sums = 0.0, dict.fromkeys(TOKEN_MEANS, 0.0)  # token-weighted
            for k, (rows, real) in enumerate(self.micro_batches):
                mask = ro.gen.completion_mask[rows]  # (m, T)
                sync = k == len(self.micro_batches) - 1
                with distributed.no_grad_sync(self.engine, sync):
                    with autocast_context(self.device):
                        logp = completion_logprobs(
                            self.scorer,
                            ro.gen.prompt_ids[rows],
                            ro.gen.prompt_mask[rows],
                            ro.gen.completion_ids[rows],
                            temperature=cfg.temperature,
                            chunk_size=cfg.micro_batch_size,
                            completion_mask=mask,
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
                    # weights make the accumulated gradient, averaged over ranks by DDP / FSDP,
                    # that of the loss over the global batch, whatever each rank's share of it:
                    # sequence mean (grpo, dr_grpo) or token mean (dapo); a padding
                    # micro-batch (only there to match the other ranks' forwards) weighs 0
                    if not real:
                        weight = 0.0
                    elif cfg.loss_type == "dapo":
                        weight = out.num_tokens / max(total_tokens, 1.0) * d.world
                    else:
                        weight = mask.shape[0] / num_rows * d.world
                    (out.loss * weight).backward()
                if real:
                    loss_sum += out.loss.item() * weight / d.world
                    for name in TOKEN_MEANS:
                        sums[name] += getattr(out, name) * out.num_tokens
            trainable = [p for p in self.engine.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            loss, *totals = distributed.all_reduce_sum([loss_sum, *sums.values()], d)
            means = zip(TOKEN_MEANS, totals, strict=True)
            stats = {
                "loss": loss,
                **{name: total / max(total_tokens, 1.0) for name, total in means},
                "grad_norm": float(grad_norm),
            }
            fault = _nonfinite(loss, stats["grad_norm"])
            if fault:
                self.engine.eval()
                self._nonfinite_update(fault, step, cfg.mu - update)
                break
            self.optimizer.step()
            self.scheduler.step()
        self.engine.eval()
        stats["nonfinite_skipped"] = float(self.skipped)
        return stats

    def _nonfinite_update(self, fault: str, step: int, updates: int) -> None:
        """Drop the step's remaining `updates` (the schedule still advances), or stop."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite == "stop":
            saved = checkpoint.complete(self.checkpoint_dir)
            kept = (
                f"the last checkpoint ({saved[-1].name}) is intact"
                if saved
                else "no checkpoint was written yet"
            )
            raise NonFiniteError(
                f"train: non-finite {fault} at step {step}; {kept}. Lower train.learning_rate or "
                f"train.max_grad_norm, or set train.nonfinite: skip to drop such updates"
            )
        self.skipped += 1
        log.warning("step %d: non-finite %s, update skipped (%d so far)", step, fault, self.skipped)
        for _ in range(updates):
            self.scheduler.step()

    def plain_model(self) -> PreTrainedModel:
        """The HF model object (its parameters may be sharded: save with a full state dict)."""
        return distributed.unwrap(self.engine)

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as a plain state dict on every node's writer, {} on the other
        ranks (call on every rank: a collective under FSDP)."""
        return distributed.full_state_dict(self.engine, self.dist.writes_files)


def _nonfinite(loss: float, grad_norm: float) -> str:
    """What is non-finite, or "" when all is well."""
    if not math.isfinite(loss):
        return f"loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"gradient norm ({grad_norm})"
    return ""
