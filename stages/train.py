"""Stage `train`: GRPO fine-tuning of `models/sft` on the prepared train records.

    python -m stages.train --model models/sft --data data/prepared/train.jsonl \
        --out models/grpo --log-dir dvclive

Writes the final model as a plain HF folder (safetensors + tokenizer + generation config) in
`--out`, checkpoints under `--out/checkpoints/`, step metrics to DVCLive in `--log-dir` (and to
W&B when `train.wandb` is not `disabled`).

With `train.nproc_per_node` > 1 the stage relaunches itself under torchrun (one process per GPU,
gloo on CPU); only rank 0 writes checkpoints, logs and the final model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from grpo import config, distributed, model
from grpo.data import read_jsonl
from grpo.errors import UserError
from grpo.rewards import RewardFunctions
from grpo.trainer import CHECKPOINTS, GRPOTrainer
from stages import _cli

log = logging.getLogger(__name__)


def save_final(lm, tokenizer, out: Path, summary: dict, state_dict: dict | None) -> None:
    """Replace the model files in `out` atomically, keeping `out/checkpoints`."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".final.", dir=out))
    try:
        model.save_model_atomic(
            lm, tokenizer, staging / "model", extra=summary, state_dict=state_dict
        )
        for item in out.iterdir():
            if item.name not in (CHECKPOINTS, staging.name):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        for item in (staging / "model").iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def launch(nproc: int) -> None:
    """Rerun this stage under torchrun in `nproc` processes and wait for it."""
    cmd = distributed.torchrun_command(nproc, "stages.train", sys.argv[1:])
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    code = subprocess.run(cmd, check=False).returncode
    if code:
        raise UserError(f"train: torchrun exited with code {code}; see the rank output above")


def main(args) -> None:
    params = config.load(args.params)
    cfg = params.train
    nproc, strategy = distributed.resolve_nproc(cfg.nproc_per_node), cfg.strategy
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        launch(nproc)
        return
    d = distributed.init()
    try:
        train(params, args, d, strategy)
    finally:
        distributed.shutdown()


def train(params, args, d: distributed.Dist, strategy: str) -> None:
    cfg = params.train
    if cfg.batch_size % d.world:
        raise UserError(
            f"params.yaml: train.batch_size: {cfg.batch_size} prompts do not split evenly over "
            f"{d.world} processes; use a multiple of {d.world}"
        )
    records = read_jsonl(args.data)
    source = model.ModelSource("dir", args.model)
    tokenizer = model.load_tokenizer(source, params.model.trust_remote_code)
    lm = model.load_model(
        source,
        dtype="float32",  # fp32 master weights; bf16 autocast on a capable GPU
        attn_implementation=params.model.attn_implementation,
        trust_remote_code=params.model.trust_remote_code,
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
    out = Path(args.out)
    if d.is_main:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # resume is not supported yet
    distributed.barrier(d)
    run_config = {"train": cfg.to_dict(), "reward": params.reward.to_dict(), "world": d.world}
    trainer = GRPOTrainer(
        lm,
        tokenizer,
        records,
        cfg,
        RewardFunctions(params.reward),
        system=params.prompt.system,
        eos_ids=model.eos_token_ids(lm, tokenizer),
        out_dir=out,
        dist=d,
        strategy=strategy,
    )
    summary = trainer.train(Path(args.log_dir), run_config)
    state = trainer.final_state_dict()  # a collective under FSDP: every rank takes part
    if d.is_main:
        final, final_state = trainer.plain_model(), state
        if lora_rank > 0:  # peft saves its own state: the merged model or the adapter
            final_state = None
            if lora_save == "merged":
                final = final.merge_and_unload()
        save_final(final, tokenizer, out, {"from": args.model, **summary}, final_state)
        log.info("%s: %s", out, json.dumps(summary))
    distributed.barrier(d)


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument("--model", required=True, help="starting model folder")
    p.add_argument("--data", required=True, help="prepared train records (jsonl)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--log-dir", required=True, help="DVCLive folder")
    _cli.run("train", main, p.parse_args())
