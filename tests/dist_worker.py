"""Worker of the data-parallel tests: a few GRPO steps on a tiny model, in 1 or N processes.

    python tests/dist_worker.py --out DIR [--strategy ddp|fsdp] [--loss-type grpo] ...
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py ...

Rank 0 saves the final full state dict to DIR/params.pt and the logged metrics stay in DIR/log.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from test_trainer import _cfg, _trainer

from grpo import checkpoint, distributed
from grpo.trainer import Interrupted


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--mu", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume-from", type=Path, help="a checkpoint folder to resume from")
    args = p.parse_args()
    faulthandler.dump_traceback_later(300, exit=True)  # a hang becomes a traceback
    torch.set_num_threads(1)
    d = distributed.init()
    cfg = _cfg(
        num_steps=args.steps,
        num_iterations=args.iterations,
        batch_size=4,
        num_generations=2,
        micro_batch_size=2,
        save_every=args.save_every,
        loss_type=args.loss_type,
        mu=args.mu,
        beta=args.beta,
        learning_rate=1e-4,
    )
    try:
        run(args, cfg, d)
    finally:
        distributed.shutdown()  # after run() returned: DDP/FSDP objects are gone by then


def run(args: argparse.Namespace, cfg, d: distributed.Dist) -> None:
    trainer, _ = _trainer(args.out, cfg, dist=d, strategy=args.strategy)
    if trainer.ref is not None and d.enabled and args.strategy == "fsdp":
        # the reference is sharded like the policy: each rank holds only its part
        full = sum(p.numel() for p in trainer.ref.parameters())
        local = sum(p.to_local().numel() for p in trainer.ref.parameters())
        assert local < full, (local, full)
    resume = checkpoint.load(args.resume_from) if args.resume_from else None
    try:
        trainer.train(args.out / "log", {}, resume=resume)
    except Interrupted as err:
        print(f"rank {d.rank}: {err}", flush=True)
        raise SystemExit(err.exit_code) from None
    state = trainer.final_state_dict()
    if d.is_main:
        torch.save(state, args.out / "params.pt")


if __name__ == "__main__":
    main()
