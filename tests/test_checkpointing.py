"""Gradient checkpointing gives the scoring forward's log-probs and gradients unchanged.

Every GPU preset trains with `train.gradient_checkpointing`: the backward recomputes each
decoder layer, which must attend exactly as the forward did (packed groups under SDPA, one
sequence per row otherwise), also through DDP/FSDP wrappers and torch.compile.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

import grpo
from grpo.packed_attention import NAME
from grpo.scoring import completion_logprobs


def _batch(vocab: int):
    """4 rows, two groups of 2 sharing a prompt (one left-padded), one completion shorter."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (2, 6), generator=g)  # (2, P)
    prompt_ids = prompts.repeat_interleave(2, dim=0)  # (4, P)
    prompt_mask = torch.ones_like(prompt_ids)  # (4, P)
    prompt_mask[:2, :2] = 0
    completion_ids = torch.randint(3, vocab, (4, 5), generator=g)  # (4, T)
    completion_mask = torch.ones_like(completion_ids)  # (4, T)
    completion_mask[1, 3:] = 0
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _scored(model, batch, checkpointing: bool, **kw):
    """Log-probs (masked) and every parameter's gradient of their sum, model in train mode."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    model.zero_grad()
    prompt_ids, prompt_mask, completion_ids, mask = batch
    logp = completion_logprobs(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask=mask, **kw
    )  # (N, T)
    (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
    return logp.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(model, batch, **kw):
    logp, grads = _scored(model, batch, checkpointing=False, **kw)
    logp_ckpt, grads_ckpt = _scored(model, batch, checkpointing=True, **kw)
    torch.testing.assert_close(logp_ckpt, logp, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter took part


@pytest.mark.parametrize("attention", ["sdpa", "eager"], ids=["packed", "one-row-each"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checkpointing_keeps_logprobs_and_gradients(arch, attention):
    """Packed groups (SDPA) and one sequence per row (eager, as flash-attention models score):
    the same log-probs and gradients with checkpointing as without, in either order."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, arch=arch, attn_implementation=attention)
    batch = _batch(len(tokenizer))
    _assert_same(model, batch, chunk_size=4)
    want = NAME if attention == "sdpa" else "eager"
    assert model.config._attn_implementation == want  # the packed path ran
    fresh = tiny.build_model(tokenizer, arch=arch, attn_implementation=attention)
    logp_ckpt, grads_ckpt = _scored(fresh, batch, checkpointing=True, chunk_size=2)
    logp, grads = _scored(fresh, batch, checkpointing=False, chunk_size=2)  # checkpointed first
    torch.testing.assert_close(logp_ckpt, logp, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


def test_checkpointing_under_torch_compile():
    """The compiled training forward (`train.torch_compile`) recomputes the packed attention."""
    tokenizer = tiny.build_tokenizer()
    model = tiny.build_model(tokenizer, arch="qwen2")
    batch = _batch(len(tokenizer))
    logp, grads = _scored(model, batch, checkpointing=False)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    logp_ckpt, grads_ckpt = _scored(compiled, batch, checkpointing=True)
    torch.testing.assert_close(logp_ckpt, logp, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-5)


def _wrapped_worker(strategy: str) -> None:
    """One gloo process: the model under DDP or FSDP2 (`grpo.distributed.wrap` leaves one
    process unwrapped, so wrapped here), checkpointed, scores the packed batch with the plain
    model's log-probs and gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    try:
        tokenizer = tiny.build_tokenizer()
        batch = _batch(len(tokenizer))
        logp, grads = _scored(tiny.build_model(tokenizer, arch="qwen2"), batch, False)
        model = tiny.build_model(tokenizer, arch="qwen2")
        model.gradient_checkpointing_enable()
        if strategy == "ddp":
            engine = DistributedDataParallel(model)
        else:
            mesh = init_device_mesh("cpu", (1,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            engine = fully_shard(model, mesh=mesh)
        engine.train()
        prompt_ids, prompt_mask, completion_ids, mask = batch
        got = completion_logprobs(
            engine, prompt_ids, prompt_mask, completion_ids, completion_mask=mask
        )  # (N, T)
        (got * torch.linspace(-1, 1, got.numel()).view_as(got)).sum().backward()
        torch.testing.assert_close(got.detach(), logp, atol=1e-6, rtol=1e-5)
        for p, want in zip(model.parameters(), grads, strict=True):
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(grad, want, atol=1e-7, rtol=1e-5)
        assert model.config._attn_implementation == NAME
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpointing_through_ddp_and_fsdp(strategy, tmp_path):
    """One gloo process: DDP and FSDP2 wrappers score with checkpointing unchanged."""
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29600 + os.getpid() % 1000 + (strategy == "fsdp")),
        "OMP_NUM_THREADS": "1",
    }
    # the child imports the grpo this process imported, and this module
    path = [str(Path(__file__).parent), str(Path(grpo.__file__).parents[1])]
    env["PYTHONPATH"] = os.pathsep.join(path)
    code = f"import test_checkpointing as t; t._wrapped_worker({strategy!r})"
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
