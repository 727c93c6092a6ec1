"""Worker of the data-parallel tests: a few GRPO steps on a tiny model, in 1 or N processes.

    python tests/dist_worker.py --out DIR [--strategy ddp|fsdp] [--loss-type grpo] ...
    python -m stages.launch --nproc-per-node 2 -- python tests/dist_worker.py ...

Each node's writer (local rank 0) saves the final full state dict to DIR/params.pt; the logged
metrics stay in DIR/log (every step's in DVCLive's TSV files) and checkpoints in
DIR/out/checkpoints. `--resume` resumes like the train stage (the nodes agree on a checkpoint;
rank 0 reads it); `--fail-on-rank R` raises an error on rank R at the start of step 2.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from test_trainer import _cfg, _trainer

from grpo import checkpoint, distributed
from grpo.run import Interrupted, Run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--mu", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--iterations", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume-from", type=Path, help="a checkpoint folder to resume from")
    p.add_argument("--resume", action="store_true", help="resume from DIR/out/checkpoints")
    p.add_argument("--fail-on-rank", type=int, help="raise on this rank at step 2")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=2, help="completions per prompt")
    p.add_argument("--micro-batch-size", type=int, default=2)
    args = p.parse_args()
    faulthandler.dump_traceback_later(300, exit=True)  # a hang becomes a traceback
    torch.set_num_threads(1)
    d = distributed.init()
    logging.basicConfig(level=logging.INFO, format=f"rank {d.rank}: %(message)s")
    cfg = _cfg(
        num_steps=args.steps,
        num_iterations=args.iterations,
        batch_size=args.batch_size,
        num_generations=args.generations,
        micro_batch_size=args.micro_batch_size,
        save_every=args.save_every,
        loss_type=args.loss_type,
        mu=args.mu,
        beta=args.beta,
        learning_rate=args.lr,
    )
    together = False  # as in stages/train.py: leave together only when every rank ended alike
    try:
        run(args, cfg, d)
        together = True
    except Interrupted as err:
        together = True
        print(f"rank {d.rank}: {err}", flush=True)
        raise SystemExit(err.exit_code) from None
    finally:
        if together:
            distributed.shutdown()  # after run() returned: DDP/FSDP objects are gone by then
        else:
            distributed.abort()


def run(args: argparse.Namespace, cfg, d: distributed.Dist) -> None:
    trainer, _ = _trainer(args.out, cfg, dist=d, strategy=args.strategy)
    if trainer.ref is not None and d.enabled and args.strategy == "fsdp":
        # the reference is sharded like the policy: each rank holds only its part
        full = sum(p.numel() for p in trainer.ref.parameters())
        local = sum(p.to_local().numel() for p in trainer.ref.parameters())
        assert local < full, (local, full)
    loop = Run(trainer, args.out / "log", {}, fingerprint="fp")
    if args.fail_on_rank == d.rank:
        step = loop._step

        def failing_step(n, *rest):
            if n == 2:
                raise RuntimeError(f"injected failure on rank {d.rank} at step {n}")
            step(n, *rest)

        loop._step = failing_step
    found = args.resume_from
    if args.resume:
        found = checkpoint.agreed(trainer.checkpoint_dir, "fp", d)
    resume = checkpoint.load(found, weights=d.is_main) if found else None
    loop.train(resume)
    state = trainer.final_state_dict()
    if d.writes_files:
        torch.save(state, args.out / "params.pt")


if __name__ == "__main__":
    main()
