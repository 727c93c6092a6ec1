"""Offline fixtures of the GPU checks (`make test-gpu`, bench/gpu_rollout.py): random-init models
with the real shapes of the GPU presets' models, the presets' settings, and one GRPO step.

Nothing is downloaded: the weights are random (built from a config) and the tokenizer is
tests/tiny.py's byte-level BPE (~400 tokens). The models keep their real vocabulary (151,936
ids), so most sampled ids are ones the tokenizer does not know; decoding skips them, as Qwen's
own tokenizer does for the ids past its 151,665 tokens, so texts are short but every id is valid
for the model. `GRPO_GPU_TESTS_DEVICE=cpu` runs the same code on the CPU with tiny shapes (same
architecture, a few layers, a 1,024-id vocabulary) and short completions, to smoke-test it.

Run as a script it is the worker of one preset's GRPO step (one process, or one rank under
`grpo.launch`), writing its measurements as JSON:

    python tests/gpu_fixtures.py --preset seed-qwen2.5-1.5b --out result.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import tiny
import torch
from test_trainer import LengthReward
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from grpo import config, distributed, model, preset
from grpo.config import Params
from grpo.device import autocast
from grpo.trainer import GRPOTrainer

DEVICE_ENV = "GRPO_GPU_TESTS_DEVICE"
"""`cpu` = run the GPU checks on the CPU with tiny shapes (a smoke test of the code paths)."""

QWEN25 = {
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "max_window_layers": 21,
}
"""What Qwen2.5-0.5B and 1.5B-Instruct's config.json share (their weights are published in bf16)."""

SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        **QWEN25,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
    },
    "Qwen/Qwen2.5-1.5B-Instruct": {
        **QWEN25,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
    },
}
"""The real shape of each GPU preset's model (the official config.json values)."""

PARAMETERS = {
    "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304,
}
"""Parameter counts of the official checkpoints: a check that SHAPES is the real shape."""

TINY = {
    "Qwen/Qwen2.5-0.5B-Instruct": {"hidden_size": 112, "num_attention_heads": 14},
    "Qwen/Qwen2.5-1.5B-Instruct": {"hidden_size": 96, "num_attention_heads": 12},
}
"""CPU smoke shapes: the real head counts (head dim 8), 2 layers, a 1,024-id vocabulary (more
ids than the tokenizer knows, as at the real size)."""

TINY_COMMON = {
    "vocab_size": 1024,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    # at the real 0.02 a model this narrow attends almost uniformly: positions would not
    # matter, and a decode loop with wrong positions would still match generate
    "initializer_range": 0.2,
}

TINY_TOKENS = 24
"""Completion / evaluation token cap of the CPU smoke run (the presets' 400 on a GPU)."""


def smoke() -> bool:
    """True when the checks run on the CPU with tiny shapes (`GRPO_GPU_TESTS_DEVICE=cpu`)."""
    return os.environ.get(DEVICE_ENV, "").lower() == "cpu"


def gpu_presets() -> list[str]:
    """The presets whose model has a known shape (every GPU preset)."""
    return [name for name in preset.names() if preset_params(name).model.name in SHAPES]


def preset_params(name: str) -> Params:
    """The effective params of a preset: the repository's params.yaml with its overlay."""
    merged = preset.merge(config.default_params_dict(), preset.load_overlay(name), name)
    return Params.from_dict(merged)


def qwen2_config(name: str, *, tiny_shape: bool, attn: str = "sdpa") -> Qwen2Config:
    """The config of a preset's model (`name` = its hub id), real or tiny, EOS = `<|im_end|>`
    of the tiny tokenizer."""
    settings = dict(SHAPES[name])
    if tiny_shape:
        settings |= TINY_COMMON | TINY[name]
    tokenizer = tokenizer_once()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(bos_token_id=None, eos_token_id=eos, pad_token_id=eos, **settings)
    cfg._attn_implementation = attn
    return cfg


def build_model(
    name: str,
    *,
    tiny_shape: bool,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A random-init model of `name`'s shape, created directly on `device` in `dtype` (no
    transient copy in another dtype or on another device to inflate the peak memory)."""
    cfg = qwen2_config(name, tiny_shape=tiny_shape, attn=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    assert {p.dtype for p in lm.parameters()} == {dtype}
    lm.generation_config = GenerationConfig(
        eos_token_id=[cfg.eos_token_id], pad_token_id=cfg.pad_token_id
    )
    if not tiny_shape:
        count = sum(p.numel() for p in lm.parameters())
        assert count == PARAMETERS[name], f"{name}: {count} parameters, not the real shape"
    return lm.eval()


@functools.cache
def tokenizer_once():
    """The tiny tokenizer, trained once per process."""
    return tiny.build_tokenizer()


def records(split: str, count: int) -> list[dict[str, str]]:
    """`count` prepared GSM8K-format records from the fixture rows (repeated, distinct ids)."""
    rows = tiny.GSM8K_ROWS[split]
    out = []
    for i in range(count):
        question, answer = rows[i % len(rows)]
        gold = answer.split("####")[-1].strip()
        out.append(
            {"id": f"{split}-{i:05d}", "question": question, "solution": answer, "gold": gold}
        )
    return out


def free_memory() -> None:
    """Release what earlier checks of this process left (their tensors are gone by now)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- one GRPO step of a preset --------------------------------------------------------------------


