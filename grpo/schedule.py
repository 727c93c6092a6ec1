"""The learning-rate schedule of the sft and train stages: a linear warm-up, then a shape.

Owns the multiplier of the peak learning rate at each optimizer update (for
`torch.optim.lr_scheduler.LambdaLR`), in plain floats.

>>> f = lr_factor("linear", warmup_steps=2, total_updates=10)
>>> [round(f(u), 3) for u in (0, 1, 2, 6, 10)]
[0.333, 0.667, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable

from grpo.config import LrScheduler


def lr_factor(kind: LrScheduler, warmup_steps: int, total_updates: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at update `u` (0-based): (u + 1) / (warmup + 1)
    during the first `warmup_steps` updates, then 1 (constant), or a linear or cosine decay to 0
    over the remaining `total_updates - warmup_steps` updates."""

    def factor(update: int) -> float:
        if update < warmup_steps:
            return (update + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (update - warmup_steps) / max(1, total_updates - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
