"""Decode steps through a model's own HF forward: the path of every architecture that
`grpo.decoding.llama` does not reproduce.

Owns a KV cache that grows in place (`growing_cache`: no new copy of every layer's keys and
values at every token), the prefill and steps over it (`prefill`, `CacheSteps`), and
`few_rows_linears`, under which every `nn.Linear` computes W @ x^T for the few rows of a decode
step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


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


def prefill(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,  # (B, P) left-padded
    prompt_mask: torch.Tensor,  # (B, P)
    positions: torch.Tensor,  # (B, P)
    capacity: int,
) -> tuple[DynamicCache, torch.Tensor]:
    """A `growing_cache` of `capacity` tokens holding the prompts' KV, and their next-token
    logits (B, V)."""
    cache = growing_cache(model, capacity)
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return cache, out.logits[:, -1]  # (B, V)


class CacheSteps:
    """Decode steps through the model's own forward over a `growing_cache` (any architecture):
    the prompt KV is copied to each of its G rows."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, prompt_mask, G: int):
        cache.batch_repeat_interleave(G)
        self.model, self.cache = model, cache
        self.mask = prompt_mask.repeat_interleave(G, dim=0)  # (n, P + t)

    def should_drop(self, live: int, held: int) -> bool:
        """Finished rows leave at once: every row costs a whole row of work on this path."""
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
