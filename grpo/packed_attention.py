"""Attention over a packed GRPO group that skips the blocks its mask rules out.

Owns the attention used when scoring packed groups (`grpo.rollout.pack_group`: a prompt of P
tokens, then k completion slots of T tokens; a slot sees the prompt and, causally, itself).
Plain SDPA with that (P + kT)^2 mask computes every masked-out slot-to-slot block too; here
the prompt attends to itself, and each slot attends to [prompt keys, its own keys] as a batch
of k short sequences: P^2 + k·T·(P + T) scores instead of (P + kT)^2 (about 3x fewer at
P = 110, k = 4, T = 128), in the forward and the backward. The mask entries used are slices of
the packed mask itself, so the result is the same attention, only computed in pieces.

`packed_attention(model)` switches a model with SDPA attention to it for the duration;
the model's forward then takes `packed_layout=(P, k, T)`. Without that argument (and for
anything but a packed group) the function is exactly SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

NAME = "grpo_packed_sdpa"


def _sdpa(query, key, value, mask, scaling):
    """SDPA on (b, H, q, D) queries with (b, Hkv, s, D) keys/values: (b, H, q, D)."""
    rep = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, rep), repeat_kv(value, rep), attn_mask=mask, scale=scaling
    )


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (m, H, L, D) L = P + k*T
    key: torch.Tensor,  # (m, Hkv, L, D)
    value: torch.Tensor,  # (m, Hkv, L, D)
    attention_mask: torch.Tensor | None,  # (m, 1, L, L) bool, True = may attend
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: tuple[int, int, int] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: SDPA, in pieces when `packed_layout` is given."""
    if packed_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or attention_mask is None or attention_mask.dtype != torch.bool:
        raise ValueError("packed attention needs a boolean packed mask and no dropout")
    P, k, T = packed_layout
    m, H, L, D = query.shape
    Hkv = key.shape[1]
    if P + k * T != L:
        raise ValueError(f"packed layout {packed_layout} does not match {L} positions")
    prompt = _sdpa(
        query[:, :, :P], key[:, :, :P], value[:, :, :P], attention_mask[:, :, :P, :P], scaling
    )  # (m, H, P, D)

    def per_slot(x: torch.Tensor) -> torch.Tensor:  # (m, h, k*T, D) -> (m*k, h, T, D)
        h = x.shape[1]
        return x[:, :, P:].reshape(m, h, k, T, D).transpose(1, 2).reshape(m * k, h, T, D)

    def with_prompt(x: torch.Tensor) -> torch.Tensor:  # (m, Hkv, L, D) -> (m*k, Hkv, P+T, D)
        shared = x[:, None, :, :P].expand(m, k, Hkv, P, D)
        own = per_slot(x).view(m, k, Hkv, T, D)
        return torch.cat([shared, own], dim=3).reshape(m * k, Hkv, P + T, D)

    starts = [P + s * T for s in range(k)]
    mask = torch.stack(
        [
            torch.cat(
                [attention_mask[:, 0, a : a + T, :P], attention_mask[:, 0, a : a + T, a : a + T]],
                dim=-1,
            )
            for a in starts
        ],
        dim=1,
    ).view(m * k, 1, T, P + T)  # slot rows: [prompt keys, own keys]
    slots = _sdpa(per_slot(query), with_prompt(key), with_prompt(value), mask, scaling)
    slots = slots.view(m, k, H, T, D).transpose(1, 2).reshape(m, H, k * T, D)
    out = torch.cat([prompt, slots], dim=2)  # (m, H, L, D)
    return out.transpose(1, 2).contiguous(), None  # (m, L, H, D) as HF expects


AttentionInterface.register(NAME, packed_sdpa_forward)


@contextmanager
def packed_attention(config) -> Iterator[None]:
    """Inside: a model with this (SDPA) config attends with `packed_sdpa_forward`."""
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
