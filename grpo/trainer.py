"""The GRPO loop: sample prompts, roll out groups, score, update, log and checkpoint.

Owns the order of one GRPO step (numbered below) and the state a run carries: the prompt sampler
position, optimizer, scheduler and RNG states (all in each checkpoint, ready for resume). Loss
math lives in `grpo.loss`, generation in `grpo.generation`, log-probs in `grpo.scoring`, rewards
in `grpo.rewards`.

Differences from the tutorial, each on purpose (see SEED.md): rollouts use the KV cache in eval
mode and sample the raw policy; master weights and AdamW states stay fp32 (bf16 autocast only on
a bf16-capable GPU); the old-policy forward is skipped when mu == 1 and the reference forward when
beta == 0; every metric the tutorial lacked is logged.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo import checkpoint, distributed
from grpo.config import TrainConfig
from grpo.device import autocast, reproducible
from grpo.errors import UserError
from grpo.generation import (
    ANSWER_CLOSE,
    Generated,
    generate,
    generation_config,
    truncate_at_answer,
)
from grpo.loss import group_advantages, grpo_loss, zero_std_fraction
from grpo.prompts import chat_prompt
from grpo.rewards import RewardFunctions
from grpo.sampling import Sampling, row_seeds
from grpo.scoring import completion_logprobs

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """A non-finite reward, loss or gradient with `train.nonfinite: stop`."""


class Interrupted(UserError):
    """SIGTERM / SIGINT arrived: a checkpoint was saved, the run stopped."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


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
    """bf16 autocast where bf16 is native; nothing elsewhere (`grpo.device.autocast`)."""
    return autocast(device)


