"""Generation on a tiny random model: masks, stopping, the lean and HF decoders agree."""

from __future__ import annotations

import warnings

import pytest
import tiny
import torch
from tiny import attentive, fixture_prompts

from grpo.decoding import decode, llama
from grpo.generation import (
    completion_mask,
    generate,
    generation_config,
    truncate_at_answer,
)
from grpo.sampling import (
    Sampling,
    SeededSampler,
    greedy_choice,
    row_seeds,
)

BUILDABLE = tiny.KERNELS_BUILDABLE


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
    enc = tokenizer(fixture_prompts(tokenizer, 1), return_tensors="pt")
    out = model.generate(
        **enc,
        generation_config=cfg,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for scores, logits in zip(out.scores, out.logits, strict=True):
        torch.testing.assert_close(scores, logits)  # no top-k/top-p/penalty processing


@pytest.mark.parametrize("decoder", ["hf", "lean"])
def test_generate_groups_and_masks(lm, decoder):
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
        fixture_prompts(tokenizer, 3),
        cfg,
        sampling=Sampling(temperature=1.0),
        seeds=row_seeds(0, 0, range(12)),
        num_return_sequences=4,
        decoder=decoder,
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
    from grpo.generation import Generated

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
    model = attentive(tiny.build_model(tokenizer, arch=arch)).eval()
    assert llama.supported(model)
    if path == "any-architecture":
        monkeypatch.setattr(llama, "supported", lambda m: False)
    if path == "llama-torch-step":
        monkeypatch.setattr(llama, "fused_applies", lambda model, mask: False)
    elif path != "any-architecture":
        assert llama.fused_applies(model, torch.ones(1, 1)) == BUILDABLE
    drops = []
    if path == "llama-4-columns":  # the llama step's drop rule with blocks of 4 columns
        steps = llama.SharedPrefixSteps
        monkeypatch.setattr(
            steps, "should_drop", lambda self, live, held: -(-live // 4) < -(-held // 4)
        )
        keep_rows = steps.drop
        monkeypatch.setattr(
            steps,
            "drop",
            lambda self, keep: drops.append(len(keep)) or keep_rows(self, keep),
        )
    prompts = fixture_prompts(tokenizer, 3)
    vocab = model.config.vocab_size
    eos = [2, *range(5, vocab, 7)]  # many EOS ids, so rows finish at different steps
    if temperature == 0:
        eos = [2]  # greedy rows would all end at once on one of many
    cfg = generation_config(max_new_tokens=12, eos_ids=eos, pad_id=2)
    sampling = Sampling(temperature=temperature)
    seeds = row_seeds(3, 0, range(12)) if temperature > 0 else None
    runs = {
        decoder: generate(
            model,
            tokenizer,
            prompts,
            cfg,
            sampling=sampling,
            seeds=seeds,
            num_return_sequences=4,
            decoder=decoder,
        )
        for decoder in ("hf", "lean")
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
    model = attentive(tiny.build_model(tokenizer)).eval()
    cfg = generation_config(max_new_tokens=12, eos_ids=[2], pad_id=2)
    seeds = row_seeds(3, 0, range(12)) if temperature > 0 else None

    def texts():
        prompts, sampling = fixture_prompts(tokenizer, 3), Sampling(temperature=temperature)
        kw = {"sampling": sampling, "seeds": seeds, "num_return_sequences": 4, "decoder": "hf"}
        return generate(model, tokenizer, prompts, cfg, **kw).texts

    normal = texts()
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    changed = sum(a != b for a, b in zip(normal, texts(), strict=True))
    assert changed >= 9, changed


def test_lean_decode_refuses_what_only_hf_supports(lm):
    model, tokenizer = lm
    cfg = generation_config(max_new_tokens=2, eos_ids=[2], pad_id=2, stop_strings=["</answer>"])
    with pytest.raises(ValueError, match="stop strings"):
        generate(model, tokenizer, fixture_prompts(tokenizer, 1), cfg, decoder="lean")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_lean_decode_waits_for_the_gpu_once_per_step(lm, temperature):
    """On CUDA, each decode step synchronizes with the device once (the copy of its sampled
    tokens to the host): sampling noise, row bookkeeping and the next step's inputs never wait
    for it. Counted with torch's sync debug mode, as the difference between 9 and 5 steps."""
    _, tokenizer = lm
    model = tiny.build_model(tokenizer, seed=1, arch="qwen2").eval().cuda()
    enc = tokenizer(
        fixture_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left"
    )
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
