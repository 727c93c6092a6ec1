"""Stage `evaluate`: batched evaluation of a model folder on the prepared eval records.

    python -m stages.evaluate --model models/base --data data/prepared/eval.jsonl \
        --metrics metrics/base.json --details metrics/details/base.json \
        --predictions metrics/predictions/base.jsonl

Greedy pass@1 by default; `eval.temperature` > 0 samples with per-row seeds from `eval.seed`,
and `eval.num_samples` k > 1 samples k completions per question (pass@k, maj@k). Writes the
headline metrics JSON (the DVC metric), the details JSON (every metric with its 95% interval,
accuracy over finished completions, lengths, timings) and one prediction per question, in the
format of `grpo.eval_results`; the three files are replaced together. Runs on the device
`grpo.device` picks (a GPU when CUDA is available), in the dtype of `model.dtype`.

A folder the sft stage copied unchanged (`sft.enabled: false`) holds the same weights as the
folder it copied, which has its own evaluation: it is not evaluated again. Its metrics and
details JSONs say so (`{"skipped": true, "reason": ...}`, no accuracies) and its predictions
file is empty; the report shows it as "sft disabled (same weights as base)".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from grpo import config, device, eval_results, model, preflight
from grpo.evaluate import evaluate
from grpo.fsutil import (
    atomic_files,
    check_writable,
    read_jsonl,
    write_json_atomic,
    write_jsonl_atomic,
)
from stages import _cli

log = logging.getLogger(__name__)


def skipped_metrics(copy_of: str) -> dict[str, Any]:
    """The metrics of a model that is an unchanged copy of `copy_of`: no accuracies, a reason."""
    return {"skipped": True, "reason": f"sft disabled (same weights as {Path(copy_of).name})"}


def _details(args) -> Path:
    """--details, by default `details/<name>` beside the metrics JSON (`details_path`)."""
    given = getattr(args, "details", None)  # callers that build the namespace may leave it out
    return Path(given) if given else eval_results.details_path(args.metrics)


def _write_outputs(
    args, predictions: list[dict[str, Any]], metrics: dict[str, Any], details: dict[str, Any]
) -> None:
    """Predictions, metrics and details as one unit: all are written in full before any
    replaces its previous version."""
    paths = (args.predictions, args.metrics, _details(args))
    with atomic_files(*paths) as (predictions_tmp, metrics_tmp, details_tmp):
        write_jsonl_atomic(predictions_tmp, predictions)
        write_json_atomic(metrics_tmp, metrics)
        write_json_atomic(details_tmp, details)


def main(args) -> None:
    params = config.load(args.params)
    check_writable(args.metrics, args.predictions, _details(args))
    preflight.check_evaluate(params, args.model)  # the machine first, before any file is read
    model.check_model_dir(args.model)  # a folder, never a hub id: no hub error for a typo
    copy_of = model.sft_copy_of(args.model)
    if copy_of is not None:
        _write_outputs(args, [], skipped_metrics(copy_of), skipped_metrics(copy_of))
        log.info("%s: unchanged copy of %s, not evaluated again", args.model, copy_of)
        return
    records = read_jsonl(args.data, strings=("id", "question", "gold"))
    target = device.pick_device()
    lm, tokenizer, eos_ids = model.load_folder(
        args.model,
        dtype=params.model.dtype,
        attn_implementation=params.model.attn_implementation,
        trust_remote_code=params.model.trust_remote_code,
        target=target,
    )
    log.info("evaluating on %s", device.describe(target))
    metrics, predictions = evaluate(
        lm,
        tokenizer,
        records,
        system=params.prompt.system,
        batch_size=params.eval.batch_size,
        max_new_tokens=params.eval.max_new_tokens,
        temperature=params.eval.temperature,
        seed=params.eval.seed,
        eos_ids=eos_ids,
        num_samples=params.eval.num_samples,
    )
    top = eval_results.headline(metrics)
    _write_outputs(args, predictions, top, metrics)
    log.info("%s: %s", args.metrics, json.dumps({k: round(v, 4) for k, v in top.items()}))


if __name__ == "__main__":
    p = _cli.parser(__doc__)
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--data", required=True, help="eval records (jsonl)")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--predictions", required=True, help="predictions JSONL to write")
    p.add_argument(
        "--details", help="details JSON to write (default: details/<name> beside --metrics)"
    )
    _cli.run("evaluate", main, p.parse_args())
