"""Log-probs of completions under a model: one sequence per row, or a GRPO group packed.

Owns how completions are scored for the GRPO loss (policy, old policy, reference): only the
completion positions get logits, each row is scored up to its own length, and rows that share a
prompt are packed into one sequence so the prompt is computed once per group (attention in
`grpo.packed_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from grpo.packed_attention import use_packed_attention


def sequence_inputs(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) of prompt + completion, positions as in generate.

    Left padding shifts nothing: positions count only real tokens, like `generate` does.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + T)
    attention = torch.cat([prompt_mask, torch.ones_like(completion_ids)], dim=1)  # (N, P + T)
    positions = (attention.long().cumsum(dim=1) - 1).clamp(min=0)  # (N, P + T)
    return input_ids, attention, positions


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,  # (N, P) left-padded
    prompt_mask: torch.Tensor,  # (N, P)
    completion_ids: torch.Tensor,  # (N, T)
    *,
    temperature: float = 1.0,
    chunk_size: int = 4,
    completion_mask: torch.Tensor | None = None,  # (N, T) 1 up to and including the first EOS
) -> torch.Tensor:
    """Log-prob of each completion token under `model` (sampling temperature applied): (N, T).

    With `completion_mask`, each row is scored only up to its own length (positions past it
    are 0, masked out anyway): packed, a completion that ends at token 40 costs 40 positions,
    not the batch's longest (often `max_completion_length`); one sequence per row, a chunk
    costs its longest row.

    Rows are processed `chunk_size` at a time and only the T completion positions get logits, so
    the full (N, P + T, V) logits tensor is never built. Gradients flow when grad is enabled.
    Consecutive rows of a chunk with the same prompt (a GRPO group) are packed into one sequence,
    prompt once then each completion, so the prompt is computed once per group (`pack_group`);
    an SDPA model switches to packed attention for good (`use_packed_attention`); models
    without SDPA attention (which the packed mask needs) get one sequence per row.
    """
    packed = use_packed_attention(_config(model))
    scale = temperature if temperature > 0 else 1.0
    rows = []
    for begin in range(0, prompt_ids.shape[0], chunk_size):
        chunk = slice(begin, begin + chunk_size)
        completions = completion_ids[chunk]  # (c, T)
        lengths = None if completion_mask is None else completion_mask[chunk].sum(dim=1).tolist()
        if packed:
            logp = _packed_logprobs(
                model, prompt_ids[chunk], prompt_mask[chunk], completions, scale, lengths
            )  # (c, T)
        else:
            if lengths is not None:
                completions = completions[:, : max(max(lengths), 1)]  # (c, T')
            logp = _row_logprobs(model, prompt_ids[chunk], prompt_mask[chunk], completions, scale)
        rows.append(torch.nn.functional.pad(logp, (0, completion_ids.shape[1] - logp.shape[1])))
    return torch.cat(rows, dim=0)  # (N, T)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """log softmax(logits / scale) at `targets`: (..., V), (...) -> (...).

    One fused log-softmax over the vocabulary, faster forward and backward than gather minus
    logsumexp.
    """
    logits = logits.float()
    if scale != 1.0:
        logits = logits / scale
    logp = torch.log_softmax(logits, dim=-1)  # (..., V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)


def _config(model: torch.nn.Module):
    """The config of a model, looking through DDP-style `.module` wrappers (None if none)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "config", None)


def _row_logprobs(model, prompt_ids, prompt_mask, completion_ids, scale) -> torch.Tensor:
    """Completion-token log-probs, one sequence per row: (c, T)."""
    input_ids, attention, positions = sequence_inputs(prompt_ids, prompt_mask, completion_ids)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        logits_to_keep=completion_ids.shape[1] + 1,
        use_cache=False,
    ).logits[:, :-1]  # (c, T, V) position t predicts completion token t
    return _token_logprobs(logits, completion_ids, scale)  # (c, T)


@dataclass
class Packed:
    """Rows packed by prompt: each sequence holds a prompt, then its rows' completions back to
    back, each only as long as that row's completion (right-padded to the longest sequence)."""

    input_ids: torch.Tensor  # (m, L)
    attention: torch.Tensor  # (m, 1, L, L) bool, True = may attend
    positions: torch.Tensor  # (m, L)
    group: torch.Tensor  # (c,) packed sequence of each row
    keep: torch.Tensor  # (K,) positions whose logits are computed (every sequence's, concatenated)
    row_keep: torch.Tensor  # (c, T) index into `keep` of the logits predicting row r's token t
    valid: torch.Tensor  # (c, T) bool, t < row r's scored length
    layout: tuple  # (P, per sequence: ((start, length) of each slot, ...)) for packed attention


