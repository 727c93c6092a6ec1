"""One GRPO step, ours vs TRL's GRPOTrainer, same model, prompts and settings, side by side.

    pip install -e '.[bench]'            # TRL, pinned (make bench does this)
    python bench/grpo_step.py [--model models/base] [--batch-size 4] [--num-generations 4]
                              [--max-completion-length 128] [--steps 2] [--repeats 1]

Each side runs in its own process (so peak memory is its own): load the model, one warm-up
step, then `--steps` timed steps. A step = generate B x G completions, score them, reference
forward (beta > 0), and one optimizer update over micro-batches of B rows. Both sides use the
same prompts in the same order, temperature, top_p 1 / top_k 0, beta, epsilon, mu, learning
rate, loss (grpo, group-scaled rewards), grad clipping, no gradient checkpointing, fp32.
The check before the verdict: the same number of completions per step and comparable mean
completion lengths (sampling RNGs differ, so lengths differ a little; time per generated token
is printed too). Sides alternate over `--repeats` so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(args):
    """Params, records in the order our sampler draws them, rewards."""
    from grpo import config
    from grpo.batches import PromptSampler
    from grpo.fsutil import read_jsonl

    params = config.load(args.params)
    cfg = dataclasses.replace(
        params.train,
        batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        micro_batch_size=args.batch_size,
        num_steps=args.steps + 1,
        num_iterations=1,
        mu=1,
        gradient_checkpointing=False,
        torch_compile=False,
        top_p=1.0,
        top_k=0,
        stop_at_answer=False,
        loss_type="grpo",
        scale_rewards="group",
        lr_scheduler="constant",
        warmup_steps=0,
    )
    records = read_jsonl(args.data)
    sampler = PromptSampler(len(records), cfg.seed)
    ordered = [records[i] for i in sampler.next(cfg.batch_size * cfg.num_steps)]
    return params, cfg, records, ordered


def run_ours(args) -> dict:
    import torch

    from grpo import model
    from grpo.rewards import RewardFunctions
    from grpo.trainer import GRPOTrainer

    params, cfg, records, _ = setup(args)
    source = model.ModelSource("dir", args.model)
    tokenizer = model.load_tokenizer(source, False)
    lm = model.load_model(source).to(args.device)
    trainer = GRPOTrainer(
        lm,
        tokenizer,
        records,
        cfg,
        RewardFunctions(params.reward),
        system=params.prompt.system,
        eos_ids=model.eos_token_ids(lm, tokenizer),
        checkpoint_dir=Path(args.workdir) / "ours-checkpoints",
    )
    trainer.start_iteration(0)
    seconds, lengths = [], []
    for step in range(cfg.num_steps):
        start = time.perf_counter()
        ro = trainer.rollout(step)
        trainer.update(ro, step)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        lengths.append(ro.gen.num_tokens)
    return {"seconds": seconds, "lengths": lengths}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpo.rewards import RewardFunctions

    params, cfg, _, records = setup(args)  # in the order our sampler draws them
    system = params.prompt.system
    dataset = Dataset.from_list(
        [
            {
                "prompt": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": r["question"]},
                ],
                "answer": r["gold"],
            }
            for r in records
        ]
    )
    G = cfg.num_generations
    trl_cfg = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl"),
        use_cpu=args.device == "cpu",
        per_device_train_batch_size=cfg.batch_size,  # rows per micro-batch, as ours
        gradient_accumulation_steps=G,  # B prompts x G rows = one generation, one update
        num_generations=G,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=1.0,
        top_k=0,
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=False,
        max_steps=cfg.num_steps,
        shuffle_dataset=False,  # the dataset is already in our sampler's order
        seed=cfg.seed,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    seconds, lengths = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            seconds.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append([logs["completions/mean_length"]] * cfg.batch_size * G)

    trainer = GRPOTrainer(
        model=args.model,
        reward_funcs=RewardFunctions(params.reward).trl_functions(),
        args=trl_cfg,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.model),
        callbacks=[Timer()],
    )
    trainer.train()
    return {"seconds": seconds, "lengths": lengths}


def child(args) -> None:
    result = (run_ours if args.side == "ours" else run_trl)(args)
    result["peak_mb"] = peak_memory_mb(args.device)
    print("RESULT " + json.dumps(result))


def launch(args, side: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side]
    for key in ("model", "data", "params", "device", "workdir"):
        cmd += [f"--{key}", str(getattr(args, key))]
    cmd += ["--batch-size", str(args.batch_size), "--num-generations", str(args.num_generations)]
    cmd += ["--max-completion-length", str(args.max_completion_length), "--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"{side} side failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/base")
    p.add_argument("--data", default="data/prepared/train.jsonl")
    p.add_argument("--params", default="params.yaml", help="rewards, prompt, beta, lr... from here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=4, help="B prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="G completions per prompt")
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    p.add_argument("--workdir", default="/tmp/grpo-bench")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)

    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(args.repeats):
        for side in runs:
            runs[side].append(launch(args, side))
    B, G = args.batch_size, args.num_generations
    print(
        f"model {args.model} on {args.device}, B={B} prompts x G={G}, "
        f"{args.max_completion_length} new tokens max, 1 warm-up + {args.steps} timed steps"
    )
    summary = {}
    for side, results in runs.items():
        steps = [s for r in results for s in r["seconds"][1:]]  # drop each run's warm-up
        lengths = [n for r in results for step in r["lengths"][1:] for n in step]
        tokens = sum(lengths) / len(steps)  # generated tokens per step
        summary[side] = {
            "median": statistics.median(steps),
            "min": min(steps),
            "completions": len(lengths) // len(steps),
            "mean_len": statistics.mean(lengths),
            "tokens_s": tokens / statistics.median(steps),
            "peak_mb": max(r["peak_mb"] for r in results),
        }
    ours, trl = summary["ours"], summary["trl"]
    same = ours["completions"] == trl["completions"] == B * G
    close = abs(ours["mean_len"] - trl["mean_len"]) <= 0.25 * max(trl["mean_len"], 1)
    print(
        f"equivalent work: {ours['completions']} vs {trl['completions']} completions per step "
        f"({'same' if same else 'DIFFERENT'}), mean completion length {ours['mean_len']:.1f} vs "
        f"{trl['mean_len']:.1f} tokens ({'comparable' if close else 'NOT comparable'})"
    )
    print(f"{'side':>5} {'s/step min':>11} {'median':>8} {'gen tok/s':>10} {'peak MB':>8}")
    for side, s in summary.items():
        print(
            f"{side:>5} {s['min']:11.1f} {s['median']:8.1f} {s['tokens_s']:10.1f} "
            f"{s['peak_mb']:8.0f}"
        )
    per_token = (ours["median"] / ours["mean_len"]) / (trl["median"] / trl["mean_len"])
    print(
        f"ours / TRL: step time {ours['median'] / trl['median']:.2f}x (median), "
        f"per generated token {per_token:.2f}x, peak memory {ours['peak_mb'] / trl['peak_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
