"""Rollouts and one GRPO step at the seed preset's shape on a GPU: our decode loop vs `generate`.

    python bench/gpu_rollout.py [--prompts 7] [--generations 12] [--max-new-tokens 400]
                                [--repeats 2] [--preset seed-qwen2.5-1.5b]
    python bench/gpu_rollout.py --device cpu --tiny      # smoke run of the same code on the CPU

The model is a random-init Qwen2.5-1.5B-Instruct of the real shape (tests/gpu_fixtures.py: built
from its config, nothing downloaded, the offline test tokenizer), held as the trainer holds it:
fp32 master weights, forwards under bf16 autocast where bf16 is native. Both sides sample the
same prompts with the same per-row seeds at the preset's temperature (7 prompts x 12 = 84 rows);
"same" counts rows whose tokens agree (bf16 rounding differs between the two decoders, so a few
rows may part at a near-tie). Speeds are min/median over interleaved repeats after a warm-up.

Random weights almost never sample EOS, so every row runs to the token cap: a rollout here is
rows x max-new-tokens tokens, the worst case of a real run (a trained model stops earlier).

Then one GRPO step of the preset on the same model (after a warm-up step), split into
generation, scoring (rewards and reference log-probs; old-policy log-probs when mu > 1) and
update (policy log-probs with grad, backward with gradient checkpointing, AdamW), with the peak
GPU memory. One GPU runs the whole batch here (the preset spreads it over 8).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gpu_fixtures as fx

from grpo import model
from grpo.device import autocast
from grpo.generation import generate, generation_config
from grpo.prompts import chat_prompt
from grpo.rewards import RewardFunctions
from grpo.sampling import Sampling, row_seeds
from grpo.trainer import GRPOTrainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rollout(lm, tokenizer, prompts, params, max_new_tokens, decoder, device):
    """(tokens/s, completion ids per row) of one rollout with `decoder` (lean or hf)."""
    cfg = params.train
    gen_config = generation_config(
        max_new_tokens=max_new_tokens,
        eos_ids=model.eos_token_ids(lm, tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    rows = range(len(prompts) * cfg.num_generations)
    synchronize(device)
    start = time.perf_counter()
    with autocast(device):
        gen = generate(
            lm,
            tokenizer,
            prompts,
            gen_config,
            sampling=Sampling(cfg.temperature, cfg.top_p, cfg.top_k),
            seeds=row_seeds(cfg.seed, 1, rows),
            num_return_sequences=cfg.num_generations,
            decoder=decoder,
        )
    synchronize(device)
    seconds = time.perf_counter() - start
    ids = [row[:n] for row, n in zip(gen.completion_ids.tolist(), gen.num_tokens, strict=True)]
    return sum(gen.num_tokens) / seconds, ids, gen.truncated


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="seed-qwen2.5-1.5b", help="settings and model shape")
    p.add_argument("--prompts", type=int, default=7, help="B prompts per rollout and step")
    p.add_argument("--generations", type=int, default=12, help="G completions per prompt")
    p.add_argument("--max-new-tokens", type=int, help="default 400 (32 with --tiny)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rollouts of each decoder")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes, short rollouts (smoke run)")
    p.add_argument("--no-step", action="store_true", help="rollouts only")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or `--device cpu --tiny` for a smoke run")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.tiny else 400

    params = fx.preset_params(args.preset)
    train = dataclasses.replace(
        params.train,
        batch_size=args.prompts,
        num_generations=args.generations,
        max_completion_length=args.max_new_tokens,
        nproc_per_node=1,
        num_steps=2,
        save_every=0,
        wandb="disabled",
    )
    params = dataclasses.replace(params, train=train)
    name = params.model.name
    attn = model.pick_attention(params.model.attn_implementation)
    lm = fx.build_model(name, tiny_shape=args.tiny, device=device, attn=attn)
    tokenizer = fx.tokenizer_once()
    records = fx.records("train", 64)
    prompts = [chat_prompt(tokenizer, r["question"], params.prompt.system) for r in records]
    prompts = prompts[: args.prompts]
    rows = args.prompts * args.generations
    count = sum(p.numel() for p in lm.parameters())
    precision = "bf16 autocast" if fx.autocast_on(device) else "fp32"
    print(
        f"random-init {name} {'TINY shape' if args.tiny else 'shape'} ({count / 1e6:.1f}M params), "
        f"fp32 weights, {precision}, {attn} attention, on {device} ({describe(device)}); "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"{args.prompts} prompts x {args.generations} = {rows} rows, temperature "
        f"{train.temperature}, {args.max_new_tokens} new tokens max"
    )

    speeds: dict[str, list[float]] = {"ours (lean decode)": [], "HF generate (KV cache)": []}
    decoders = dict(zip(speeds, ("lean", "hf"), strict=True))
    for decoder in decoders.values():  # warm-up: kernels, allocator, cuBLAS handles
        rollout(lm, tokenizer, prompts, params, 4, decoder, device)
    ids, truncated = {}, {}
    for _ in range(args.repeats):
        for side, decoder in decoders.items():
            tps, ids[side], truncated[side] = rollout(
                lm, tokenizer, prompts, params, args.max_new_tokens, decoder, device
            )
            speeds[side].append(tps)
    same = sum(a == b for a, b in zip(*ids.values(), strict=True))
    capped = sum(truncated["ours (lean decode)"])
    print(
        f"{capped}/{rows} rows ran to the {args.max_new_tokens}-token cap (random weights rarely "
        f"sample EOS), {sum(map(len, ids['ours (lean decode)']))} tokens per rollout"
    )
    print(f"{'rollout':>24} {'tokens/s min':>13} {'median':>8}  same tokens")
    for side, values in speeds.items():
        agree = f"{same}/{rows}" if side.startswith("ours") else ""
        print(f"{side:>24} {min(values):13.1f} {statistics.median(values):8.1f}  {agree}")
    ours, hf = (statistics.median(v) for v in speeds.values())
    print(f"{'ours / HF generate':>24} {ours / hf:13.2f}x (median)")
    if args.no_step:
        return

    trainer = GRPOTrainer(
        lm,
        tokenizer,
        records,
        train,
        RewardFunctions(params.reward),
        system=params.prompt.system,
        eos_ids=model.eos_token_ids(lm, tokenizer),
        checkpoint_dir=Path("/tmp/gpu-rollout-bench"),
    )
    if not args.tiny:
        fx.timed_step(trainer)  # warm-up: the backward's kernels and AdamW states
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = fx.timed_step(trainer)
    parts = {
        "generation": step["generation_seconds"],
        "scoring (rewards, reference log-probs)": step["scoring_seconds"],
        "update (policy log-probs, backward, AdamW)": step["update_seconds"],
    }
    total = sum(parts.values())
    print(
        f"one GRPO step of {args.preset} on one device: {rows} rows, micro-batch "
        f"{train.micro_batch_size}, gradient checkpointing {train.gradient_checkpointing}, "
        f"beta {train.beta}, mu {train.mu}, {step['generated_tokens']:.0f} generated tokens"
    )
    print(f"{'part':>44} {'seconds':>8} {'share':>6}")
    for part, seconds in parts.items():
        print(f"{part:>44} {seconds:8.2f} {seconds / total:6.1%}")
    print(f"{'step':>44} {total:8.2f}")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"peak GPU memory during the step: {peak:.1f} GiB (max_memory_allocated)")


if __name__ == "__main__":
    main()
