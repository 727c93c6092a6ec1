"""Which prompts and rows one GRPO step uses: seeded epochs over the records, micro-batches.

Owns the prompt order of a run (`PromptSampler`: resumable, the same on every rank) and how a
rank's rows are cut into micro-batches (`micro_batches`: as many on every rank, since each FSDP
forward is a collective).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from grpo import distributed


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


def micro_batches(rows: int, most_rows: int, size: int) -> list[tuple[slice, bool]]:
    """This rank's micro-batches over its `rows` rows, as (rows, real): as many on every rank
    (`most_rows` is the largest rank's count; each FSDP forward is a collective), each of at
    most `size` rows and near-even in length. A rank with fewer rows than micro-batches (only
    with `size` 1) pads with re-scored rows that weigh nothing (real = False), first so that the
    last micro-batch, which synchronises gradients, is a real one.

    >>> micro_batches(10, 11, 4)
    [(slice(0, 4, None), True), (slice(4, 7, None), True), (slice(7, 10, None), True)]
    >>> micro_batches(1, 2, 1)
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
