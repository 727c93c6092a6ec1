"""Batched generation of completions: prompts, sampling settings, stopping and completion masks.

Owns how text is generated everywhere in the project (evaluation and GRPO rollouts), so the
choices the tutorial got wrong are made once: KV cache on and the model in eval mode while
generating, left padding, stopping on every EOS id of the generation config, sampling from the
raw policy (top_p 1, top_k 0, no repetition penalty: the model's own sampling defaults never leak
in), and completion masks built from the generated tokens (1 up to and including the first EOS),
never from `pad_token_id`, which equals EOS for SmolLM2 and Qwen. The decode loop itself is
`grpo.decode` (the HF `generate` path stays for FSDP and stop strings); scoring packs each
GRPO group's rows into one sequence so the prompt is computed once per group.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from grpo.data import build_messages
from grpo.decode import decode
from grpo.kernels import library
from grpo.packed_attention import use_packed_attention


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system: str) -> str:
    """The prompt text for one question: system + user turn through the chat template."""
    return tokenizer.apply_chat_template(
        build_messages(question, system), tokenize=False, add_generation_prompt=True
    )


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
    grpo/rollout.c's (int64 arithmetic wraps around), on the device of `seeds`."""
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

    Runs `grpo/rollout.c` in one pass where the kernels are built (CPU fp32), else in torch on
    the logits' device (only the (n,) seeds and offsets travel there, without waiting for the
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
    calls `choose`. Both pick the same token from the same logits. (Gumbel-max rather than the
    inverse CDF, which needs one uniform per row instead of V: a token flips only at a near-tie
    of the two best noisy scores, whereas the inverse CDF's cumulative sum over the vocabulary
    flips a token in the long tail at a 1e-6 change of the logits, so two engines, or two
    float summation orders, would rarely agree over a whole completion.)
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
    engine: str = "auto",
) -> Generated:
    """Generate `num_return_sequences` completions for each prompt in one batched call.

    With `sampling.temperature > 0`, `seeds` gives one seed per generated row (see `row_seeds`).
    `synced_gpus` keeps every rank stepping until all are done (needed with sharded FSDP).
    `engine`: "lean" = our decode loop (`grpo.decode`), "hf" = `model.generate`, "auto" = lean
    unless `synced_gpus` or stop strings need the HF path. Both give the same tokens.
    """
    if engine not in ("auto", "lean", "hf"):
        raise ValueError(f"engine must be auto, lean or hf, got {engine!r}")
    lean = engine == "lean" or (engine == "auto" and not synced_gpus and not config.stop_strings)
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

    One fused log-softmax (forward and backward) over the vocabulary: at 512 x 49152 logits
    it takes 0.22 s forward+backward here vs 0.38 s for gather - logsumexp.
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
    slot: torch.Tensor  # (c,) completion slot of each row in its sequence
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
        slot=slot,
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


ANSWER_CLOSE = "</answer>"


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
