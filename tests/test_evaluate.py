"""Evaluation with the tiny model: k samples per question as k rows of one prompt, seeded per row
(results independent of the batch size), counts / pass@k / maj@k that agree with the
predictions, the greedy default, the eval config checks, and the stage's three output files."""

from __future__ import annotations

import argparse
import itertools
import json
from fractions import Fraction
from pathlib import Path

import pytest
import tiny
import yaml

from grpo import config, eval_results
from grpo import evaluate as evaluate_lib
from grpo.answer_format import normalize_number
from grpo.generation import generate, generation_config
from grpo.prompts import chat_prompt
from grpo.rewards import Graded
from grpo.sampling import row_seeds
from grpo.schema import ConfigError
from grpo.stats import majority_vote
from stages import evaluate as evaluate_stage

SYSTEM = "Answer."
RECORDS = [
    {"id": f"test-{i:05d}", "question": q, "gold": a.rsplit("####", 1)[-1].strip()}
    for i, (q, a) in enumerate(tiny.GSM8K_ROWS["test"][:5])
]


def run(lm, *, batch_size, num_samples, temperature=1.0, seed=3, records=RECORDS, eos_ids=()):
    model, tokenizer = lm
    return evaluate_lib.evaluate(
        model,
        tokenizer,
        records,
        system=SYSTEM,
        batch_size=batch_size,
        max_new_tokens=6,
        temperature=temperature,
        seed=seed,
        eos_ids=[tokenizer.eos_token_id, *eos_ids],
        num_samples=num_samples,
        progress=False,
    )


@pytest.fixture
def calls(monkeypatch):
    """Every generate() call of the evaluation: its prompts, seeds, rows per prompt, texts."""
    seen = []

    def recording(*args, **kwargs):
        gen = generate(*args, **kwargs)
        seen.append(
            {
                "prompts": list(args[2]),
                "seeds": list(kwargs["seeds"]),
                "k": kwargs["num_return_sequences"],
                "texts": gen.texts,
            }
        )
        return gen

    monkeypatch.setattr(evaluate_lib, "generate", recording)
    return seen


def texts_by_row(calls, tokenizer) -> dict[tuple[int, int], str]:
    """(question index, sample index) -> completion text, over all recorded calls."""
    index = {chat_prompt(tokenizer, r["question"], SYSTEM): i for i, r in enumerate(RECORDS)}
    out = {}
    for call in calls:
        for p, prompt in enumerate(call["prompts"]):
            for j in range(call["k"]):
                out[(index[prompt], j)] = call["texts"][p * call["k"] + j]
    return out


def test_k_samples_are_rows_of_one_prompt_with_per_row_seeds(lm, calls):
    _, tokenizer = lm
    run(lm, batch_size=6, num_samples=3)  # 6 rows: 2 questions per batch
    assert [len(c["prompts"]) for c in calls] == [2, 2, 1]
    index = {chat_prompt(tokenizer, r["question"], SYSTEM): i for i, r in enumerate(RECORDS)}
    for call in calls:
        assert call["k"] == 3
        questions = [index[p] for p in call["prompts"]]
        assert call["seeds"] == [row_seeds(3, j, [i])[0] for i in questions for j in range(3)]
    texts = texts_by_row(calls, tokenizer)
    assert len(texts) == 15
    assert any(len({texts[(i, j)] for j in range(3)}) > 1 for i in range(5))  # samples differ


def test_results_do_not_depend_on_the_batch_size(lm, calls):
    _, tokenizer = lm
    metrics_a, predictions_a = run(lm, batch_size=3, num_samples=3)  # one question a batch
    texts_a = texts_by_row(calls, tokenizer)
    calls.clear()
    metrics_b, predictions_b = run(lm, batch_size=64, num_samples=3)  # all in one batch
    assert len(calls) == 1
    assert texts_by_row(calls, tokenizer) == texts_a
    assert predictions_a == predictions_b
    for key in ("strict_accuracy", "format_rate", "mean_completion_tokens", "pass@3", "maj@3"):
        assert metrics_a[key] == metrics_b[key]


def test_fewer_samples_are_the_first_samples_of_more(lm, calls):
    _, tokenizer = lm
    run(lm, batch_size=8, num_samples=2)
    two = texts_by_row(calls, tokenizer)
    calls.clear()
    run(lm, batch_size=8, num_samples=4)
    four = texts_by_row(calls, tokenizer)
    assert two == {key: text for key, text in four.items() if key[1] < 2}


def fake_grade(completion: str, gold: str) -> Graded:
    """A grader whose verdicts vary with the generated text: the random tiny model never
    writes a right answer, so the real grader would give all-zero counts."""
    strict = str(len(completion) % 3)
    lenient = str(len(completion) % 2)
    return Graded(
        strict_answer=strict if len(completion) % 5 else None,  # some samples abstain
        lenient_answer=lenient,
        strict_correct=len(completion) % 5 != 0 and strict == gold,
        lenient_correct=(len(completion) % 5 != 0 and strict == gold) or lenient == gold,
        well_formed=len(completion) % 2 == 0,
    )


