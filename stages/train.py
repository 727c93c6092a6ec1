"""Stage `train`: GRPO fine-tuning of `models/sft` on the prepared train records.

    python -m stages.train --model models/sft --data data/prepared/train.jsonl \
        --out models/grpo --checkpoints models/grpo-checkpoints --log-dir dvclive \
        --summary metrics/train.json

Writes the final model as a plain HF folder (safetensors + tokenizer + generation config) in
`--out`, checkpoints every `train.save_every` steps in `--checkpoints` (a DVC `persist` output),
step metrics to DVCLive in `--log-dir` (and to W&B when `train.wandb` is not `disabled`), and
the run summary (reward over the first and last quarter of the steps) in `--summary`.

Resume: when `--checkpoints` holds a complete checkpoint of this very run (same params, input
files and code: the run fingerprint), training continues from it and ends with the same weights
and metrics as an uninterrupted run; otherwise the folder is emptied and the run starts fresh.
Keys that change how a run executes but not what it computes may differ: RESUMABLE_KEYS.
SIGTERM / SIGINT save a checkpoint after the current step and exit with 128 + the signal number.

With `train.nproc_per_node` > 1, or several nodes (GRPO_NNODES, GRPO_NODE_RANK,
GRPO_MASTER_ADDR, GRPO_MASTER_PORT: see `grpo.launch`), the stage relaunches itself under
`grpo.launch` (one process per GPU, gloo on CPU), which forwards SIGINT / SIGTERM once to every
worker and ends the job when one fails. Each node's local rank 0 writes that node's
checkpoints, DVCLive files and final model (no shared filesystem needed; W&B logs from global
rank 0 only); on resume the nodes agree on the newest checkpoint they all have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path

from grpo import checkpoint, config, distributed, model, preflight
from grpo import launch as launcher
from grpo.errors import UserError
from grpo.fsutil import check_writable, read_jsonl, sha256_file, write_json_atomic
from grpo.rewards import RewardFunctions
from grpo.run import Interrupted, Run
from grpo.trainer import GRPOTrainer
from stages import _cli

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
RESUMABLE_KEYS = (
    "save_every",
    "nonfinite",
    "wandb",
    "wandb_project",
    "nproc_per_node",
    "strategy",
)
"""train.* keys a run may be resumed with after changing them: they decide how the run executes
(checkpoint period, what to do on NaN, logging, process count) but not what a step computes."""


def fingerprint(params: config.Params, model_dir: Path, data: Path) -> str:
    """sha256 of everything a resumed run must share with the interrupted one: the params the
    stage reads (but RESUMABLE_KEYS), the bytes of the model folder and the data file, and the
    project code (every Python and C source of `grpo/`, subpackages included: the C kernels pick
    the sampled tokens)."""
    m = params.model
    keys = {
        "train": {k: v for k, v in params.train.to_dict().items() if k not in RESUMABLE_KEYS},
        "reward": params.reward.to_dict(),
        "prompt": params.prompt.to_dict(),
        "model": {
            k: v
            for k, v in m.to_dict().items()
            if k.startswith("lora_") or k in ("dtype", "attn_implementation", "trust_remote_code")
        },
    }
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    code = [p for suffix in ("py", "c", "h") for p in (REPO / "grpo").rglob(f"*.{suffix}")]
    code = sorted([*code, REPO / "stages" / "train.py"])
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True).encode())
    for path in [*files, data]:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    for path in code:  # by path: subpackages repeat file names (__init__.py)
        digest.update(f"{path.relative_to(REPO).as_posix()}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def run_summary(summary: dict[str, float]) -> dict[str, float]:
    """The run summary as the `--summary` metrics file holds it: mean reward over the first and
    last quarter of the steps and its change first, then steps and skipped non-finite steps
    (`dvc exp show` shows these few columns instead of every step metric).

    >>> s = run_summary({"steps": 8, "reward_first_quarter": 0.25, "reward_last_quarter": 0.75,
    ...                  "nonfinite_skipped": 0})
    >>> s["reward_change"], list(s)[:3]
    (0.5, ['reward_first_quarter', 'reward_last_quarter', 'reward_change'])
    """
    first, last = summary["reward_first_quarter"], summary["reward_last_quarter"]
    return {
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "reward_change": last - first,
        "steps": summary["steps"],
        "nonfinite_skipped": summary["nonfinite_skipped"],
    }


def launch(topo: launcher.Topology) -> None:
    """Rerun this stage in this node's `topo.nproc` worker processes and wait for them; a
    worker's failure or a stop signal becomes this process's error and exit code."""
    outcome = launcher.run([sys.executable, "-m", "stages.train", *sys.argv[1:]], topo)
    error = outcome.error("train")
    if error is not None:
        raise error


def main(args) -> None:
    params = config.load(args.params)
    cfg = params.train
    nproc, strategy = distributed.resolve_nproc(cfg.nproc_per_node), cfg.strategy
    worker = "LOCAL_RANK" in os.environ  # started by a launcher
    if not worker:  # the launcher (or the only process) checks, once
        topo = launcher.topology(nproc)
        config.check_batch_split(cfg, topo.world)
        check_writable(args.out, args.checkpoints, args.log_dir)
        if getattr(args, "summary", None):  # optional: callers building args by hand omit it
            check_writable(args.summary)
        preflight.check_train(params, args.model)  # CUDA, GPUs, memory: before any work
        if topo.world > 1:
            launch(topo)
            return
    d = distributed.init()
    together = False  # whether every rank ends at the same point (then they leave together)
    try:
        train(params, args, d, strategy)
        together = True
    except Interrupted:  # every rank stopped after the same step's checkpoint
        together = True
        raise
    finally:
        # after an error on this rank alone the others may sit in a collective: no barrier,
        # the launcher ends them
        if together:
            distributed.shutdown()
        else:
            distributed.abort()


def train(params, args, d: distributed.Dist, strategy: str) -> None:
    cfg = params.train
    config.check_batch_split(cfg, d.world)
    records = read_jsonl(args.data, strings=("question", "gold"))
    # fp32 master weights, bf16 autocast on a capable GPU; LoRA trains fp32 adapters only, so
    # its frozen base stays in model.dtype (bf16 on a bf16-capable GPU)
    base_dtype = params.model.dtype
    lm, tokenizer, eos_ids = model.load_folder(
        args.model,
        dtype=base_dtype if params.model.lora_rank > 0 else "float32",
        attn_implementation=params.model.attn_implementation,
        trust_remote_code=params.model.trust_remote_code,
        finite=True,
    )
    m = params.model
    lora_rank, lora_alpha, lora_targets, lora_save = (
        m.lora_rank,
        m.lora_alpha,
        m.lora_target_modules,
        m.lora_save,
    )
    if lora_rank > 0:
        if strategy == "fsdp" and d.world > 1:
            raise UserError(
                "params.yaml: model.lora_rank > 0 trains with train.strategy: ddp; FSDP of LoRA "
                "models is not supported (the adapters are small: replicate them)"
            )
        lm = model.add_lora(lm, lora_rank, lora_alpha, lora_targets)
    out, ckpt_dir = Path(args.out), Path(args.checkpoints)
    # only the writers compare it with their checkpoints and save it: the others skip hashing
    fp = fingerprint(params, Path(args.model), Path(args.data)) if d.writes_files else ""
    found = checkpoint.agreed(ckpt_dir, fp, d)  # the same on every node, or None
    # rank 0 reads the weights and optimizer state and broadcasts them
    resume = checkpoint.load(found, weights=d.is_main) if found else None
    run_config = {"train": cfg.to_dict(), "reward": params.reward.to_dict(), "world": d.world}
    trainer = GRPOTrainer(
        lm,
        tokenizer,
        records,
        cfg,
        RewardFunctions(params.reward),
        system=params.prompt.system,
        eos_ids=eos_ids,
        checkpoint_dir=ckpt_dir,
        dist=d,
        strategy=strategy,
    )
    summary = Run(trainer, Path(args.log_dir), run_config, fingerprint=fp).train(resume)
    del resume
    state = trainer.final_state_dict()  # a collective under FSDP: every rank takes part
    if d.writes_files:  # every node: `dvc repro` there expects the output
        final, final_state = trainer.plain_model(), state
        if lora_rank > 0:  # peft saves its own state: the merged model or the adapter
            final_state = None
            if lora_save == "merged":
                final = final.merge_and_unload()
        model.save_model_atomic(
            final, tokenizer, out, extra={"from": args.model, **summary}, state_dict=final_state
        )
        if getattr(args, "summary", None):
            write_json_atomic(args.summary, run_summary(summary))
        log.info("%s: %s", out, json.dumps(summary))
    distributed.barrier(d)


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument("--model", required=True, help="starting model folder")
    p.add_argument("--data", required=True, help="prepared train records (jsonl)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--checkpoints", required=True, help="checkpoint folder (kept across runs)")
    p.add_argument("--log-dir", required=True, help="DVCLive folder")
    p.add_argument("--summary", help="run summary metrics JSON to write (optional)")
    _cli.run("train", main, p.parse_args())
