"""A GRPO run: iterations of steps, resume, stop signals, checkpoints and progress.

Owns the loop around `grpo.trainer.GRPOTrainer`'s step: the iteration boundaries (a fresh
reference, optimizer and schedule each), resuming mid-iteration from a checkpoint, stopping
cleanly on SIGTERM / SIGINT, periodic checkpoints, the progress bar, per-step metrics
(`grpo.metrics`) and the run summary.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from grpo import checkpoint, distributed
from grpo.device import reproducible
from grpo.errors import UserError
from grpo.metrics import MetricsLogger, step_metrics
from grpo.trainer import GRPOTrainer

log = logging.getLogger(__name__)


class Interrupted(UserError):
    """SIGTERM / SIGINT arrived: a checkpoint was saved, the run stopped."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class Run:
    """Every iteration and step of `trainer` (whose policy is trained in place), with metrics
    written under `log_dir` and the run's `fingerprint` stored in each checkpoint (a checkpoint
    of another fingerprint is never resumed: `grpo.checkpoint.resumable`)."""

    def __init__(
        self,
        trainer: GRPOTrainer,
        log_dir: Path,
        run_config: Mapping[str, Any],
        *,
        fingerprint: str = "",
        progress: bool = True,
    ) -> None:
        self.trainer = trainer
        self.log_dir = Path(log_dir)
        self.run_config = run_config
        self.fingerprint = fingerprint
        self.progress = progress and trainer.dist.is_main
        self.history: list[float] = []  # mean reward of each step
        self.logger: MetricsLogger | None = None
        self._signal: int | None = None

    def train(self, resume: checkpoint.Checkpoint | None = None) -> dict[str, float]:
        """Run every iteration and step, from `resume` when given; return a summary of the run
        (the same on every rank). SIGTERM / SIGINT end the current step, save a checkpoint and
        raise Interrupted (see `_signals_stop_the_run` for repeated signals).

        `resume` holds the weights and optimizer state on rank 0 at least (the other ranks may
        hold empty dicts: they receive rank 0's by broadcast). Each node's writer keeps DVCLive
        files; W&B logs from global rank 0 only."""
        t, cfg, d = self.trainer, self.trainer.cfg, self.trainer.dist
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.history = []
        done, wandb_id = 0, None
        if resume is not None:
            done, wandb_id = resume.step, resume.state.get("wandb_id")
            distributed.load_full_state_dict(t.engine, resume.model_state)
            t.sampler.load_state(resume.state["sampler"])
            self.history = list(resume.state["history"])
            t.skipped = int(resume.state["nonfinite_skipped"])
            checkpoint.set_rng_state(resume.rng)
            if d.writes_files:
                checkpoint.restore_log_dir(resume.path, self.log_dir)
            distributed.barrier(d)
            log.info("resuming from %s (step %d)", resume.path, done)
        self.logger = None
        if d.writes_files:  # every node's writer: metrics are gathered, the same everywhere
            self.logger = MetricsLogger(
                self.log_dir,
                cfg,
                self.run_config,
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
                    t.start_iteration(iteration, resume if mid_iteration else None)
                    for step in range(max(first, done) + 1, first + cfg.num_steps + 1):
                        self._step(step, iteration, bar)
                        if self._stop_requested():
                            path = self.save_checkpoint(step, iteration)
                            name = signal.Signals(self._signal or signal.SIGTERM).name
                            raise Interrupted(
                                f"train: stopped by {name} after step {step} of {total_steps}; "
                                f"checkpoint saved to {path}; run `dvc repro` to resume",
                                self._signal or signal.SIGTERM,
                            )
                        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                            self.save_checkpoint(step, iteration)
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
            "nonfinite_skipped": t.skipped,
        }

    def _step(self, step: int, iteration: int, bar: tqdm) -> None:
        t = self.trainer
        start = time.perf_counter()
        lr = t.scheduler.get_last_lr()[0]
        ro = t.rollout(step)
        with reproducible(t.device):  # bit-identical reruns and resumes on the CPU
            stats = t.update(ro, step)
        seconds = time.perf_counter() - start
        metrics = step_metrics(
            ro,
            stats,
            lr=lr,
            seconds=seconds,
            num_generations=t.cfg.num_generations,
            dist=t.dist,
        )
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
        (count,) = distributed.all_reduce_sum([1.0 if self._signal else 0.0], self.trainer.dist)
        if count and self._signal is None:
            self._signal = signal.SIGTERM
        return bool(count)

    def save_checkpoint(self, step: int, iteration: int) -> Path:
        """Every node's writer writes the full states (gathered by every rank under FSDP; only
        the writers keep a CPU copy)."""
        t = self.trainer
        keep = t.dist.writes_files
        model_state = distributed.full_state_dict(t.engine, keep)
        ref_state = None
        if t.ref is not None and iteration > 0:
            ref_state = distributed.full_state_dict(t.ref, keep)
        optim_state = distributed.full_optimizer_state(t.engine, t.optimizer, keep)
        state = {
            "step": step,
            "iteration": iteration,
            "sampler": t.sampler.state(),
            "history": self.history,
            "nonfinite_skipped": t.skipped,
            "world_size": t.dist.world,
            "wandb_id": None if self.logger is None else self.logger.wandb_id,
            "fingerprint": self.fingerprint,
        }
        path = t.checkpoint_dir / f"step-{step:06d}"
        if keep:
            path = checkpoint.save(
                t.checkpoint_dir,
                state=state,
                model_state=model_state,
                ref_state=ref_state,
                optimizer_state=optim_state,
                scheduler_state=t.scheduler.state_dict(),
                log_dir=self.log_dir,
            )
        distributed.barrier(t.dist)
        return path
