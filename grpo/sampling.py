"""How the next token is chosen: sampling settings, per-row seeds and seeded Gumbel-max sampling.

Owns the randomness of generation: each generated row draws from its own SplitMix64 stream,
seeded from (seed, step, global row index), so a row samples the same tokens whether it is
generated alone, in a batch, on another rank or by another decode engine (`grpo.generation`).
Sampling is from the raw policy by default (top_p 1, top_k 0): the model's own sampling defaults
never leak in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from grpo.kernels import library


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0, else sampled from
    softmax(logits / temperature), optionally restricted to the top_k tokens / top_p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0


GREEDY = Sampling()


def row_seeds(seed: int, stream: int, rows: Sequence[int]) -> list[int]:
    """One 63-bit seed per generated row from (seed, stream, global row index).

    Independent of batch composition and process count, so a row samples the same tokens
    whether it is generated alone, in a batch, or on another rank.

    >>> row_seeds(0, 1, [0, 1]) == row_seeds(0, 1, [0, 1]) != row_seeds(0, 2, [0, 1])
    True
    """
    out = []
    for row in rows:
        digest = hashlib.blake2b(f"{seed}:{stream}:{row}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") >> 1)
    return out


def _int64(constant: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> keeps the sign)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64


def stream_uniforms(seeds: torch.Tensor, offsets: torch.Tensor, count: int) -> torch.Tensor:
    """Uniforms offsets[i] .. offsets[i] + count - 1 of the stream of seeds[i]: (n, count).

    Element j of a seed's stream is the SplitMix64 output mix(seed + (j + 1)·GAMMA) (mod 2^64),
    its top 24 bits as a float in [0, 1): computed directly from (seed, j), so rows draw
    independently of each other and of how the work is batched. Same numbers as
    the C kernel's (`grpo.kernels`; int64 arithmetic wraps around), on the device of `seeds`."""
    index = offsets[:, None] + torch.arange(1, count + 1, device=offsets.device)  # (n, count)
    z = seeds[:, None] + index * _int64(GAMMA)  # (n, count)
    z = (z ^ _shift_right(z, 30)) * _int64(MIX1)
    z = (z ^ _shift_right(z, 27)) * _int64(MIX2)
    z = z ^ _shift_right(z, 31)
    return _shift_right(z, 40).float() * 2.0**-24  # (n, count)


def gumbel_argmax(
    logits: torch.Tensor, temperature: float, seeds: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """argmax(logits / temperature + Gumbel noise) per row of `logits` (n, V): an exact sample
    of softmax(logits / temperature). Row i's noise is -log(-log(u)) of `stream_uniforms` of
    seeds[i] from offsets[i] (int64, (n,)).

    Runs the C kernel (`grpo.kernels`) in one pass where it is built (CPU fp32), else in torch
    on the logits' device (only the (n,) seeds and offsets travel there, without waiting for the
    device); both give the same tokens up to the last bit of the logs (a near-tie of the two
    best noisy scores, rare enough that no sampled token has differed in the tests)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and library() is not None:
        logits = logits.contiguous()
        seeds, offsets = seeds.long().contiguous(), offsets.long().contiguous()
        n, vocab = logits.shape
        tokens = torch.empty(n, dtype=torch.long)  # (n,)
        library().gumbel_argmax(
            logits.data_ptr(),
            n,
            vocab,
            temperature,
            seeds.data_ptr(),
            offsets.data_ptr(),
            tokens.data_ptr(),
            torch.get_num_threads(),
        )
        return tokens
    device = logits.device
    seeds = seeds.to(device, torch.long, non_blocking=True)  # (n,)
    offsets = offsets.to(device, torch.long, non_blocking=True)  # (n,)
    uniforms = stream_uniforms(seeds, offsets, logits.shape[-1])  # (n, V)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniforms.clamp(min=tiny)))  # (n, V)
    return (logits.float() / temperature + gumbel).argmax(dim=-1)  # (n,)


class SeededSampler(LogitsProcessor):
    """Sampling by the Gumbel-max trick with one random stream per row (`gumbel_argmax`).

    argmax(logits / T + Gumbel noise) is an exact sample of softmax(logits / T); drawing each
    row's noise from its own seeded stream (V uniforms per step) makes the sample independent
    of which other rows share the batch. On the HF path it runs inside `generate` with greedy
    decoding (the chosen token gets score 0, every other -inf), so none of the model's own
    sampling defaults (top_k 20, top_p 0.8, repetition penalty...) can apply; our decode loop
    calls `choose`. Both pick the same token from the same logits. Gumbel-max rather than the
    inverse CDF because a token flips only at a near-tie of the two best noisy scores, so two
    engines or float summation orders agree over whole completions.
    """

    def __init__(self, sampling: Sampling, seeds: Sequence[int]) -> None:
        if sampling.temperature <= 0:
            raise ValueError("SeededSampler needs temperature > 0")
        self.sampling = sampling
        # on the host, whatever the model's device: the bookkeeping never waits for the device
        self.seeds = torch.tensor(list(seeds), dtype=torch.long)  # (N,)
        self.offsets = torch.zeros_like(self.seeds)  # (N,) uniforms each row has used

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores whose greedy argmax is each row's sample (the HF path)."""
        if scores.shape[0] != len(self.seeds):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.seeds)} row seeds")
        tokens = self.choose(scores, range(len(self.seeds))).to(scores.device)  # (n,)
        chosen = torch.full_like(scores, float("-inf"))  # (n, V)
        return chosen.scatter_(1, tokens[:, None], 0.0)

    def choose(self, scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """The sampled token of each of `rows` (indices into the seeds) from their scores."""
        index = torch.tensor(list(rows), dtype=torch.long)  # (n,)
        seeds, offsets = self.seeds[index], self.offsets[index]  # (n,)
        self.offsets[index] += scores.shape[-1]
        s = self.sampling
        if not 0 < s.top_k < scores.shape[-1] and s.top_p >= 1.0:
            return gumbel_argmax(scores.float(), s.temperature, seeds, offsets)
        logits = scores.float() / s.temperature  # (n, V)
        if 0 < s.top_k < logits.shape[-1]:
            kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]  # (n, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (n, V)
            probs = torch.softmax(sorted_logits, dim=-1)
            outside = (torch.cumsum(probs, dim=-1) - probs) > s.top_p  # mass before token
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
        return gumbel_argmax(logits, 1.0, seeds, offsets)


def greedy_choice(scores: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """The most likely token of each row (the greedy counterpart of `SeededSampler.choose`)."""
    return scores.argmax(dim=-1)  # (n,)
