"""Batched evaluation of a model on prepared GSM8K records: greedy pass@1 or k samples per question.

Owns the evaluation metrics (`summarize`): strict accuracy (the tagged answer), lenient accuracy
(tagged answer or the last number of the completion), format rate (well-formed completion) and
truncation rate, each with a 95% Wilson interval over questions; the accuracy over the
completions that finished (hit EOS before the token cap), with its count; completion length and
generation speed. With `num_samples` k > 1 (sampling at a temperature), every rate is the mean
over the n·k completions (strict accuracy = pass@1), and for every k' in 1..k it adds unbiased
pass@k' (percentile bootstrap interval over questions) and maj@k' (majority vote over the first
k' samples, `grpo.stats.majority_vote`; Wilson interval), strict and lenient. Grading uses the
same parser as the rewards (`grpo.rewards.grade`). Which of these keys are the headline and how
they are written is `grpo.eval_results`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo.answer_format import normalize_number, numbers_equal
from grpo.generation import Generated, generate, generation_config
from grpo.prompts import chat_prompt
from grpo.rewards import grade
from grpo.sampling import Sampling, row_seeds
from grpo.stats import bootstrap_interval, majority_vote, pass_at_k, wilson_interval

BOOTSTRAP_SEED = 0
"""Seed of the pass@k bootstrap: the same predictions always give the same interval."""


def _sample(gen: Generated, row: int, gold: str) -> dict[str, Any]:
    """One graded completion: row `row` of `gen`."""
    graded = grade(gen.texts[row], gold)
    return {
        "strict_answer": graded.strict_answer,
        "lenient_answer": graded.lenient_answer,
        "strict_correct": graded.strict_correct,
        "lenient_correct": graded.lenient_correct,
        "well_formed": graded.well_formed,
        "completion_tokens": gen.num_tokens[row],
        "truncated": gen.truncated[row],
    }


def samples_of(prediction: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The graded completions of one prediction row: its `samples`, or the row itself (k = 1)."""
    return list(prediction.get("samples", [prediction]))


def votes(samples: Sequence[Mapping[str, Any]], lenient: bool) -> list[str | None]:
    """The answer each sample votes for in maj@k, normalized: the tagged answer; with `lenient`,
    the last number of the completion when the tag holds no number."""
    out = []
    for s in samples:
        vote = normalize_number(s["strict_answer"])
        if vote is None and lenient:
            vote = normalize_number(s["lenient_answer"])
        out.append(vote)
    return out


def _prediction(record: Mapping[str, str], completion: str, samples: list[dict[str, Any]]):
    """The predictions row of one question. One sample: the sample's fields. k samples: the
    first sample's completion, the majority answers and their correctness (maj@k), the counts,
    and every sample's graded fields under `samples` (texts left out: the file stays small)."""
    gold = record["gold"]
    counts = {
        "num_samples": len(samples),
        "strict_correct_count": sum(s["strict_correct"] for s in samples),
        "lenient_correct_count": sum(s["lenient_correct"] for s in samples),
    }
    if len(samples) == 1:
        return {"id": record["id"], "gold": gold, "completion": completion} | samples[0] | counts
    strict, lenient = majority_vote(votes(samples, False)), majority_vote(votes(samples, True))
    return {
        "id": record["id"],
        "gold": gold,
        "completion": completion,
        "strict_answer": strict,
        "lenient_answer": lenient,
        "strict_correct": numbers_equal(strict, gold),
        "lenient_correct": numbers_equal(lenient, gold),
        **counts,
        "well_formed_count": sum(s["well_formed"] for s in samples),
        "truncated_count": sum(s["truncated"] for s in samples),
        "samples": samples,
    }


def _rate(name: str, successes: float, n: int) -> dict[str, float]:
    """`name` = successes / n with its Wilson interval (`successes` may be fractional: the sum
    over questions of each question's share of correct samples)."""
    lo, hi = wilson_interval(successes, n)
    return {name: successes / n if n else 0.0, f"{name}_ci_low": lo, f"{name}_ci_high": hi}


