"""The lean decode engine: the llama/qwen2 step against the full forward, prefill, GEMMs."""

from __future__ import annotations

import pytest
import tiny
import torch
from tiny import fixture_prompts
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from grpo.decoding import llama, packed_prefill
from grpo.decoding.hf_steps import SMALL_BATCH, few_rows_linears
from grpo.kernels import skinny_gemm
from grpo.scoring import sequence_inputs

BUILDABLE = tiny.KERNELS_BUILDABLE


@pytest.mark.parametrize("kernel", [True, False], ids=["C-kernel", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-biases"])
def test_llama_step_logits_equal_the_full_forward(lm, arch, kernel, monkeypatch):
    """Teacher-forced steps over the shared-prefix cache, rows dropped midway: each step's
    logits equal those of the HF forward over the whole sequence (prompt + tokens so far), with
    the layers in csrc/llama_step.c and in plain torch. Covers q/k/v biases (qwen2) and biases
    on every projection (llama with attention_bias and mlp_bias), which the step's stacked
    q/k/v and gate/up GEMMs carry, and left-padded prompts of different lengths."""
    if kernel and not BUILDABLE:
        pytest.skip("the C kernels need x86-64 with AVX2 and a C compiler")
    if not kernel:
        monkeypatch.setattr(llama, "fused_applies", lambda model, mask: False)
    _, tokenizer = lm
    if arch == "llama-biases":
        model = tiny.build_model(tokenizer, seed=1, attention_bias=True, mlp_bias=True).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                torch.nn.init.normal_(module.bias)  # HF initializes them to zero
    else:
        model = tiny.build_model(tokenizer, seed=1, arch=arch).eval()
    enc = tokenizer(
        fixture_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left"
    )
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    B, G, steps = prompt_ids.shape[0], 3, 6
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    keys, values, first = packed_prefill.prefill(model, prompt_ids, prompt_mask)  # packed prompts
    with torch.no_grad():
        padded = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions)
    torch.testing.assert_close(first, padded.logits[:, -1], rtol=1e-4, atol=1e-5)
    state = llama.SharedPrefixSteps(model, keys, values, prompt_mask, G, steps)
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
    enc = tokenizer(
        fixture_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left"
    )
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    B, G, steps = prompt_ids.shape[0], 3, 4
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    fed = torch.randint(3, model.config.vocab_size, (B * G, steps))  # (N, steps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys, values, _ = packed_prefill.prefill(model, prompt_ids, prompt_mask)
        state = llama.SharedPrefixSteps(model, keys, values, prompt_mask, G, steps)
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
    monkeypatch.setattr(packed_prefill, "PREFILL_TOKENS", budget)
    enc = tokenizer(
        fixture_prompts(tokenizer, 3), return_tensors="pt", padding=True, padding_side="left"
    )
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P)
    keys, values, logits = packed_prefill.prefill(model, prompt_ids, prompt_mask)
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


def test_llama_step_supports_only_what_it_reproduces(lm):
    _, tokenizer = lm
    model = tiny.build_model(tokenizer)
    assert llama.supported(model)

    class Adapted(torch.nn.Linear):
        pass

    layer = model.model.layers[1].self_attn
    layer.q_proj = Adapted(layer.q_proj.in_features, layer.q_proj.out_features, bias=False)
    assert not llama.supported(model)  # e.g. a LoRA-wrapped projection
    model = tiny.build_model(tokenizer)
    model.config.layer_types = ["full_attention", "sliding_attention"]
    assert not llama.supported(model)
    model.config.model_type = "gemma"
    assert not llama.supported(model)


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
