"""Generation, masks and log-probs on a tiny random model."""

from __future__ import annotations

import warnings

import pytest
import tiny
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from grpo import kernels, llama_step, packed_attention, rollout, skinny_gemm
from grpo.decode import SMALL_BATCH, decode, few_rows_linears
from grpo.loss import grpo_loss
from grpo.rollout import (
    Sampling,
    SeededSampler,
    chat_prompt,
    completion_logprobs,
    completion_mask,
    generate,
    generation_config,
    greedy_choice,
    gumbel_argmax,
    pack_group,
    row_seeds,
    sequence_inputs,
    stream_uniforms,
    truncate_at_answer,
)

SYSTEM = "Respond in the following format"
BUILDABLE = tiny.KERNELS_BUILDABLE


@pytest.fixture(scope="module")
def lm():
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer).eval()
    return model, tokenizer


def _attentive(model):
    """`model` with embeddings x5 and attention weights x10: at HF's initialization the logits
    are so flat and the attention output so small that zeroing attention changes no token, so
    a token comparison could not notice broken attention."""
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5)
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.mul_(10)
    return model


def _prompts(tokenizer, n=3):
    questions = [q for q, _ in tiny.GSM8K_ROWS["train"][:n]]
    return [chat_prompt(tokenizer, q, SYSTEM) for q in questions]