def pack_group(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    lengths: Sequence[int] | None = None,
) -> Packed:
    """Pack consecutive rows that share a prompt into one sequence: prompt, then completions.

    A completion slot attends to its prompt and causally to itself, never to another slot, and
    its positions continue from the prompt's, so each row sees exactly the context it would see
    alone (`sequence_inputs`), while the prompt is computed once for its group. Row r's slot
    holds its first `lengths[r]` tokens (default: all T), so padding after an EOS costs nothing.
    """
    c, P = prompt_ids.shape
    T = completion_ids.shape[1]
    device = prompt_ids.device
    lengths = [T] * c if lengths is None else [max(1, min(int(n), T)) for n in lengths]
    new = torch.ones(c, dtype=torch.bool, device=device)  # (c,) first row of its group
    new[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(dim=1)
    group = torch.cumsum(new.long(), dim=0) - 1  # (c,)
    firsts = new.nonzero().squeeze(1)  # (m,)
    slot = torch.arange(c, device=device) - firsts[group]  # (c,)
    m = firsts.shape[0]
    starts, ends = [0] * c, [P] * m  # slot start of each row, end of each sequence
    for r, i in enumerate(group.tolist()):
        starts[r], ends[i] = ends[i], ends[i] + lengths[r]
    L = max(ends)
    prompt_len = prompt_mask[firsts].long().sum(dim=1)  # (m,)
    input_ids = prompt_ids.new_zeros(m, L)  # (m, L)
    input_ids[:, :P] = prompt_ids[firsts]
    positions = torch.zeros(m, L, dtype=torch.long, device=device)  # (m, L)
    positions[:, :P] = (prompt_mask[firsts].long().cumsum(dim=1) - 1).clamp(min=0)
    region = torch.full((m, L), -2, device=device)  # (m, L) -1 prompt, s slot s, -2 padding
    region[:, :P] = -1
    key_ok = torch.zeros(m, L, dtype=torch.bool, device=device)  # (m, L)
    key_ok[:, :P] = prompt_mask[firsts].bool()
    keep_lists: list[list[int]] = [[] for _ in range(m)]
    row_keep = torch.zeros(c, T, dtype=torch.long, device=device)  # (c, T)
    valid = torch.zeros(c, T, dtype=torch.bool, device=device)  # (c, T)
    layout: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    for r, (i, s) in enumerate(zip(group.tolist(), slot.tolist(), strict=True)):
        a, n = starts[r], lengths[r]
        input_ids[i, a : a + n] = completion_ids[r, :n]
        positions[i, a : a + n] = prompt_len[i] + torch.arange(n, device=device)
        region[i, a : a + n] = s
        key_ok[i, a : a + n] = True
        layout[i].append((a, n))
        # the prompt's last position predicts the slot's first token, its own positions the rest
        row_keep[r, :n] = len(keep_lists[i]) + torch.arange(n, device=device)
        keep_lists[i] += [P - 1, *range(a, a + n - 1)]
        valid[r, :n] = True
    offsets = [0]
    for kept in keep_lists[:-1]:
        offsets.append(offsets[-1] + len(kept))
    row_keep += torch.tensor(offsets, device=device)[group][:, None]  # into the concatenation
    index = torch.arange(L, device=device)
    causal = index[None, :] <= index[:, None]  # (L, L) [query, key]
    visible = (region[:, :, None] == region[:, None, :]) | (region[:, None, :] == -1)  # (m, L, L)
    attention = causal[None] & visible & key_ok[:, None, :]  # (m, L, L)
    attention |= torch.eye(L, dtype=torch.bool, device=device)  # no empty rows (padding)
    return Packed(
        input_ids=input_ids,
        attention=attention.unsqueeze(1),
        positions=positions,
        group=group,
        keep=torch.tensor([p for kept in keep_lists for p in kept], device=device),
        row_keep=row_keep,
        valid=valid,
        layout=(P, tuple(tuple(slots) for slots in layout)),
    )


def _packed_logprobs(model, prompt_ids, prompt_mask, completion_ids, scale, lengths=None):
    """Completion-token log-probs, rows packed by prompt (`pack_group`): (c, T), 0 past
    `lengths`."""
    pk = pack_group(prompt_ids, prompt_mask, completion_ids, lengths)
    logits = model(
        input_ids=pk.input_ids,
        attention_mask=pk.attention,
        position_ids=pk.positions,
        logits_to_keep=pk.keep,
        use_cache=False,
        packed_layout=pk.layout,  # skips the masked-out slot-to-slot blocks
    ).logits  # (m, K, V)
    targets = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)  # (m, K)
    rows = pk.group[:, None].expand_as(pk.row_keep)  # (c, T)
    targets[rows[pk.valid], pk.row_keep[pk.valid]] = completion_ids[pk.valid]
    logp = _token_logprobs(logits, targets, scale)  # (m, K)
    return torch.where(pk.valid, logp[rows, pk.row_keep], 0.0)  # (c, T)