def summarize(
    predictions: Sequence[Mapping[str, Any]], seconds: float, temperature: float
) -> dict[str, Any]:
    """Every evaluation metric of `predictions` (rows of `evaluate`) generated in `seconds` at
    `temperature` (recorded, so the report can say greedy or sampled).

    Intervals treat questions as the unit: a rate over n·k completions gets the Wilson interval
    of its mean over n questions (exact for k = 1, conservative for k > 1); the finished-only
    accuracies count completions.
    """
    per_question = [samples_of(p) for p in predictions]
    n = len(per_question)
    k = len(per_question[0]) if per_question else 1
    samples = [s for qs in per_question for s in qs]
    total = len(samples)
    finished = [s for s in samples if not s["truncated"]]
    metrics: dict[str, Any] = {"n": n, "num_samples": k, "temperature": temperature}
    for key, name in (
        ("strict_correct", "strict_accuracy"),
        ("lenient_correct", "lenient_accuracy"),
        ("well_formed", "format_rate"),
        ("truncated", "truncation_rate"),
    ):
        metrics |= _rate(name, sum(s[key] for s in samples) / k, n)
    metrics["n_finished"] = len(finished)
    for key, name in (("strict_correct", "strict"), ("lenient_correct", "lenient")):
        metrics |= _rate(f"{name}_accuracy_finished", sum(s[key] for s in finished), len(finished))
    tokens = sum(s["completion_tokens"] for s in samples)
    metrics |= {
        "mean_completion_tokens": tokens / total if total else 0.0,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
    if k > 1:
        metrics |= _sampled_metrics(per_question, [p["gold"] for p in predictions], k)
    return metrics


def _sampled_metrics(
    per_question: Sequence[Sequence[Mapping[str, Any]]], gold: Sequence[str], k: int
) -> dict[str, float]:
    """pass@j and maj@j for j in 1..k, strict (`pass@j`, `maj@j`) and lenient
    (`lenient_pass@j`, `lenient_maj@j`), each with its 95% interval."""
    n = len(per_question)
    out: dict[str, float] = {}
    for prefix, key, lenient in (
        ("", "strict_correct", False),
        ("lenient_", "lenient_correct", True),
    ):
        counts = [sum(s[key] for s in qs) for qs in per_question]
        ballots = [votes(qs, lenient) for qs in per_question]
        for j in range(1, k + 1):
            per = [pass_at_k(k, c, j) for c in counts]
            lo, hi = bootstrap_interval(per, seed=BOOTSTRAP_SEED)
            name = f"{prefix}pass@{j}"
            out |= {name: sum(per) / n, f"{name}_ci_low": lo, f"{name}_ci_high": hi}
            right = sum(
                numbers_equal(majority_vote(b[:j]), g) for b, g in zip(ballots, gold, strict=True)
            )
            out |= _rate(f"{prefix}maj@{j}", right, n)
    return out


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
    num_samples: int = 1,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate `num_samples` completions per record; return (metrics, predictions).

    The k samples of a question are k rows of one prompt (`num_return_sequences`), so they share
    its prefill; a batch holds batch_size // k questions (at least one). Sample j of question i
    draws from the seed `row_seeds(seed, j, [i])`: results do not depend on the batch size, and
    the first samples of a run with more samples are the samples of a run with fewer. Prompts
    are batched in order of token length (less padding); predictions come back in the order of
    `records`.
    """
    k = num_samples
    prompts = [chat_prompt(tokenizer, r["question"], system) for r in records]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    config = generation_config(
        max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id
    )
    sampling = Sampling(temperature=temperature)
    streams = [row_seeds(seed, j, range(len(records))) for j in range(k)]  # (k, n) per question
    per_batch = max(1, batch_size // k)
    predictions: list[dict[str, Any]] = [{} for _ in records]
    correct = 0
    start = time.perf_counter()
    bar = tqdm(total=len(order), desc="evaluate", unit="q", disable=not progress)
    for begin in range(0, len(order), per_batch):
        idx = order[begin : begin + per_batch]
        gen = generate(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            config,
            sampling=sampling,
            seeds=[streams[j][i] for i in idx for j in range(k)],
            num_return_sequences=k,
        )
        for p, i in enumerate(idx):
            samples = [_sample(gen, p * k + j, records[i]["gold"]) for j in range(k)]
            predictions[i] = _prediction(records[i], gen.texts[p * k], samples)
            correct += predictions[i]["strict_correct_count"]
        bar.update(len(idx))
        bar.set_postfix(strict_correct=correct)
    bar.close()
    seconds = time.perf_counter() - start
    return summarize(predictions, seconds, temperature), predictions
