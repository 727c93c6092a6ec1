"""Rollout generation: our decode loop vs `model.generate` (KV cache on) vs cache off (tutorial).

    python bench/rollout.py [--model models/base] [--rows 8 16 32] [--group 4]
                            [--max-new-tokens 128] [--repeats 2]

All sides sample the same prompts with the same per-row seeds (temperature 1, the GRPO rollout
setting), so they generate the same tokens; the script checks that and counts only real tokens
(up to and including EOS). Speeds are min/median over interleaved repeats, reported as ratios.

The hardware bound: this run measures the machine's fp32 matmul FLOP/s with a large
`torch.matmul`, at the start and again after each batch size (this shared machine's speed drifts
over minutes; the best measurement is the peak, the strictest bound); a decoder needs about
2·params FLOPs per generated token, so peak / (2·params) tokens/s is what arithmetic alone
allows. Each side is reported as a fraction of it.

What the linear layers alone allow: one decode step multiplies every weight matrix of the model
by the step's rows (W @ x, as `grpo.decoding.llama` does); the script times exactly those GEMMs,
on the model's own weights (538 MB at 135M fp32, far more than any cache, so they stream from
memory as in a real step), and reports rows / that time as "GEMMs alone", with torch.mm (MKL)
and with `grpo.kernels.skinny_gemm` (what our decode step runs): no decode loop can beat the
latter at that batch, whatever the loop around it. "ours / GEMMs alone" is the share of a step
the GEMMs take, i.e. how much the rest (prefill, attention over the KV cache, sampling, Python)
costs.

Cache off recomputes the whole sequence for every token (cost grows with length), so it runs
once, at the smallest batch and `--cache-off-tokens` new tokens: its tokens/s at 128 would be
lower still.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpo import model
from grpo.fsutil import read_jsonl
from grpo.generation import generate, generation_config
from grpo.kernels import skinny_gemm
from grpo.prompts import chat_prompt
from grpo.sampling import Sampling, row_seeds

SYSTEM = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """Peak fp32 matmul FLOP/s of this machine (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gemm_floor(lm, rows: int, mm=torch.mm, repeats: int = 3) -> float:
    """Tokens/s the model's linear layers alone allow at `rows` rows per decode step, each
    weight times a (in, rows) operand with `mm` (rows padded as the decode step pads them)."""
    weights = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    width = skinny_gemm.column_width(rows)
    inputs = {w.shape[1]: torch.randn(w.shape[1], width) for w in weights}  # (in, width)
    mm(weights[0], inputs[weights[0].shape[1]])  # builds the kernel if it is not built yet
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            mm(w, inputs[w.shape[1]])  # (out, width)
        best = min(best, time.perf_counter() - start)
    return rows / best


def rollout(lm, tokenizer, prompts, group, max_new_tokens, eos_ids, decoder, use_cache=True):
    cfg = generation_config(
        max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id
    )
    cfg.use_cache = use_cache
    start = time.perf_counter()
    gen = generate(
        lm,
        tokenizer,
        prompts,
        cfg,
        sampling=Sampling(temperature=1.0),
        seeds=row_seeds(0, 0, range(len(prompts) * group)),
        num_return_sequences=group,
        decoder=decoder,
    )
    seconds = time.perf_counter() - start
    return sum(gen.num_tokens) / seconds, gen.texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/base")
    p.add_argument("--data", default="data/prepared/eval.jsonl")
    p.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32], help="B·G values")
    p.add_argument("--group", type=int, default=4, help="G: completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--cache-off-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    source = model.ModelSource("dir", args.model)
    tokenizer = model.load_tokenizer(source, False)
    lm = model.load_model(source)
    eos_ids = model.eos_token_ids(lm, tokenizer)
    records = read_jsonl(args.data)
    torch.set_grad_enabled(False)
    params = sum(p.numel() for p in lm.parameters())
    peaks = [matmul_flops()]  # measured again after each batch size; the bound uses the best
    print(
        f"model {args.model} ({params / 1e6:.1f}M params, fp32), {torch.get_num_threads()} "
        f"threads, sampling T=1, G={args.group}, {args.max_new_tokens} new tokens max"
    )
    table = []  # (B·G, side, min, median, agreement)
    for rows in args.rows:
        prompts = [
            chat_prompt(tokenizer, r["question"], SYSTEM) for r in records[: rows // args.group]
        ]
        speeds: dict[str, list[float]] = {"ours": [], "HF generate (cache on)": []}
        texts = {}
        for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
            for name, decoder in (("ours", "lean"), ("HF generate (cache on)", "hf")):
                tps, texts[name] = rollout(
                    lm, tokenizer, prompts, args.group, args.max_new_tokens, eos_ids, decoder
                )
                speeds[name].append(tps)
        if rows == min(args.rows):
            tps, _ = rollout(
                lm, tokenizer, prompts, args.group, args.cache_off_tokens, eos_ids, "hf", False
            )
            speeds[f"cache off ({args.cache_off_tokens} tok)"] = [tps]
        same = sum(a == b for a, b in zip(*texts.values(), strict=True))
        for name, values in speeds.items():
            agree = f"{same}/{len(texts['ours'])}" if name == "ours" else ""
            table.append((rows, name, min(values), statistics.median(values), agree))
        gemms = {"GEMMs alone (torch.mm)": torch.mm, "GEMMs alone (ours)": skinny_gemm.mm}
        for name, mm in gemms.items():
            floor = gemm_floor(lm, rows, mm)
            table.append((rows, name, floor, floor, ""))
        peaks.append(matmul_flops())

    peak = max(peaks)
    bound = peak / (2 * params)
    print(
        f"matmul peak {peak / 1e9:.1f} GFLOP/s (best of {len(peaks)} measurements over the run: "
        f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)}) -> bound {bound:.0f} tokens/s "
        "(2·params FLOPs/token)"
    )
    print(f"{'B·G':>4} {'side':>22} {'min':>8} {'median':>8} tokens/s  {'of bound':>8}  same")
    for rows, name, low, median, agree in table:
        share = median / bound
        print(f"{rows:>4} {name:>22} {low:8.1f} {median:8.1f}           {share:7.1%}  {agree}")
        if name == "GEMMs alone (ours)":
            ours = {n: m for r, n, _, m, _ in table if r == rows}
            print(f"{rows:>4} {'ours / GEMMs (ours)':>22} {ours['ours'] / median:8.2f}")
            ratio = ours["ours"] / ours["HF generate (cache on)"]
            print(f"{rows:>4} {'ours / HF generate':>22} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
