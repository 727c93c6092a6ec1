"""The lean decode loop: our own token-by-token generation for rollouts and evaluation.

Does the same arithmetic as `model.generate` with a KV cache (so the tokens are the same for the
same seeds) with less work around it:

- each distinct prompt is prefilled once and its KV is shared by its G samples
  (`generate` prefills all B·G copies); on the llama/qwen2 path without its left padding
  (`grpo.decoding.packed_prefill`);
- llama/qwen2 models then step through `grpo.decoding.llama` (the prompt's KV held and read
  once per group); any other architecture steps through its HF forward
  (`grpo.decoding.hf_steps`: a KV cache that grows in place, and every `nn.Linear` computing
  W @ x^T for the few rows of a decode step);
- a row that has sampled an EOS leaves the batch (its KV rows are dropped) as soon as that saves
  work (`should_drop` of the step state: at once on the HF path; on the llama/qwen2 path when
  the live rows fit in fewer GEMM column blocks), and the loop stops when no row is left,
  instead of decoding padding for finished rows until the longest ends;
- no logits processors, stopping criteria or per-step input preparation beyond the model call;
  which rows still decode is tracked on the host, so on a GPU a step waits for the device once
  (the copy of its sampled tokens) and sends it only the next tokens (and, when rows leave,
  which rows stay).

`grpo.generation.generate` uses it whenever the model allows; the HF path stays for FSDP
(`synced_gpus`) and stop strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from grpo.decoding import hf_steps, llama, packed_prefill

# picks the next token of the given rows (positions in the original batch) from their logits
Chooser = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,  # (B, P) left-padded, one row per distinct prompt
    prompt_mask: torch.Tensor,  # (B, P)
    *,
    num_return_sequences: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    choose: Chooser,
) -> torch.Tensor:
    """Completion tokens (B·G, T), G = `num_return_sequences` consecutive rows per prompt.

    Row r stops after its first EOS; later positions hold `pad_id`. T is the longest completion.
    The caller puts the model in eval mode.
    """
    with hf_steps.few_rows_linears(model):
        return _decode(
            model,
            prompt_ids,
            prompt_mask,
            num_return_sequences,
            max_new_tokens,
            eos_ids,
            pad_id,
            choose,
        )


def _decode(model, prompt_ids, prompt_mask, G, max_new_tokens, eos_ids, pad_id, choose):
    device = prompt_ids.device
    positions = (prompt_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, P) as generate does
    if llama.supported(model):
        keys, values, last = packed_prefill.prefill(model, prompt_ids, prompt_mask)  # last: (B, V)
        steps = llama.SharedPrefixSteps(model, keys, values, prompt_mask, G, max_new_tokens)
    else:
        capacity = prompt_ids.shape[1] + max_new_tokens
        cache, last = hf_steps.prefill(model, prompt_ids, prompt_mask, positions, capacity)
        steps = hf_steps.CacheSteps(model, cache, prompt_mask, G)
    logits = last.float().repeat_interleave(G, dim=0)  # (N, V)
    next_position = positions[:, -1].repeat_interleave(G, dim=0) + 1  # (N,)
    # which rows are held and live is decided on the host from each step's tokens, copied there
    # once per step: the only point where the loop waits for the device
    held = torch.arange(logits.shape[0])  # (h,) rows the step state holds
    live = torch.ones_like(held, dtype=torch.bool)  # (h,) which of them still decode
    eos = torch.tensor(list(eos_ids))
    tokens = torch.full((logits.shape[0], max_new_tokens), pad_id)  # (N, T)
    length = 0
    for t in range(max_new_tokens):
        every = bool(live.all())
        rows = held if every else held[live]  # (n,) rows still decoding
        scores = logits if every else logits[_to(live.nonzero().squeeze(1), device)]  # (n, V)
        token = choose(scores, rows.tolist()).cpu()  # (n,)
        tokens[rows, t] = token
        length = t + 1
        finished = torch.isin(token, eos)  # (n,)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        feed = torch.full_like(held, pad_id)  # (h,) finished rows are fed padding, never read
        live[live.nonzero().squeeze(1)[finished]] = False
        feed[live] = token[~finished]
        if steps.should_drop(int(live.sum()), held.shape[0]):
            keep = live.nonzero().squeeze(1)  # (h',)
            held, live, feed = held[keep], live[keep], feed[keep]
            keep = _to(keep, device)
            next_position = next_position[keep]
            steps.drop(keep)
        logits = steps.step(_to(feed, device), next_position).float()  # (h, V)
        next_position = next_position + 1
    return tokens[:, :length].to(device)  # (N, T)


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, without waiting for the work queued there (the copy
    from pageable memory is staged at once, so the host tensor may change afterwards)."""
    return index.to(device, non_blocking=True)
