"""What is logged each GRPO step, and where: DVCLive (for `dvc plots`) and Weights & Biases.

Owns the names and meaning of the step metrics (`step_metrics`, reduced over the global batch so
every rank logs the same values) and the loggers they go to (`MetricsLogger`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grpo import distributed
from grpo.config import TrainConfig
from grpo.loss import zero_std_fraction
from grpo.trainer import Rollout


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


def step_metrics(
    ro: Rollout,
    stats: Mapping[str, float],
    *,
    lr: float,
    seconds: float,
    num_generations: int,
    dist: distributed.Dist,
) -> dict[str, float]:
    """One step's metrics over the global batch (every row's values, gathered in `rollout`):
    rewards and each component (mean, std), the share of zero-variance groups, completion
    lengths and truncation, learning rate, timings, and the update's `stats`."""
    d = dist
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
        "frac_reward_zero_std": zero_std_fraction(rewards, num_generations),
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
