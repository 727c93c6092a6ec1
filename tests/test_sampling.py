"""Seeded sampling: SplitMix64 streams, Gumbel-max (C kernel and torch), top-k / top-p."""

from __future__ import annotations

import pytest
import tiny
import torch
from tiny import fixture_prompts

from grpo import kernels
from grpo.generation import (
    generate,
    generation_config,
)
from grpo.sampling import (
    Sampling,
    SeededSampler,
    gumbel_argmax,
    row_seeds,
    stream_uniforms,
)

BUILDABLE = tiny.KERNELS_BUILDABLE


def test_seeded_sampler_draws_from_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # (1, V)
    for temperature in (1.0, 0.5):
        sampler = SeededSampler(Sampling(temperature=temperature), [123])
        draws = torch.stack([sampler(None, logits).argmax(-1) for _ in range(4000)])
        freq = torch.bincount(draws.flatten(), minlength=4).float() / 4000
        expected = torch.softmax(logits[0] / temperature, -1)
        assert torch.allclose(freq, expected, atol=0.03), (freq, expected)


def test_stream_uniforms_are_splitmix64():
    """torch's int64 arithmetic reproduces SplitMix64 (checked with Python's exact integers)."""
    mask = (1 << 64) - 1

    def splitmix(seed, index):
        z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return ((z ^ (z >> 31)) >> 40) / 2**24

    seeds = row_seeds(3, 1, range(4))
    offsets = [0, 5, 2**40, 7]
    got = stream_uniforms(torch.tensor(seeds), torch.tensor(offsets), 6)  # (4, 6)
    want = [[splitmix(s, o + j) for j in range(6)] for s, o in zip(seeds, offsets, strict=True)]
    assert got.tolist() == want
    many = stream_uniforms(torch.tensor(seeds[:1]), torch.tensor([0]), 100_000)[0]
    assert many.min() >= 0 and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.005


def test_gumbel_kernel_and_torch_pick_the_same_tokens_never_a_masked_one(monkeypatch):
    """The fused Gumbel-max of the C kernel and its torch fallback pick the same tokens, none
    with logit -inf, also with a single finite logit and with a vocabulary that is no multiple
    of the vector width. The statistics of the draws are checked by the next test (it runs
    the kernel where it is built)."""
    if not BUILDABLE:
        pytest.skip("the C kernels need x86-64 with AVX2 and a C compiler")
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 1001, generator=generator)  # (n, V)
    logits[::2, ::3] = float("-inf")
    logits[5] = float("-inf")
    logits[5, 777] = 0.0  # one token holds all the mass
    seeds = torch.tensor(row_seeds(0, 0, range(64)))  # (n,)
    for temperature, offset in ((1.0, 0), (0.7, 3 * 1001)):
        offsets = torch.full((64,), offset)
        fast = gumbel_argmax(logits, temperature, seeds, offsets)
        with monkeypatch.context() as patch:
            patch.setattr("grpo.sampling.library", lambda: None)
            slow = gumbel_argmax(logits, temperature, seeds, offsets)
        assert torch.equal(fast, slow), (fast != slow).nonzero()
        assert torch.isfinite(logits.gather(1, fast[:, None])).all()
        assert fast[5] == 777
    assert kernels.library() is not None


def test_gumbel_fallback_draws_on_the_logits_device_from_any_dtype(monkeypatch):
    """The torch fallback computes the noise where the logits are (only the (n,) seeds and
    offsets travel there, never (n, V) uniforms) and picks from bf16 or fp64 logits the tokens
    it picks from their fp32 values."""
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(8, 1001, generator=generator).bfloat16().float()  # (n, V)
    seeds = torch.tensor(row_seeds(2, 0, range(8)))  # (n,)
    offsets = torch.arange(8) * 1001  # (n,)
    monkeypatch.setattr("grpo.sampling.library", lambda: None)
    want = gumbel_argmax(logits, 0.7, seeds, offsets)
    for dtype in (torch.bfloat16, torch.float64):
        assert torch.equal(gumbel_argmax(logits.to(dtype), 0.7, seeds, offsets), want)
    devices = []
    stream = stream_uniforms
    monkeypatch.setattr(
        "grpo.sampling.stream_uniforms",
        lambda s, o, count: devices.append((s.device, o.device)) or stream(s, o, count),
    )
    got = gumbel_argmax(logits.to("meta"), 0.7, seeds, offsets)  # a device holding no values
    assert got.device.type == "meta" and got.shape == (8,)
    assert devices == [(torch.device("meta"), torch.device("meta"))]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gumbel_on_cuda_picks_the_tokens_of_the_cpu():
    """The noise stream on CUDA equals the CPU's bit for bit, and so do the sampled tokens."""
    generator = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(32, 4099, generator=generator)  # (n, V)
    seeds = torch.tensor(row_seeds(4, 1, range(32)))  # (n,)
    offsets = torch.arange(32) * 4099 + 2**40  # (n,)
    cuda = torch.device("cuda")
    on_cuda = stream_uniforms(seeds.to(cuda), offsets.to(cuda), 4099)
    assert torch.equal(on_cuda.cpu(), stream_uniforms(seeds, offsets, 4099))
    got = gumbel_argmax(logits.to(cuda), 0.9, seeds, offsets)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), gumbel_argmax(logits, 0.9, seeds, offsets))


def test_seeded_sampler_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top_k = SeededSampler(Sampling(1.0, top_k=2), [1])
    assert {int(top_k(None, logits).argmax()) for _ in range(300)} == {0, 1}
    top_p = SeededSampler(Sampling(1.0, top_p=0.5), [1])  # p(0) = 0.64 > 0.5 -> only token 0
    assert {int(top_p(None, logits).argmax()) for _ in range(300)} == {0}


def test_sampling_is_independent_of_batch_composition(lm):
    model, tokenizer = lm
    prompts = fixture_prompts(tokenizer, 3)
    cfg = generation_config(max_new_tokens=6, eos_ids=[2], pad_id=2)
    sampling = Sampling(temperature=1.0)
    seeds = row_seeds(7, 1, range(6))
    together = generate(
        model, tokenizer, prompts, cfg, sampling=sampling, seeds=seeds, num_return_sequences=2
    )
    alone = generate(
        model,
        tokenizer,
        prompts[2:],
        cfg,
        sampling=sampling,
        seeds=seeds[4:],
        num_return_sequences=2,
    )
    assert together.texts[4:] == alone.texts
    assert together.texts[4] != together.texts[5] or together.texts[0] != together.texts[1]
