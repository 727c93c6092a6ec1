"""Batched generation of completions: stopping, completion masks and the two decoders.

Owns how text is generated everywhere in the project (evaluation and GRPO rollouts), so the
choices the tutorial got wrong are made once: KV cache on and the model in eval mode while
generating, left padding, stopping on every EOS id of the generation config, sampling through
`grpo.sampling`, and completion masks built from the generated tokens (1 up to and including the
first EOS), never from `pad_token_id`, which equals EOS for SmolLM2 and Qwen. The decode loop
itself is `grpo.decoding`; the HF `generate` path stays for FSDP and stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from grpo.answer_format import ANSWER_CLOSE
from grpo.decoding import decode
from grpo.sampling import GREEDY, Sampling, SeededSampler, greedy_choice


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it.

    >>> completion_mask(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8]]), [2]).tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids)))  # (N, T)
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # (N, T) EOS strictly before t
    return (eos_before == 0).long()  # (N, T)


@dataclass
class Generated:
    """Completions for a batch of prompts, `num_return_sequences` consecutive rows per prompt."""

    prompt_ids: torch.Tensor  # (N, P) left-padded prompt tokens
    prompt_mask: torch.Tensor  # (N, P)
    completion_ids: torch.Tensor  # (N, T) generated tokens, right-padded
    completion_mask: torch.Tensor  # (N, T) 1 up to and including the first EOS
    truncated: list[bool]  # hit the token cap without an EOS
    texts: list[str]  # decoded completions, special tokens removed
    num_tokens: list[int]  # completion length including EOS


def generation_config(
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    stop_strings: Sequence[str] = (),
) -> GenerationConfig:
    """An explicit config: greedy decoding (sampling is done by `SeededSampler`), KV cache on,
    no repetition penalty, stop on every EOS id."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        use_cache=True,
        repetition_penalty=1.0,
        stop_strings=list(stop_strings) or None,
    )


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    config: GenerationConfig,
    *,
    sampling: Sampling = GREEDY,
    seeds: Sequence[int] | None = None,
    num_return_sequences: int = 1,
    synced_gpus: bool = False,
    decoder: str = "auto",
) -> Generated:
    """Generate `num_return_sequences` completions for each prompt in one batched call.

    With `sampling.temperature > 0`, `seeds` gives one seed per generated row (see `row_seeds`).
    `synced_gpus` keeps every rank stepping until all are done (needed with sharded FSDP).
    `decoder`: "lean" = our decode loop (`grpo.decoding`), "hf" = `model.generate`, "auto" = lean
    unless `synced_gpus` or stop strings need the HF path. Both give the same tokens.
    """
    if decoder not in ("auto", "lean", "hf"):
        raise ValueError(f"decoder must be auto, lean or hf, got {decoder!r}")
    lean = decoder == "lean" or (decoder == "auto" and not synced_gpus and not config.stop_strings)
    if lean and (synced_gpus or config.stop_strings):
        raise ValueError("the lean decode loop supports neither synced_gpus nor stop strings")
    eos_ids = config.eos_token_id
    tokenizer.padding_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    prompt_ids = enc["input_ids"].repeat_interleave(num_return_sequences, 0).to(device)  # (N, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_return_sequences, 0).to(device)
    sampler = None
    if sampling.temperature > 0:
        if seeds is None or len(seeds) != prompt_ids.shape[0]:
            raise ValueError("sampling needs one seed per generated row")
        sampler = SeededSampler(sampling, seeds)
    was_training = model.training
    model.eval()
    try:
        if lean:
            completion_ids = decode(
                model,
                enc["input_ids"].to(device),
                enc["attention_mask"].to(device),
                num_return_sequences=num_return_sequences,
                max_new_tokens=config.max_new_tokens,
                eos_ids=eos_ids,
                pad_id=config.pad_token_id,
                choose=greedy_choice if sampler is None else sampler.choose,
            )  # (N, T)
        else:
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([] if sampler is None else [sampler]),
                tokenizer=tokenizer if config.stop_strings else None,
                synced_gpus=synced_gpus,
            )  # (N, P + T)
            completion_ids = out[:, prompt_ids.shape[1] :]  # (N, T)
    finally:
        model.train(was_training)
    mask = completion_mask(completion_ids.cpu(), eos_ids).to(device)  # (N, T)
    lengths = mask.sum(dim=1).tolist()  # (N,)
    has_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=device)).any(dim=1)
    texts = tokenizer.batch_decode(
        [row[:n] for row, n in zip(completion_ids.tolist(), lengths, strict=True)],
        skip_special_tokens=True,
    )
    return Generated(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.where(mask.bool(), completion_ids, config.pad_token_id),  # (N, T)
        completion_mask=mask,
        truncated=[not bool(e) for e in has_eos.tolist()],
        texts=texts,
        num_tokens=[int(n) for n in lengths],
    )


def truncate_at_answer(gen: Generated, tokenizer: PreTrainedTokenizerBase) -> Generated:
    """End each completion at the first token whose text closes `</answer>` (no EOS added).

    Done on the sampled tokens after generation, so the mask never covers a token the policy
    did not sample (generate's stop strings would pad with pad == EOS right after the stop).
    """
    mask = gen.completion_mask.clone()  # (N, T)
    texts, num_tokens, truncated = list(gen.texts), list(gen.num_tokens), list(gen.truncated)
    for row, text in enumerate(gen.texts):
        if ANSWER_CLOSE not in text:
            continue
        ids = gen.completion_ids[row, : gen.num_tokens[row]].tolist()
        lo, hi = 1, len(ids)  # smallest prefix whose decoded text contains the closing tag
        while lo < hi:
            mid = (lo + hi) // 2
            if ANSWER_CLOSE in tokenizer.decode(ids[:mid], skip_special_tokens=True):
                hi = mid
            else:
                lo = mid + 1
        mask[row, lo:] = 0
        texts[row] = tokenizer.decode(ids[:lo], skip_special_tokens=True)
        num_tokens[row] = lo
        truncated[row] = False
    return Generated(
        prompt_ids=gen.prompt_ids,
        prompt_mask=gen.prompt_mask,
        completion_ids=torch.where(mask.bool(), gen.completion_ids, tokenizer.pad_token_id),
        completion_mask=mask,
        truncated=truncated,
        texts=texts,
        num_tokens=num_tokens,
    )
