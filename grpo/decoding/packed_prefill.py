"""The packed prefill of left-padded prompts on the llama/qwen2 decode path.

Owns `prefill`: the prompts' real tokens back to back, each attending causally to itself
(`grpo.packed_attention` with no shared prompt), and their KV scattered back into the
left-padded layout the steps of `grpo.decoding.llama` read; the padding is never computed.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from grpo.packed_attention import packed_attention


def left_padded(mask: torch.Tensor) -> bool:
    """True when each row of the (B, P) attention mask is zeros, then ones."""
    P = mask.shape[1]
    first = P - mask.sum(dim=1, keepdim=True)  # (B, 1)
    return torch.equal(mask.bool(), torch.arange(P, device=mask.device) >= first)


PREFILL_TOKENS = 2048  # real prompt tokens per packed prefill call (its mask has this^2 entries)


@torch.no_grad()
def prefill(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Keys and values (per layer (B, Hkv, P, D), zeros on the left padding) and the next-token
    logits (B, V) of B left-padded prompts (B, P).

    The prompts' real tokens are packed back to back into sequences of up to PREFILL_TOKENS,
    each prompt attending causally to itself only (`grpo.packed_attention` with no shared
    prompt) at positions 0.. as `generate` gives them: the same KV and logits as the padded
    batch, without computing the padding."""
    B, P = prompt_ids.shape
    lengths = prompt_mask.sum(dim=1).tolist()
    if min(lengths) < 1 or not left_padded(prompt_mask):
        raise ValueError("prefill needs left-padded prompts of at least one token each")
    chunks: list[list[int]] = []  # consecutive prompts per packed sequence
    for b, length in enumerate(lengths):
        if not chunks or sum(lengths[i] for i in chunks[-1]) + length > PREFILL_TOKENS:
            chunks.append([])
        chunks[-1].append(b)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    logits = []
    device = prompt_ids.device
    for chunk in chunks:
        sizes = [lengths[b] for b in chunk]
        ids = torch.cat([prompt_ids[b, P - lengths[b] :] for b in chunk])[None]  # (1, S)
        positions = torch.cat([torch.arange(n, device=device) for n in sizes])[None]  # (1, S)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        slots = tuple(zip(starts, sizes, strict=True))
        segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (S,)
        causal = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()  # (S, S)
        mask = (causal & (segment[:, None] == segment[None, :]))[None, None].to(device)
        cache = DynamicCache(config=model.config)
        with packed_attention(model.config):
            hidden = model.model(
                input_ids=ids,
                attention_mask=mask,  # (1, 1, S, S)
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                packed_layout=(0, (slots,)),
            ).last_hidden_state  # (1, S, C)
        ends = torch.tensor([a + n - 1 for a, n in slots], device=device)  # (b,)
        logits.append(model.lm_head(hidden[0, ends]))  # (b, V)
        for i, layer in enumerate(cache.layers):
            if len(keys) <= i:
                _, heads, _, dim = layer.keys.shape
                keys.append(layer.keys.new_zeros(B, heads, P, dim))  # (B, Hkv, P, D)
                values.append(layer.values.new_zeros(B, heads, P, dim))  # (B, Hkv, P, D)
            for b, (a, n) in zip(chunk, slots, strict=True):
                keys[i][b, :, P - n :] = layer.keys[0, :, a : a + n]
                values[i][b, :, P - n :] = layer.values[0, :, a : a + n]
    return keys, values, torch.cat(logits)  # L x (B, Hkv, P, D), L x (...), (B, V)