def test_counts_pass_at_k_and_maj_at_k_agree_with_the_predictions(lm, monkeypatch):
    monkeypatch.setattr(evaluate_lib, "grade", fake_grade)
    records = [r | {"gold": str(i % 2)} for i, r in enumerate(RECORDS)]
    k = 4
    metrics, predictions = run(lm, batch_size=8, num_samples=k, records=records)
    counts = [p["strict_correct_count"] for p in predictions]
    assert 0 < sum(counts) < len(counts) * k  # not a trivial all-right or all-wrong case
    for p in predictions:
        samples = p["samples"]
        assert p["num_samples"] == len(samples) == k
        assert p["strict_correct_count"] == sum(s["strict_correct"] for s in samples)
        assert p["lenient_correct_count"] == sum(s["lenient_correct"] for s in samples)
        assert p["truncated_count"] == sum(s["truncated"] for s in samples)
    n = len(predictions)
    assert metrics["n"] == n and metrics["num_samples"] == k
    assert metrics["strict_accuracy"] == pytest.approx(sum(counts) / (n * k))
    assert metrics["pass@1"] == pytest.approx(metrics["strict_accuracy"])
    for j in range(1, k + 1):
        # pass@j by enumeration: the share of j-subsets of a question's samples with a right one
        brute = []
        for p in predictions:
            subsets = list(itertools.combinations([s["strict_correct"] for s in p["samples"]], j))
            brute.append(Fraction(sum(any(s) for s in subsets), len(subsets)))
        assert metrics[f"pass@{j}"] == pytest.approx(float(sum(brute) / n))
        assert metrics[f"pass@{j}_ci_low"] <= metrics[f"pass@{j}"] <= metrics[f"pass@{j}_ci_high"]
        majority = [
            majority_vote([normalize_number(s["strict_answer"]) for s in p["samples"][:j]])
            for p in predictions
        ]
        gold = [normalize_number(p["gold"]) for p in predictions]
        right = [m is not None and m == g for m, g in zip(majority, gold, strict=True)]
        assert metrics[f"maj@{j}"] == pytest.approx(sum(right) / n)
    # the predictions' correctness is the majority answer's over all k samples
    assert [p["strict_correct"] for p in predictions] == right
    first = [p["samples"][0]["strict_correct"] for p in predictions]
    assert metrics["maj@1"] == pytest.approx(sum(first) / n)  # one vote: its own verdict
    lenient = [p["lenient_correct_count"] for p in predictions]
    assert metrics["lenient_pass@1"] == pytest.approx(sum(lenient) / (n * k))
    top = eval_results.headline(metrics)
    assert list(top) == [*eval_results.HEADLINE_KEYS, "pass@4", "maj@4", "num_samples"]


def test_finished_only_accuracy_counts_the_completions_that_ended(lm, monkeypatch):
    monkeypatch.setattr(evaluate_lib, "grade", fake_grade)
    # a random model rarely ends: with a tenth of the vocabulary as EOS, about half end in time
    metrics, predictions = run(lm, batch_size=8, num_samples=3, eos_ids=range(100, 140))
    samples = [s for p in predictions for s in p["samples"]]
    finished = [s for s in samples if not s["truncated"]]
    assert 0 < len(finished) < len(samples)
    assert metrics["n_finished"] == len(finished)
    assert metrics["truncation_rate"] == pytest.approx(1 - len(finished) / len(samples))
    right = sum(s["strict_correct"] for s in finished)
    assert metrics["strict_accuracy_finished"] == pytest.approx(right / len(finished))


def test_greedy_default_is_one_completion_per_question(lm, calls):
    model, tokenizer = lm
    metrics, predictions = run(lm, batch_size=2, num_samples=1, temperature=0.0)
    assert {c["k"] for c in calls} == {1}
    prompts = [chat_prompt(tokenizer, r["question"], SYSTEM) for r in RECORDS]
    config_ = generation_config(
        max_new_tokens=6, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id
    )
    greedy = generate(model, tokenizer, prompts, config_)
    assert [p["completion"] for p in predictions] == greedy.texts
    assert list(predictions[0]) == [
        "id",
        "gold",
        "completion",
        "strict_answer",
        "lenient_answer",
        "strict_correct",
        "lenient_correct",
        "well_formed",
        "completion_tokens",
        "truncated",
        "num_samples",
        "strict_correct_count",
        "lenient_correct_count",
    ]
    assert list(eval_results.headline(metrics)) == list(eval_results.HEADLINE_KEYS)
    assert not any("@" in key for key in metrics)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_samples": 4, "temperature": 0.0}, "eval.num_samples: 4 samples at temperature 0"),
        ({"num_samples": 0}, "eval.num_samples: must be >= 1"),
    ],
)
def test_eval_config_checks_num_samples(change, message):
    raw = config.default_params_dict()
    raw["eval"].update(change)
    with pytest.raises(ConfigError, match=message):
        config.Params.from_dict(raw)
    raw["eval"].update(num_samples=4, temperature=0.7)
    assert config.Params.from_dict(raw).eval.num_samples == 4


def test_stage_writes_headline_details_and_predictions(tmp_path, tiny_model_dir):
    raw = config.default_params_dict()
    raw["eval"].update(num_samples=2, temperature=0.7, max_new_tokens=4, batch_size=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    metrics = tmp_path / "metrics" / "base.json"
    args = argparse.Namespace(
        params=str(params),
        model=str(tiny_model_dir),
        data=str(data),
        metrics=str(metrics),
        predictions=str(tmp_path / "metrics" / "predictions" / "base.jsonl"),
        details=None,  # the default: metrics/details/base.json
    )
    evaluate_stage.main(args)
    top = json.loads(metrics.read_text())
    assert list(top) == [*eval_results.HEADLINE_KEYS, "pass@2", "maj@2", "num_samples"]
    details = json.loads((tmp_path / "metrics" / "details" / "base.json").read_text())
    assert {key: details[key] for key in top} == top
    assert "strict_accuracy_ci_low" in details and "lenient_maj@2_ci_high" in details
    assert eval_results.load_one(metrics)["seconds"] > 0
    rows = [json.loads(line) for line in Path(args.predictions).read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in RECORDS]
    assert all(r["num_samples"] == 2 and len(r["samples"]) == 2 for r in rows)
