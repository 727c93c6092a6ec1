"""Attention over a packed GRPO group that skips the blocks its mask rules out.

Owns the attention used when scoring packed groups (`grpo.scoring.pack_group`: a prompt of P
tokens, then completion slots back to back, slot s of its own length T_s; a slot sees the
prompt and, causally, itself). Plain SDPA with that (P + ΣT_s)^2 mask computes every
masked-out slot-to-slot block too; here the prompt attends to itself, and each slot attends to
[prompt keys, its own keys]: P^2 + Σ T_s·(P + T_s) scores instead of (P + ΣT_s)^2 (about 3x
fewer at P = 110 and four slots of 128), in the forward and the backward. The mask entries
used are slices of the packed mask itself, so the result is the same attention, only computed
in pieces.

The function is registered with HF's attention and mask interfaces under `NAME`; without a
`packed_layout=(P, slots per sequence)` argument it is exactly SDPA, with SDPA's masks. A model
that trains with it attends with it for good (`use_packed_attention`): gradient checkpointing
recomputes a layer in the backward with whatever attention the config names then, so a switch
for the duration of the forward only would recompute with plain SDPA and save other tensors.
`packed_attention(config)` switches a model's config to it for the duration of a forward
without backward (`grpo.decoding.packed_prefill`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "grpo_packed_sdpa"


def _sdpa(query, key, value, mask, scaling):
    """SDPA on (b, H, q, D) queries with (b, Hkv, s, D) keys/values: (b, H, q, D)."""
    rep = query.shape[1] // key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, rep), repeat_kv(value, rep), attn_mask=mask, scale=scaling
    )


def _with_prompt(x: torch.Tensor, P: int, a: int, n: int, dim: int) -> torch.Tensor:
    """The prompt's positions then slot a:a+n's, along `dim` (keys/values: 2, mask: 3)."""
    return torch.cat([x.narrow(dim, 0, P), x.narrow(dim, a, n)], dim=dim)


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (m, H, L, D)
    key: torch.Tensor,  # (m, Hkv, L, D)
    value: torch.Tensor,  # (m, Hkv, L, D)
    attention_mask: torch.Tensor | None,  # (m, 1, L, L) bool, True = may attend
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_layout: tuple | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: SDPA, in pieces when `packed_layout` is given.

    `packed_layout` = (P, per sequence: ((start, length) of each completion slot, ...)); the
    positions after a sequence's last slot are padding: their output is zero, and no other
    position attends to them (the packed mask says so).
    """
    if packed_layout is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout or attention_mask is None or attention_mask.dtype != torch.bool:
        raise ValueError("packed attention needs a boolean packed mask and no dropout")
    P, sequences = packed_layout
    m, H, L, D = query.shape
    if len(sequences) != m or any(a + n > L for slots in sequences for a, n in slots):
        raise ValueError(f"packed layout {packed_layout} does not match {m} x {L} positions")
    if P:
        prompt = _sdpa(
            query[:, :, :P], key[:, :, :P], value[:, :, :P], attention_mask[:, :, :P, :P], scaling
        )  # (m, H, P, D)
    else:  # no shared prompt: segments that each attend to themselves (packed prefill)
        prompt = query.new_zeros(m, H, 0, D)
    rows = []
    for i, slots in enumerate(sequences):
        parts = [prompt[i : i + 1]]
        for a, n in slots:  # slot rows: [prompt keys, own keys]
            parts.append(
                _sdpa(
                    query[i : i + 1, :, a : a + n],
                    _with_prompt(key[i : i + 1], P, a, n, dim=2),  # (1, Hkv, P + n, D)
                    _with_prompt(value[i : i + 1], P, a, n, dim=2),
                    _with_prompt(attention_mask[i : i + 1, :, a : a + n], P, a, n, dim=3),
                    scaling,
                )
            )  # (1, H, n, D)
        end = P + sum(n for _, n in slots)
        if end < L:
            parts.append(query.new_zeros(1, H, L - end, D))  # padding
        rows.append(torch.cat(parts, dim=2))  # (1, H, L, D)
    out = torch.cat(rows, dim=0)  # (m, H, L, D)
    return out.transpose(1, 2).contiguous(), None  # (m, L, H, D) as HF expects


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # 2D masks become what SDPA would get


def use_packed_attention(config) -> bool:
    """Whether a model with this config attends with `packed_sdpa_forward`, switching an SDPA
    config to it for the rest of the model's life (the same attention for every forward
    without `packed_layout`, so generation and evaluation are unchanged)."""
    if config is None:
        return False
    if config._attn_implementation == "sdpa":
        config._attn_implementation = NAME
    return config._attn_implementation == NAME


@contextmanager
def packed_attention(config) -> Iterator[None]:
    """Inside: a model with this config attends with `packed_sdpa_forward` (forwards without
    backward only: a checkpointed layer recomputes after the switch back)."""
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