class MetricsLogger:
    """Step metrics to DVCLive (for `dvc plots show`) and optionally to Weights & Biases."""

    def __init__(
        self,
        log_dir: Path,
        cfg: TrainConfig,
        run_config: Mapping[str, Any],
        *,
        resume: bool = False,
        wandb_id: str | None = None,
        use_wandb: bool = True,
    ) -> None:
        from dvclive import Live

        self.live = Live(
            dir=str(log_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=resume
        )
        self.wandb = None
        mode, project = cfg.wandb, cfg.wandb_project
        if mode != "disabled" and use_wandb:
            import wandb

            self.wandb = wandb.init(
                project=project,
                mode=mode,
                config=dict(run_config),
                dir=str(Path(log_dir).parent),  # beside the DVCLive folder, not inside it
                id=wandb_id,
                resume="allow" if wandb_id else None,
            )

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

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
        progress: bool = True,
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
        self.nonfinite = cfg.nonfinite  # read up front: it decides only when a fault happens
        self._signal: int | None = None
        self.progress = progress and self.dist.is_main
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
        self.micro_batches = _micro_batches(
            len(self.rows), max(self.row_sizes), cfg.micro_batch_size
        )
        if cfg.gradient_checkpointing:  # transformers >= 5.23 renamed it (the old name warns)
            enable = getattr(policy, "activation_checkpointing_enable", None)
            (enable or policy.gradient_checkpointing_enable)()
            policy.config.use_cache = False
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

    def update(self, ro: Rollout, optimizer, scheduler, step: int = 0) -> dict[str, float]:
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
            self._nonfinite_update(
                f"reward ({bad_rewards} completions)", step, optimizer, scheduler, cfg.mu
            )
            return {"nonfinite_skipped": float(self.skipped)}
        self.engine.train()
        for update in range(cfg.mu):
            optimizer.zero_grad(set_to_none=True)
            loss_sum = kl_sum = clip_sum = 0.0
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
                    kl_sum += out.kl * out.num_tokens
                    clip_sum += out.clip_ratio * out.num_tokens
            trainable = [p for p in self.engine.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            loss, kl, clip = distributed.all_reduce_sum([loss_sum, kl_sum, clip_sum], d)
            fault = self._nonfinite(loss, float(grad_norm))
            if fault:
                stats = {"loss": loss, "kl": kl, "clip_ratio": clip, "grad_norm": float(grad_norm)}
                self.engine.eval()
                self._nonfinite_update(fault, step, optimizer, scheduler, cfg.mu - update)
                break
            optimizer.step()
            scheduler.step()
            stats = {
                "loss": loss,
                "kl": kl / max(total_tokens, 1.0),
                "clip_ratio": clip / max(total_tokens, 1.0),
                "grad_norm": float(grad_norm),
            }
        self.engine.eval()
        stats["nonfinite_skipped"] = float(self.skipped)
        return stats

    @staticmethod
    def _nonfinite(loss: float, grad_norm: float) -> str:
        """What is non-finite, or "" when all is well."""
        if not math.isfinite(loss):
            return f"loss ({loss})"
        if not math.isfinite(grad_norm):
            return f"gradient norm ({grad_norm})"
        return ""

    def _nonfinite_update(self, fault: str, step: int, optimizer, scheduler, updates: int):
        """Drop the step's remaining `updates` (the schedule still advances), or stop."""
        optimizer.zero_grad(set_to_none=True)
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
            scheduler.step()

    # -- the loop ------------------------------------------------------------------------------

    def train(
        self,
        log_dir: Path,
        run_config: Mapping[str, Any],
        *,
        resume: checkpoint.Checkpoint | None = None,
        fingerprint: str = "",
    ) -> dict[str, float]:
        """Run every iteration and step, from `resume` when given; return a summary of the run
        (the same on every rank). SIGTERM / SIGINT end the current step, save a checkpoint and
        raise Interrupted (see `_signals_stop_the_run` for repeated signals).

        `resume` holds the weights and optimizer state on rank 0 at least (the other ranks may
        hold empty dicts: they receive rank 0's by broadcast). Each node's writer keeps DVCLive
        files; W&B logs from global rank 0 only."""
        cfg, d = self.cfg, self.dist
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.fingerprint = fingerprint
        self.history: list[float] = []
        done, wandb_id = 0, None
        if resume is not None:
            done, wandb_id = resume.step, resume.state.get("wandb_id")
            distributed.load_full_state_dict(self.engine, resume.model_state)
            self.sampler.load_state(resume.state["sampler"])
            self.history = list(resume.state["history"])
            self.skipped = int(resume.state["nonfinite_skipped"])
            checkpoint.set_rng_state(resume.rng)
            if d.writes_files:
                checkpoint.restore_log_dir(resume.path, Path(log_dir))
            distributed.barrier(d)
            log.info("resuming from %s (step %d)", resume.path, done)
        self.log_dir = Path(log_dir)
        self.logger = None
        if d.writes_files:  # every node's writer: metrics are gathered, the same everywhere
            self.logger = MetricsLogger(
                log_dir,
                cfg,
                run_config,
                resume=resume is not None,
                wandb_id=wandb_id,
                use_wandb=d.is_main,
            )
        total_steps = cfg.num_iterations * cfg.num_steps
        bar = tqdm(
            total=total_steps, initial=done, desc="grpo", unit="step", disable=not self.progress
        )
        try:
            with self._signals_stop_the_run():
                for iteration in range(done // cfg.num_steps, cfg.num_iterations):
                    first = iteration * cfg.num_steps
                    mid_iteration = resume is not None and first < done
                    optimizer, scheduler = self._start_iteration(
                        iteration, resume if mid_iteration else None
                    )
                    for step in range(max(first, done) + 1, first + cfg.num_steps + 1):
                        self._step(step, iteration, optimizer, scheduler, bar)
                        if self._stop_requested():
                            path = self.save_checkpoint(optimizer, scheduler, step, iteration)
                            name = signal.Signals(self._signal or signal.SIGTERM).name
                            raise Interrupted(
                                f"train: stopped by {name} after step {step} of {total_steps}; "
                                f"checkpoint saved to {path}; run `dvc repro` to resume",
                                self._signal or signal.SIGTERM,
                            )
                        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                            self.save_checkpoint(optimizer, scheduler, step, iteration)
        finally:
            bar.close()
            if self.logger is not None:
                self.logger.close()
        history = self.history
        quarter = max(1, len(history) // 4)
        return {
            "steps": total_steps,
            "reward_first_quarter": sum(history[:quarter]) / quarter,
            "reward_last_quarter": sum(history[-quarter:]) / quarter,
            "nonfinite_skipped": self.skipped,
        }

    def _start_iteration(self, iteration: int, resume: checkpoint.Checkpoint | None):
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
        optimizer = torch.optim.AdamW(
            [p for p in self.engine.parameters() if p.requires_grad],
            lr=cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            # one fused kernel per step (0.12 s vs 0.60 s for 135M params on this CPU);
            # FSDP's sharded DTensor parameters keep the default implementation
            **({"fused": True} if self.device.type in ("cuda", "cpu") and not self.sharded else {}),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(cfg, cfg.num_steps * cfg.mu)
        )
        if resume is not None:
            distributed.load_full_optimizer_state(self.engine, optimizer, resume.optimizer_state)
            scheduler.load_state_dict(resume.scheduler_state)
        return optimizer, scheduler

    def _step(self, step: int, iteration: int, optimizer, scheduler, bar) -> None:
        start = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        ro = self.rollout(step)
        with reproducible(self.device):  # bit-identical reruns and resumes on the CPU
            stats = self.update(ro, optimizer, scheduler, step)
        seconds = time.perf_counter() - start
        metrics = self._step_metrics(ro, stats, lr, seconds)
        metrics["iteration"] = iteration
        if self.logger is not None:
            self.logger.log(step, metrics)
        self.history.append(metrics["reward/mean"])
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", s=f"{seconds:.0f}")

    @contextlib.contextmanager
    def _signals_stop_the_run(self):
        """First SIGTERM / SIGINT: finish the step, save, stop.

        A repeat depends on who escalates. Alone, the user does: a second signal takes the
        default action (stop at once). Under `grpo.launch` the launcher does (its own second
        signal kills the workers), and a worker may get one signal twice (Slurm's `scancel`
        signals every process, and the launcher forwards it): repeats are ignored, also after
        the stop until the worker exits (SIG_IGN: Python puts the default action back for its
        own handlers while it shuts down).
        """
        signals = (signal.SIGTERM, signal.SIGINT)
        launched = distributed.under_launcher()
        try:
            previous = {s: signal.getsignal(s) for s in signals}
        except ValueError:  # not the main thread: leave signals alone
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self._signal is not None:  # only under the launcher: handlers stay installed
                log.info("%s again: ignored, the step's checkpoint is on its way", name)
                return
            self._signal = signum
            if launched:
                log.warning("%s: finishing step, then saving a checkpoint", name)
                return
            log.warning("%s: finishing step, then saving a checkpoint (again: stop at once)", name)
            for s in signals:
                signal.signal(s, previous[s])

        try:
            for s in signals:
                signal.signal(s, handler)
        except ValueError:
            yield
            return
        try:
            yield
        finally:
            stopped_by_launcher = launched and self._signal is not None
            for s in signals:
                signal.signal(s, signal.SIG_IGN if stopped_by_launcher else previous[s])

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (every rank takes the same decision)."""
        (count,) = distributed.all_reduce_sum([1.0 if self._signal else 0.0], self.dist)
        if count and self._signal is None:
            self._signal = signal.SIGTERM
        return bool(count)

    def save_checkpoint(self, optimizer, scheduler, step: int, iteration: int) -> Path:
        """Every node's writer writes the full states (gathered by every rank under FSDP; only
        the writers keep a CPU copy)."""
        keep = self.dist.writes_files
        model_state = distributed.full_state_dict(self.engine, keep)
        ref_state = None
        if self.ref is not None and iteration > 0:
            ref_state = distributed.full_state_dict(self.ref, keep)
        optim_state = distributed.full_optimizer_state(self.engine, optimizer, keep)
        state = {
            "step": step,
            "iteration": iteration,
            "sampler": self.sampler.state(),
            "history": self.history,
            "nonfinite_skipped": self.skipped,
            "world_size": self.dist.world,
            "wandb_id": None if self.logger is None else self.logger.wandb_id,
            "fingerprint": self.fingerprint,
        }
        path = self.checkpoint_dir / f"step-{step:06d}"
        if keep:
            path = checkpoint.save(
                self.checkpoint_dir,
                state=state,
                model_state=model_state,
                ref_state=ref_state,
                optimizer_state=optim_state,
                scheduler_state=scheduler.state_dict(),
                log_dir=self.log_dir,
            )
        distributed.barrier(self.dist)
        return path

    def plain_model(self) -> PreTrainedModel:
        """The HF model object (its parameters may be sharded: save with a full state dict)."""
        return distributed.unwrap(self.engine)

    def final_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights as a plain state dict on every node's writer, {} on the other
        ranks (call on every rank: a collective under FSDP)."""
        return distributed.full_state_dict(self.engine, self.dist.writes_files)

    def _step_metrics(
        self, ro: Rollout, stats: Mapping[str, float], lr: float, seconds: float
    ) -> dict[str, float]:
        """Step metrics over the global batch (every row's values, gathered in `rollout`)."""
        d = self.dist
        rows = ro.table  # (N, 3 + C)
        rewards, lengths, truncated = rows[:, 0], rows[:, 1], rows[:, 2]
        (gen_s,) = distributed.all_reduce_sum([ro.generation_seconds], d)
        gen_s /= d.world  # mean over ranks (they generate in parallel)
        metrics = {"reward/mean": rewards.mean().item(), "reward/std": rewards.std().item()}
        for k, name in enumerate(ro.components):
            t = rows[:, 3 + k]
            metrics[f"reward/{name}"] = t.mean().item()
            metrics[f"reward/{name}_std"] = t.std().item()
        metrics |= {
            "frac_reward_zero_std": zero_std_fraction(rewards, self.cfg.num_generations),
            "completion/mean_length": lengths.mean().item(),
            "completion/max_length": lengths.max().item(),
            "completion/truncated_rate": truncated.mean().item(),
            "learning_rate": lr,
            "time/step_seconds": seconds,
            "time/generation_seconds": gen_s,
            "time/generated_tokens_per_second": lengths.sum().item() / max(gen_s, 1e-9),
            **stats,
        }
        return metrics


def _micro_batches(rows: int, most_rows: int, size: int) -> list[tuple[slice, bool]]:
    """This rank's micro-batches over its `rows` rows, as (rows, real): as many on every rank
    (`most_rows` is the largest rank's count; each FSDP forward is a collective), each of at
    most `size` rows and near-even in length. A rank with fewer rows than micro-batches (only
    with `size` 1) pads with re-scored rows that weigh nothing (real = False), first so that the
    last micro-batch, which synchronises gradients, is a real one.

    >>> _micro_batches(10, 11, 4)
    [(slice(0, 4, None), True), (slice(4, 7, None), True), (slice(7, 10, None), True)]
    >>> _micro_batches(1, 2, 1)
    [(slice(0, 1, None), False), (slice(0, 1, None), True)]
    """
    count = -(-most_rows // size)  # ceil
    real = min(count, rows)
    padding = [(slice(0, 1), False)] * (count - real)
    bounds, start = [], 0
    for n in distributed.split_sizes(rows, real):
        bounds.append((slice(start, start + n), True))
        start += n
    return padding + bounds
