"""Completion log-probs on a tiny random model: per row and packed by group, with gradients."""

from __future__ import annotations

import tiny
import torch
from tiny import fixture_prompts

from grpo import packed_attention
from grpo.generation import (
    completion_mask,
    generate,
    generation_config,
)
from grpo.loss import grpo_loss
from grpo.sampling import (
    Sampling,
    row_seeds,
)
from grpo.scoring import completion_logprobs, pack_group, sequence_inputs

BUILDABLE = tiny.KERNELS_BUILDABLE


def test_logprobs_match_generation_logits_with_left_padding(lm):
    model, tokenizer = lm
    prompts = fixture_prompts(tokenizer, 3)
    cfg = generation_config(max_new_tokens=6, eos_ids=[2], pad_id=2)
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert enc["attention_mask"].min() == 0, "prompts must differ in length for this test"
    out = model.generate(
        **enc, generation_config=cfg, output_logits=True, return_dict_in_generate=True
    )
    completion = out.sequences[:, enc["input_ids"].shape[1] :]  # (N, T)
    expected = torch.stack(
        [
            torch.log_softmax(step.float(), -1).gather(-1, completion[:, t : t + 1]).squeeze(-1)
            for t, step in enumerate(out.logits)
        ],
        dim=1,
    )  # (N, T)
    for chunk in (1, 2, 8):
        got = completion_logprobs(
            model, enc["input_ids"], enc["attention_mask"], completion, chunk_size=chunk
        )
        mask = completion_mask(completion, [2]).bool()
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-4, rtol=1e-4)


def _reference_logprobs(model, prompt_ids, prompt_mask, completion_ids):
    """The straightforward version: one sequence per row, full logits, log_softmax, gather."""
    input_ids, attention, positions = sequence_inputs(prompt_ids, prompt_mask, completion_ids)
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    T = completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, -T - 1 : -1].float(), dim=-1)  # (N, T, V)
    return logp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)


def test_packed_logprobs_and_gradients_match_one_sequence_per_row(lm):
    """Rows sharing a prompt are scored packed (prompt once per group): same log-probs, loss and
    gradients as scoring every row alone, for any chunking, including groups split by chunks,
    with every slot T long or (given the completion mask) as long as its own completion."""
    model, tokenizer = lm
    assert model.config._attn_implementation in ("sdpa", packed_attention.NAME)  # packed path
    cfg = generation_config(max_new_tokens=8, eos_ids=[2, *range(5, 200, 9)], pad_id=2)
    gen = generate(
        model,
        tokenizer,
        fixture_prompts(tokenizer, 3),
        cfg,
        sampling=Sampling(temperature=1.0),
        seeds=row_seeds(1, 0, range(9)),
        num_return_sequences=3,
    )
    assert gen.prompt_mask.min() == 0 and len(set(gen.num_tokens)) > 1
    assert min(gen.num_tokens) < gen.completion_ids.shape[1]  # trimming a chunk of 1 row bites
    args = (gen.prompt_ids, gen.prompt_mask, gen.completion_ids)
    advantages = torch.linspace(-1, 1, 9)
    mask = gen.completion_mask

    def loss_and_grads(logp_fn):
        model.zero_grad()
        logp = logp_fn()
        out = grpo_loss(logp, None, logp.detach() - 0.1, advantages, mask, beta=0.04, epsilon=0.2)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return logp.detach(), out.loss.detach(), grads

    ref_logp, ref_loss, ref_grads = loss_and_grads(lambda: _reference_logprobs(model, *args))
    for chunk, trim in [(c, False) for c in (1, 2, 3, 4, 9)] + [(c, True) for c in (1, 3, 4, 9)]:
        kw = {"chunk_size": chunk, "completion_mask": mask if trim else None}  # trim: per row
        logp, loss, grads = loss_and_grads(lambda kw=kw: completion_logprobs(model, *args, **kw))
        if trim:
            assert (logp[~mask.bool()] == 0).all()
        torch.testing.assert_close(logp[mask.bool()], ref_logp[mask.bool()], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    model.zero_grad()


def test_pack_group_shares_one_prompt_per_group():
    prompt_ids = torch.tensor([[0, 7, 8], [0, 7, 8], [5, 6, 9]])  # rows 0 and 1 share a prompt
    prompt_mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1]])
    completion_ids = torch.tensor([[11, 12], [13, 14], [15, 16]])
    pk = pack_group(prompt_ids, prompt_mask, completion_ids)
    assert pk.input_ids.tolist() == [[0, 7, 8, 11, 12, 13, 14], [5, 6, 9, 15, 16, 0, 0]]
    assert pk.positions[0].tolist() == [0, 0, 1, 2, 3, 2, 3]  # both slots continue the prompt
    assert pk.group.tolist() == [0, 0, 1]
    assert pk.keep.tolist() == [2, 3, 2, 5, 2, 3]  # sequence 0's kept positions, then 1's
    assert pk.row_keep.tolist() == [[0, 1], [2, 3], [4, 5]] and pk.valid.all()
    seen = pk.attention[0, 0]  # (L, L) [query, key]
    assert seen[5].tolist() == [False, True, True, False, False, True, False]  # slot 1 token 0
    assert not seen[4, 5] and seen[4, 3]  # slots never see each other
    assert pk.layout == (3, (((3, 2), (5, 2)), ((3, 2),)))
    assert not pk.attention[1, 0, :5, 5:].any()  # no real position attends to padding

    ragged = pack_group(prompt_ids, prompt_mask, completion_ids, lengths=[1, 2, 2])
    assert ragged.input_ids.tolist() == [[0, 7, 8, 11, 13, 14], [5, 6, 9, 15, 16, 0]]
    assert ragged.positions[0].tolist() == [0, 0, 1, 2, 2, 3]
    assert ragged.keep.tolist() == [2, 2, 4, 2, 3]
    assert ragged.row_keep.tolist() == [[0, 0], [1, 2], [3, 4]]
    assert ragged.valid.tolist() == [[True, False], [True, True], [True, True]]
    assert ragged.layout == (3, (((3, 1), (4, 2)), ((3, 2),)))
    assert ragged.attention[0, 0, 5].tolist() == [False, True, True, False, True, True]
