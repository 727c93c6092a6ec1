"""Batched evaluation of a model on prepared GSM8K records, with confidence intervals.

Owns the evaluation metrics: strict accuracy (the tagged answer), lenient accuracy (tagged answer
or the last number of the completion), format rate (well-formed completion), each with a Wilson
95% interval, plus completion length, truncation rate and generation speed. Grading uses the
same parser as the rewards (`grpo.rewards.grade`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo.generation import generate, generation_config
from grpo.prompts import chat_prompt
from grpo.rewards import grade
from grpo.sampling import Sampling, row_seeds
from grpo.stats import wilson_interval


def _rate(name: str, flags: Sequence[bool]) -> dict[str, float]:
    k, n = sum(flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {name: k / n if n else 0.0, f"{name}_ci_low": lo, f"{name}_ci_high": hi}


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, str]],
    *,
    system: str,
    batch_size: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    eos_ids: Sequence[int],
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate one completion per record in batches; return (metrics, predictions).

    Prompts are batched in order of token length (less padding); predictions come back in the
    order of `records`.
    """
    prompts = [chat_prompt(tokenizer, r["question"], system) for r in records]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    config = generation_config(
        max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id
    )
    sampling = Sampling(temperature=temperature)
    seeds = row_seeds(seed, 0, range(len(records)))  # per question: batching cannot change it
    predictions: list[dict[str, Any]] = [{} for _ in records]
    correct = 0
    start = time.perf_counter()
    bar = tqdm(total=len(order), desc="evaluate", unit="q", disable=not progress)
    for begin in range(0, len(order), batch_size):
        idx = order[begin : begin + batch_size]
        gen = generate(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            config,
            sampling=sampling,
            seeds=[seeds[i] for i in idx],
        )
        for j, i in enumerate(idx):
            graded = grade(gen.texts[j], records[i]["gold"])
            correct += graded.strict_correct
            predictions[i] = {
                "id": records[i]["id"],
                "gold": records[i]["gold"],
                "completion": gen.texts[j],
                "strict_answer": graded.strict_answer,
                "lenient_answer": graded.lenient_answer,
                "strict_correct": graded.strict_correct,
                "lenient_correct": graded.lenient_correct,
                "well_formed": graded.well_formed,
                "completion_tokens": gen.num_tokens[j],
                "truncated": gen.truncated[j],
            }
        bar.update(len(idx))
        bar.set_postfix(strict_correct=correct)
    bar.close()
    seconds = time.perf_counter() - start

    total_tokens = sum(p["completion_tokens"] for p in predictions)
    n = len(predictions)
    metrics: dict[str, Any] = {"n": n}
    metrics |= _rate("strict_accuracy", [p["strict_correct"] for p in predictions])
    metrics |= _rate("lenient_accuracy", [p["lenient_correct"] for p in predictions])
    metrics |= _rate("format_rate", [p["well_formed"] for p in predictions])
    metrics |= {
        "mean_completion_tokens": total_tokens / n if n else 0.0,
        "truncation_rate": sum(p["truncated"] for p in predictions) / n if n else 0.0,
        "tokens_per_second": total_tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
    return metrics, predictions
