"""The lean decode loop: our own token-by-token generation for rollouts and evaluation.

Does the same arithmetic as `model.generate` with a KV cache (so the tokens are the same for the
same seeds) with less work around it:

- each distinct prompt is prefilled once and its KV is shared by its G samples
  (`generate` prefills all B·G copies); on the llama/qwen2 path without its left padding
  (`grpo.llama_step.prefill` packs the prompts' real tokens back to back);
- llama/qwen2 models then step through `grpo.llama_step` (plain torch, the prompt's KV held
  and read once per group); any other architecture steps through its HF forward over a KV
  cache that grows in place (no new copy of every layer's keys and values at every token),
  with every `nn.Linear` computing W @ x^T for the few rows of a decode step;
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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import MethodType

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from grpo import llama_step

# picks the next token of the given rows (positions in the original batch) from their logits
Chooser = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


class GrowingLayer(DynamicLayer):
    """A KV cache layer that appends in place into preallocated buffers of `capacity` tokens.

    `keys`/`values` are views of the filled part, so attention and `get_seq_length` see exactly
    what a `DynamicLayer` would hold.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states, value_states, *args, **kwargs):
        # key_states: (n, H, t, D)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            n, heads, _, dim = key_states.shape
            shape = (n, heads, self.capacity, dim)
            self.key_buffer = key_states.new_empty(shape)  # (n, H, C, D)
            self.value_buffer = value_states.new_empty(shape)  # (n, H, C, D)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens, {end} requested")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]  # (n, H, L, D)
        self.values = self.value_buffer[:, :, : self.length]  # (n, H, L, D)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer = self.key_buffer[indices]
        self.value_buffer = self.value_buffer[indices]
        self._expose()


def growing_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """A DynamicCache whose full-attention layers grow in place (sliding ones stay as is)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [
        GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


SMALL_BATCH = 64  # rows up to which a linear layer takes the weight-stationary GEMM


def _few_rows_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` as W @ x^T when x has few rows (decode steps), else the usual GEMM."""
    flat = x.reshape(-1, x.shape[-1])  # (M, K)
    if flat.shape[0] > SMALL_BATCH:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, flat.t()).t()  # (M, N)
    if self.bias is not None:
        out = out + self.bias
    return out.contiguous().view(*x.shape[:-1], out.shape[-1])


@contextmanager
def few_rows_linears(model: torch.nn.Module) -> Iterator[None]:
    """Inside: the model's plain `nn.Linear` layers use `_few_rows_linear` (same result)."""
    patched = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for module in patched:
        module.forward = MethodType(_few_rows_linear, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


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
    with few_rows_linears(model):
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
    if llama_step.supported(model):
        keys, values, last = llama_step.prefill(model, prompt_ids, prompt_mask)  # last: (B, V)
        steps = llama_step.SharedPrefixSteps(model, keys, values, prompt_mask, G, max_new_tokens)
    else:
        cache = growing_cache(model, prompt_ids.shape[1] + max_new_tokens)
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        last = out.logits[:, -1]  # (B, V)
        steps = _CacheSteps(model, cache, prompt_mask, G)
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


class _CacheSteps:
    """Decode steps through the model's own forward over a `growing_cache` (any architecture):
    the prompt KV is copied to each of its G rows."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, prompt_mask, G: int):
        cache.batch_repeat_interleave(G)
        self.model, self.cache = model, cache
        self.mask = prompt_mask.repeat_interleave(G, dim=0)  # (n, P + t)

    def should_drop(self, live: int, held: int) -> bool:
        """Finished rows leave at once: every row costs a whole row of work here."""
        return live < held

    def drop(self, keep: torch.Tensor) -> None:
        self.mask = self.mask[keep]
        self.cache.batch_select_indices(keep)

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=token.unsqueeze(1),
            attention_mask=self.mask,
            position_ids=position.unsqueeze(1),
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]  # (n, V)