def test_completion_mask_includes_first_eos_and_nothing_after():
    ids = torch.tensor([[7, 2, 9, 2], [2, 5, 5, 5], [4, 4, 4, 4]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert completion_mask(ids, [9, 4]).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_model_sampling_defaults_do_not_leak(lm):
    model, tokenizer = lm
    model.generation_config.top_k = 3
    model.generation_config.top_p = 0.5
    model.generation_config.repetition_penalty = 1.5
    cfg = generation_config(max_new_tokens=4, eos_ids=[2], pad_id=2)
    enc = tokenizer(_prompts(tokenizer, 1), return_tensors="pt")
    out = model.generate(
        **enc,
        generation_config=cfg,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for scores, logits in zip(out.scores, out.logits, strict=True):
        torch.testing.assert_close(scores, logits)  # no top-k/top-p/penalty processing


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
    """The fused Gumbel-max of grpo/rollout.c and its torch fallback pick the same tokens, none
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
            patch.setattr("grpo.rollout.library", lambda: None)
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
    monkeypatch.setattr("grpo.rollout.library", lambda: None)
    want = gumbel_argmax(logits, 0.7, seeds, offsets)
    for dtype in (torch.bfloat16, torch.float64):
        assert torch.equal(gumbel_argmax(logits.to(dtype), 0.7, seeds, offsets), want)
    devices = []
    stream = rollout.stream_uniforms
    monkeypatch.setattr(
        rollout,
        "stream_uniforms",
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
    prompts = _prompts(tokenizer, 3)
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


def test_logprobs_match_generation_logits_with_left_padding(lm):
    model, tokenizer = lm
    prompts = _prompts(tokenizer, 3)
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


@pytest.mark.parametrize("engine", ["hf", "lean"])
def test_generate_groups_and_masks(lm, engine):
    """The mask is 1 up to and including a row's first EOS and 0 after it (all 1 without EOS),
    checked against the tokens themselves on rows that end with EOS early, late, at once
    (EOS-only) and never (truncated)."""
    model, tokenizer = lm
    eos = [2, *range(5, model.config.vocab_size, 3)]  # a third of the vocabulary ends a row
    pad = 0  # no EOS: padding after a row's EOS stays visible as such
    cfg = generation_config(max_new_tokens=6, eos_ids=eos, pad_id=pad)
    gen = generate(
        model,
        tokenizer,
        _prompts(tokenizer, 3),
        cfg,
        sampling=Sampling(temperature=1.0),
        seeds=row_seeds(0, 0, range(12)),
        num_return_sequences=4,
        engine=engine,
    )
    assert gen.completion_ids.shape == (12, 6)
    assert torch.equal(gen.prompt_ids[0], gen.prompt_ids[3])  # a prompt's G rows are consecutive
    assert not torch.equal(gen.prompt_ids[3], gen.prompt_ids[4])
    firsts = []
    for row, ids in enumerate(gen.completion_ids.tolist()):
        first = next((t for t, token in enumerate(ids) if token in eos), None)
        firsts.append(first)
        length = len(ids) if first is None else first + 1
        assert gen.completion_mask[row].tolist() == [1] * length + [0] * (len(ids) - length)
        assert ids[length:] == [pad] * (len(ids) - length)
        assert gen.num_tokens[row] == length
        assert gen.truncated[row] == (first is None)
    assert None in firsts and 0 in firsts, firsts  # truncated and EOS-only rows
    assert len({f for f in firsts if f is not None}) > 2, firsts  # EOS at varied positions
    assert not model.training


def test_truncate_at_answer_cuts_after_closing_tag():
    tokenizer = tiny.build_tokenizer()
    text = "<reasoning>\n7\n</reasoning>\n<answer>\n7\n</answer> and then more"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])  # (1, T)
    from grpo.rollout import Generated

    gen = Generated(
        prompt_ids=torch.zeros((1, 1), dtype=torch.long),
        prompt_mask=torch.ones((1, 1), dtype=torch.long),
        completion_ids=ids,
        completion_mask=torch.ones_like(ids),
        truncated=[True],
        texts=[text],
        num_tokens=[ids.shape[1]],
    )
    cut = truncate_at_answer(gen, tokenizer)
    assert cut.texts[0].endswith("</answer>")
    assert cut.num_tokens[0] < ids.shape[1]
    assert cut.completion_mask.sum().item() == cut.num_tokens[0]
    assert cut.truncated == [False]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "path", ["llama", "llama-4-columns", "qwen2", "llama-torch-step", "any-architecture"]
)
def test_lean_decode_gives_the_tokens_of_hf_generate(lm, temperature, path, monkeypatch):
    """Prefill once per prompt, shared-prefix or in-place KV cache, finished rows dropped: the
    same tokens as HF generate, on the llama/qwen2 step (its C kernel, or plain torch where the
    kernel is not built: "llama-torch-step") and the generic path.

    The llama step drops finished rows when the live ones fit in fewer column blocks: with 12
    rows and blocks of 16 it never does, with blocks of 4 it drops them midway."""
    _, tokenizer = lm
    arch = "qwen2" if path == "qwen2" else "llama"
    model = _attentive(tiny.build_model(tokenizer, arch=arch)).eval()
    assert llama_step.supported(model)
    if path == "any-architecture":
        monkeypatch.setattr(llama_step, "supported", lambda m: False)
    if path == "llama-torch-step":
        monkeypatch.setattr(llama_step, "fused_applies", lambda model, mask: False)
    elif path != "any-architecture":
        assert llama_step.fused_applies(model, torch.ones(1, 1)) == BUILDABLE
    drops = []
    if path == "llama-4-columns":
        monkeypatch.setattr(llama_step, "COLUMN_BLOCK", 4)
        keep_rows = llama_step.SharedPrefixSteps.drop
        monkeypatch.setattr(
            llama_step.SharedPrefixSteps,
            "drop",
            lambda self, keep: drops.append(len(keep)) or keep_rows(self, keep),
        )
    prompts = _prompts(tokenizer, 3)
    vocab = model.config.vocab_size
    eos = [2, *range(5, vocab, 7)]  # many EOS ids, so rows finish at different steps
    if temperature == 0:
        eos = [2]  # greedy rows would all end at once on one of many
    cfg = generation_config(max_new_tokens=12, eos_ids=eos, pad_id=2)
    sampling = Sampling(temperature=temperature)
    seeds = row_seeds(3, 0, range(12)) if temperature > 0 else None
    runs = {
        engine: generate(
            model,
            tokenizer,
            prompts,
            cfg,
            sampling=sampling,
            seeds=seeds,
            num_return_sequences=4,
            engine=engine,
        )
        for engine in ("hf", "lean")
    }
    hf, lean = runs["hf"], runs["lean"]
    assert torch.equal(lean.completion_ids, hf.completion_ids)
    assert torch.equal(lean.completion_mask, hf.completion_mask)
    assert torch.equal(lean.prompt_ids, hf.prompt_ids)
    assert lean.texts == hf.texts and lean.truncated == hf.truncated
    assert max(lean.num_tokens) == 12  # the decode steps ran, not only the prefill
    if temperature > 0:  # the comparison covered early and late finishers
        assert len(set(lean.num_tokens)) > 2 and max(lean.num_tokens) == 12, lean.num_tokens
        if path == "llama-4-columns":
            assert drops and drops == sorted(drops, reverse=True), drops  # rows left midway


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_attentive_model_tokens_depend_on_attention(lm, temperature):
    """The model of the token comparison above: with attention's output zeroed most rows get
    other tokens, so a decode that breaks attention cannot give HF generate's tokens."""
    _, tokenizer = lm
    model = _attentive(tiny.build_model(tokenizer)).eval()
    cfg = generation_config(max_new_tokens=12, eos_ids=[2], pad_id=2)
    seeds = row_seeds(3, 0, range(12)) if temperature > 0 else None

    def texts():
        prompts, sampling = _prompts(tokenizer, 3), Sampling(temperature=temperature)
        kw = {"sampling": sampling, "seeds": seeds, "num_return_sequences": 4, "engine": "hf"}
        return generate(model, tokenizer, prompts, cfg, **kw).texts

    normal = texts()
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    changed = sum(a != b for a, b in zip(normal, texts(), strict=True))
    assert changed >= 9, changed


@pytest.mark.parametrize("kernel", [True, False], ids=["C-kernel", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-biases"])
def test_llama_step_logits_equal_the_full_forward(lm, arch, kernel, monkeypatch):
    """Teacher-forced steps over the shared-prefix cache, rows dropped midway: each step's
    logits equal those of the HF forward over the whole sequence (prompt + tokens so far), with
    the layers in grpo/llama_step.c and in plain torch. Covers q/k/v biases (qwen2) and biases
    on every projection (llama with attention_bias and mlp_bias), which the step's stacked
    q/k/v and gate/up GEMMs carry, and left-padded prompts of different lengths."""
    if kernel and not BUILDABLE:
        pytest.skip("the C kernels need x86-64 with AVX2 and a C compiler")
    if not kernel:
        monkeypatch.setattr(llama_step, "fused_applies", lambda model, mask: False)
    _, tokenizer = lm
    if arch == "llama-biases":
        model = tiny.build_model(tokenizer, seed=1, attention_bias=True, mlp_bias=True).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias)  # HF initializes them to zero
    else:
        model = tiny.build_model(tokenizer, seed=1, arch=arch).eval()
    enc = tokenizer(_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left")
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    B, G, steps = prompt_ids.shape[0], 3, 6
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    keys, values, first = llama_step.prefill(model, prompt_ids, prompt_mask)  # packed prompts
    with torch.no_grad():
        padded = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions)
    torch.testing.assert_close(first, padded.logits[:, -1], rtol=1e-4, atol=1e-5)
    state = llama_step.SharedPrefixSteps(model, keys, values, prompt_mask, G, steps)
    assert state.kernel == kernel
    assert len(set(prompt_mask.sum(dim=1).tolist())) > 1  # prompts of different lengths
    fed = torch.randint(3, model.config.vocab_size, (B * G, steps))  # (N, steps)
    alive = torch.arange(B * G)
    for t in range(steps):
        if t == 2:  # rows 1, 4 and 5 finish: groups lose one, two and no rows
            keep = torch.tensor([i for i, r in enumerate(alive.tolist()) if r not in (1, 4, 5)])
            state.drop(keep)
            alive = alive[keep]
        position = positions[alive // G, -1] + 1 + t
        logits = state.step(fed[alive, t], position)  # (n, V)
        ids, mask, pos = sequence_inputs(
            prompt_ids[alive // G], prompt_mask[alive // G], fed[alive, : t + 1]
        )
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)


class _Casts(TorchDispatchMode):
    """Records the shape of every tensor cast to another dtype (autocast's casts included)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "dtype" in kwargs:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def test_llama_step_casts_its_weights_once_per_decode_under_autocast(lm, monkeypatch):
    """Under bf16 autocast the steps' weights (stacked q/k/v and gate/up, o, down, head) are
    cast once, when the decode state is built, and every GEMM runs in bf16: no step casts a
    weight again. The logits stay as close to the HF forward under the same autocast as
    bf16 allows (the C kernels, fp32 only, stand aside; the GEMMs are torch.mm, as on GPUs)."""
    monkeypatch.setattr(skinny_gemm, "applies", lambda weight, xt: False)
    _, tokenizer = lm
    model = tiny.build_model(tokenizer, seed=1, arch="qwen2").eval()
    enc = tokenizer(_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left")
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    B, G, steps = prompt_ids.shape[0], 3, 4
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    fed = torch.randint(3, model.config.vocab_size, (B * G, steps))  # (N, steps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys, values, _ = llama_step.prefill(model, prompt_ids, prompt_mask)
        state = llama_step.SharedPrefixSteps(model, keys, values, prompt_mask, G, steps)
        assert not state.kernel and state.dtype == torch.bfloat16
        fused = state.fused[0]
        cast = (fused.qkv, fused.qkv_bias, fused.gate_up, fused.o, fused.down, state.head)
        assert all(tensor.dtype == torch.bfloat16 for tensor in cast)
        weights = {tuple(p.shape) for p in [*model.parameters(), *cast] if p.dim() == 2}
        for t in range(steps):
            position = positions.repeat_interleave(G, dim=0)[:, -1] + 1 + t
            with _Casts() as casts:
                logits = state.step(fed[:, t], position)  # (N, V)
            assert not [shape for shape in casts.shapes if shape in weights], casts.shapes
            ids, mask, pos = sequence_inputs(
                prompt_ids.repeat_interleave(G, dim=0),
                prompt_mask.repeat_interleave(G, dim=0),
                fed[:, : t + 1],
            )
            with torch.no_grad():
                full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            torch.testing.assert_close(logits.float(), full.float(), rtol=0.01, atol=0.004)


@pytest.mark.parametrize("budget", [1, 60, 2048], ids=["one-per-call", "some-per-call", "all"])
def test_prefill_packs_prompts_into_the_kv_of_the_padded_batch(lm, budget, monkeypatch):
    """Packed prefill (real tokens back to back, in calls of up to PREFILL_TOKENS) gives the
    padded batch's next-token logits and, on every real position, its keys and values."""
    model, tokenizer = lm
    monkeypatch.setattr(llama_step, "PREFILL_TOKENS", budget)
    enc = tokenizer(_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left")
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    keys, values, logits = llama_step.prefill(model, prompt_ids, prompt_mask)
    cache = DynamicCache(config=model.config)
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            past_key_values=cache,
        )
    torch.testing.assert_close(logits, padded.logits[:, -1], rtol=1e-4, atol=1e-5)
    real = prompt_mask.bool()[:, None, :, None]  # (B, 1, P, 1)
    for mine, theirs in zip(
        keys + values,
        [c.keys for c in cache.layers] + [c.values for c in cache.layers],
        strict=True,
    ):
        torch.testing.assert_close(mine, torch.where(real, theirs, 0.0), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_lean_decode_waits_for_the_gpu_once_per_step(lm, temperature):
    """On CUDA, each decode step synchronizes with the device once (the copy of its sampled
    tokens to the host): sampling noise, row bookkeeping and the next step's inputs never wait
    for it. Counted with torch's sync debug mode, as the difference between 9 and 5 steps."""
    _, tokenizer = lm
    model = tiny.build_model(tokenizer, seed=1, arch="qwen2").eval().cuda()
    enc = tokenizer(_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left")
    prompt_ids, prompt_mask = enc["input_ids"].cuda(), enc["attention_mask"].cuda()  # (B, P)
    G, never = 2, model.config.vocab_size + 1  # an EOS id no row samples: every step runs

    def syncs(steps: int) -> int:
        rows = prompt_ids.shape[0] * G
        choose = greedy_choice
        if temperature > 0:
            choose = SeededSampler(Sampling(temperature), row_seeds(0, 0, range(rows))).choose
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                tokens = decode(
                    model,
                    prompt_ids,
                    prompt_mask,
                    num_return_sequences=G,
                    max_new_tokens=steps,
                    eos_ids=[never],
                    pad_id=0,
                    choose=choose,
                )
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert tokens.shape == (rows, steps)
        return sum("synchronizing" in str(w.message) for w in caught)

    syncs(5)  # one-time initialization
    assert syncs(9) - syncs(5) == 4


def test_llama_step_supports_only_what_it_reproduces(lm):
    _, tokenizer = lm
    model = tiny.build_model(tokenizer)
    assert llama_step.supported(model)

    class Adapted(torch.nn.Linear):
        pass

    layer = model.model.layers[1].self_attn
    layer.q_proj = Adapted(layer.q_proj.in_features, layer.q_proj.out_features, bias=False)
    assert not llama_step.supported(model)  # e.g. a LoRA-wrapped projection
    model = tiny.build_model(tokenizer)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert not llama_step.supported(model)
    model.config.model_type = "gemma"
    assert not llama_step.supported(model)


def test_lean_decode_refuses_what_only_hf_supports(lm):
    model, tokenizer = lm
    cfg = generation_config(max_new_tokens=2, eos_ids=[2], pad_id=2, stop_strings=["</answer>"])
    with pytest.raises(ValueError, match="stop strings"):
        generate(model, tokenizer, _prompts(tokenizer, 1), cfg, engine="lean")


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
        _prompts(tokenizer, 3),
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
    assert pk.group.tolist() == [0, 0, 1] and pk.slot.tolist() == [0, 1, 0]
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


def test_few_rows_linears_compute_the_same_and_restore_the_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4, bias=False))
    for rows in (1, 3, SMALL_BATCH + 1):  # the weight-stationary path and the usual one
        x = torch.randn(2, rows, 8)
        want = model(x)
        with few_rows_linears(model):
            assert "forward" in vars(model[0])
            got = model(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