def step_params(name: str, tokens: int | None) -> Params:
    """Preset `name`'s params for one GRPO step: its global batch of B x G rows (split over
    however many processes run it), `tokens` capping the completion length (None: the
    preset's)."""
    params = preset_params(name)
    cfg = params.train
    train = dataclasses.replace(
        cfg,
        num_steps=1,
        num_iterations=1,
        max_completion_length=tokens or cfg.max_completion_length,
        save_every=0,
        wandb="disabled",
    )
    return dataclasses.replace(params, train=train)


def prepare_policy(params: Params, d: distributed.Dist, tiny_shape: bool):
    """The policy as the train stage prepares it on this rank's device: fp32 master weights,
    or with LoRA (`model.lora_rank` > 0) a frozen base in `model.dtype` (bf16 on a GPU) under
    fp32 adapters."""
    m = params.model
    attn = model.pick_attention(m.attn_implementation)
    dtype = model.pick_dtype(m.dtype) if m.lora_rank > 0 else torch.float32
    lm = build_model(m.name, tiny_shape=tiny_shape, device=d.device, dtype=dtype, attn=attn)
    if m.lora_rank > 0:
        lm = model.add_lora(lm, m.lora_rank, m.lora_alpha, m.lora_target_modules)
    return lm


def timed_step(trainer: GRPOTrainer) -> dict[str, float]:
    """One GRPO step (step 1 of iteration 0) with its time split: generation, scoring
    (rewards, reference log-probs, old-policy log-probs when mu > 1) and update (policy
    log-probs with grad, backward, optimizer step)."""
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
    trainer.start_iteration(0)
    sync()
    start = time.perf_counter()
    ro = trainer.rollout(1)
    sync()
    rolled = time.perf_counter()
    stats = trainer.update(ro, 1)
    sync()
    end = time.perf_counter()
    rewards = ro.rewards.view(-1, trainer.cfg.num_generations)  # (B, G)
    return {
        **stats,
        "generation_seconds": ro.generation_seconds,
        "scoring_seconds": rolled - start - ro.generation_seconds,
        "update_seconds": end - rolled,
        "rows": float(ro.gen.completion_ids.shape[0]),
        "generated_tokens": float(sum(ro.gen.num_tokens)),
        "truncated": float(sum(ro.gen.truncated)),
        "groups_with_reward_spread": float((rewards.std(dim=1) > 0).sum()),
    }


def autocast_on(dev: torch.device) -> bool:
    """Whether the trainer's forwards run under bf16 autocast on `dev`."""
    return isinstance(autocast(dev), torch.autocast)


def checkpointing_on(lm) -> bool:
    """Whether `lm` recomputes activations in the backward (the name changed in transformers 5)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), attr) or hasattr(lm, attr):
            return bool(getattr(lm, attr))
    raise AttributeError(f"{type(lm).__name__} says nothing about gradient checkpointing")


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own data (this rank's shard under FSDP), detached."""
    return (p.to_local() if hasattr(p, "to_local") else p).detach()


def run_step(name: str, d: distributed.Dist, workdir: Path, tokens: int | None) -> dict[str, Any]:
    """One GRPO step of preset `name` in this process; what a test checks of it."""
    tiny_shape = smoke()
    params = step_params(name, tokens)
    cfg = params.train
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    lm = prepare_policy(params, d, tiny_shape)
    tokenizer = tokenizer_once()
    trainer = GRPOTrainer(
        lm,
        tokenizer,
        records("train", 64),
        cfg,
        LengthReward(),  # random models never answer: a reward that varies inside groups
        system=params.prompt.system,
        eos_ids=model.eos_token_ids(lm, tokenizer),
        checkpoint_dir=workdir / "checkpoints",
        dist=d,
        strategy=cfg.strategy,
    )
    named = dict(trainer.engine.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    before = {n: _local(p).to("cpu", copy=True) for n, p in trainable.items()}
    result: dict[str, Any] = timed_step(trainer)
    unchanged = [n for n, p in trainable.items() if torch.equal(_local(p).cpu(), before[n])]
    result |= {
        "preset": name,
        "rank": d.rank,
        "world": d.world,
        "batch_size": cfg.batch_size,
        "num_generations": cfg.num_generations,
        "max_completion_length": cfg.max_completion_length,
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "strategy": cfg.strategy if d.world > 1 else "single",
        "lora_rank": params.model.lora_rank,
        "parameter_tensors": len(named),
        "trainable_tensors": len(trainable),
        "lora_tensors": sum("lora_" in n for n in trainable),
        "checkpointing_on": checkpointing_on(trainer.plain_model()),
        "autocast": autocast_on(d.device),
        "unchanged": unchanged,
        "device": str(d.device),
        "peak_bytes": torch.cuda.max_memory_allocated(d.device) if d.device.type == "cuda" else 0,
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="one GRPO step of a GPU preset (worker)")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON file; rank r writes <out>.r")
    p.add_argument("--tokens", type=int, help="completion token cap (default: the preset's)")
    args = p.parse_args()
    d = distributed.init()
    # no shutdown on an exception: this rank exits and the launcher stops the others
    result = run_step(args.preset, d, args.out.parent, args.tokens)
    Path(f"{args.out}.{d.rank}").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main()
