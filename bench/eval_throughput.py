"""Batched evaluation vs the tutorial's one-prompt-at-a-time loop, measured in the same run.

    python bench/eval_throughput.py [--model models/base] [--questions 16] [--batch-size 16]
                                    [--max-new-tokens 128] [--repeats 2]

Both sides run `grpo.evaluate.evaluate` on the same questions, model and greedy settings; only
the batch size differs (1 = the tutorial's loop). Prints new tokens/s for each (min/median over
repeats), the speed-up ratio, and how many completions agree between the two.
Questions come from data/prepared/eval.jsonl (run `dvc repro prepare base_model` first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpo import model
from grpo.evaluate import evaluate
from grpo.fsutil import read_jsonl

SYSTEM = (
    "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
)


def run(lm, tokenizer, records, batch_size: int, max_new_tokens: int, eos_ids):
    start = time.perf_counter()
    _, predictions = evaluate(
        lm,
        tokenizer,
        records,
        system=SYSTEM,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        temperature=0.0,
        seed=0,
        eos_ids=eos_ids,
        progress=False,
    )
    seconds = time.perf_counter() - start
    tokens = sum(p["completion_tokens"] for p in predictions)
    return tokens / seconds, [p["completion"] for p in predictions]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/base")
    p.add_argument("--data", default="data/prepared/eval.jsonl")
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    records = read_jsonl(args.data)[: args.questions]
    source = model.ModelSource("dir", args.model)
    tokenizer = model.load_tokenizer(source, False)
    lm = model.load_model(source)
    eos_ids = model.eos_token_ids(lm, tokenizer)
    torch.set_grad_enabled(False)
    print(f"model {args.model}, {len(records)} questions, greedy, {args.max_new_tokens} tokens max")
    speeds: dict[str, list[float]] = {"one-at-a-time": [], f"batch {args.batch_size}": []}
    texts = {}
    for _ in range(args.repeats):  # interleaved so machine noise hits both sides alike
        for name, bs in (("one-at-a-time", 1), (f"batch {args.batch_size}", args.batch_size)):
            tps, texts[name] = run(lm, tokenizer, records, bs, args.max_new_tokens, eos_ids)
            speeds[name].append(tps)
    for name, values in speeds.items():
        print(
            f"{name:>16}: {min(values):7.1f} min / {statistics.median(values):7.1f} median tokens/s"
        )
    base, batched = speeds.values()
    ratio = statistics.median(batched) / statistics.median(base)
    same = sum(a == b for a, b in zip(*texts.values(), strict=True))
    print(f"speed-up (median batched / median one-at-a-time): {ratio:.2f}x")
    print(f"identical completions: {same}/{len(records)} (batched padding can flip greedy ties)")


if __name__ == "__main__":
    main()
