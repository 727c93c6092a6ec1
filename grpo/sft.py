"""Supervised format warm-up: teach the tagged answer format (and to stop) before GRPO.

Owns the `sft` stage's training: GSM8K train solutions are rewritten into
`<reasoning>...</reasoning>\\n<answer>...</answer>` (calculator annotations removed), the model's
EOS token is appended so it learns to stop, and the loss covers completion tokens only. Small
models (SmolLM2-135M) never write the tags on their own, so without this every GRPO group has
zero reward variance and no learning signal; the tutorial's 0.5B sibling did the same.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grpo.config import SftConfig
from grpo.device import autocast, reproducible
from grpo.errors import UserError
from grpo.prompts import chat_prompt, sft_completion
from grpo.schedule import lr_factor

log = logging.getLogger(__name__)
IGNORE = -100


class SftNonFiniteError(UserError):
    """The SFT loss or gradient norm is NaN or infinite: the weights would be garbage."""


def _check_finite(loss: float, grad_norm: float, step: int) -> None:
    """Stop before a non-finite loss or gradient reaches the weights (nothing is saved)."""
    fault = "loss" if not math.isfinite(loss) else "" if math.isfinite(grad_norm) else "grad norm"
    if fault:
        raise SftNonFiniteError(
            f"sft: non-finite {fault} at step {step}, nothing was written; set a lower "
            f"sft.learning_rate or sft.max_grad_norm in params.yaml"
        )


def build_example(
    tokenizer: PreTrainedTokenizerBase,
    record: Mapping[str, str],
    system: str,
    eos_id: int,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one record; labels are IGNORE over the prompt."""
    prompt = chat_prompt(tokenizer, record["question"], system)
    target = sft_completion(record["solution"], record["gold"])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos_id]
    return prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch of examples."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)  # (b, L)
    labels = torch.full((len(examples), width), IGNORE)  # (b, L)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (b, L)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, str]],
    cfg: SftConfig,
    *,
    system: str,
    eos_id: int,
    progress: bool = True,
) -> list[float]:
    """Fine-tune `model` in place, on the device it is on, on the first `cfg.num_examples`
    records (bf16 autocast where bf16 is native); return step losses."""
    torch.manual_seed(cfg.seed)
    chosen = list(records[: cfg.num_examples])
    examples = [build_example(tokenizer, r, system, eos_id) for r in chosen]
    steps_per_epoch = -(-len(examples) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor("constant", cfg.warmup_steps, total)
    )
    device = next(model.parameters()).device
    order_rng = random.Random(cfg.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc="sft", unit="step", disable=not progress)
    try:
        for _ in range(cfg.epochs):
            order = list(range(len(examples)))
            order_rng.shuffle(order)
            for begin in range(0, len(order), cfg.batch_size):
                batch = collate(
                    [examples[i] for i in order[begin : begin + cfg.batch_size]],
                    tokenizer.pad_token_id,
                )
                batch = {k: v.to(device) for k, v in batch.items()}
                with reproducible(device):  # bit-identical reruns on the CPU
                    with autocast(device):
                        loss = model(**batch).loss
                    loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                _check_finite(loss.item(), float(grad_norm), len(losses) + 1)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:  # ends the bar's line before an error is printed
        bar.close()
    model.eval()
    log.info("sft: %d steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1])
    return losses
