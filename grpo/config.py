"""Typed, strict view of params.yaml: one frozen dataclass per section.

Owns the schema of every hyperparameter: its type, its range and the checks across fields.
Loading fails on unknown keys (with the closest valid name), missing keys, wrong types and
out-of-range values, with one line naming the key (the machinery is `grpo.schema`).

>>> cfg = Params.from_dict(default_params_dict())
>>> cfg.train.learning_rate > 0
True
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from grpo.schema import ConfigError, Section, build, check, read_yaml

ScaleRewards = Literal["group", "none"]
"""How rewards become advantages (`grpo.loss.group_advantages`)."""
LossType = Literal["grpo", "dr_grpo", "dapo"]
"""How token losses aggregate into one scalar (`grpo.loss.grpo_loss`)."""
LrScheduler = Literal["constant", "linear", "cosine"]
"""The learning-rate shape after warm-up (`grpo.schedule.lr_factor`)."""
SCALE_REWARDS: tuple[str, ...] = typing.get_args(ScaleRewards)
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)


@dataclass(frozen=True)
class DataConfig(Section):
    _name: ClassVar[str] = "data"
    hub_id: str
    """Hugging Face dataset id, tried first (`openai/gsm8k`); "" skips the hub."""
    hub_config: str
    """Dataset config name (`main`)."""
    mirrors: list[str]
    """Local folders with train.jsonl/test.jsonl, tried in order when the hub is unreachable.
    Relative paths are relative to the repository root."""
    train_size: int | None
    """Train problems kept after shuffling (null = all 7,473)."""
    eval_size: int | None
    """Eval problems: a seeded subset of the official test split (null = all 1,319)."""
    seed: int
    """Seed of the train shuffle and the eval subset."""

    def validate(self) -> None:
        check(
            bool(self.hub_id) or bool(self.mirrors),
            "data",
            "no source: hub_id is empty and mirrors is []",
            "set data.hub_id or add a folder to data.mirrors",
        )
        for key in ("train_size", "eval_size"):
            value = getattr(self, key)
            check(value is None or value > 0, f"data.{key}", f"must be > 0 or null, got {value}")


@dataclass(frozen=True)
class ModelConfig(Section):
    _name: ClassVar[str] = "model"
    name: str
    """Hub id, local model folder, GGUF file, or `package:<pkg>/<file.gguf>` (a GGUF shipped in an
    installed Python package)."""
    revision: str
    """Hub revision (branch, tag or commit) when `name` is a hub id."""
    trust_remote_code: bool
    """Allow custom modelling code from the hub. Off by default: it runs arbitrary code."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Weights dtype when running; auto = bf16 on a GPU with native bf16 (compute capability
    >= 8.0), else fp32 (`grpo.device`)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"]
    """auto = flash_attention_2 on a GPU of compute capability >= 8.0 where flash-attn imports,
    else sdpa (`grpo.device`)."""
    lora_rank: int
    """LoRA rank for GRPO training (peft); 0 = full fine-tuning."""
    lora_alpha: float
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    lora_target_modules: list[str]
    """Module names that get LoRA adapters (e.g. q_proj, v_proj); [] = peft's default."""
    lora_save: Literal["merged", "adapter"]
    """merged = a plain model with the adapters folded in; adapter = the adapter only (evaluate
    loads it on top of its base)."""

    def validate(self) -> None:
        check(bool(self.name.strip()), "model.name", "is empty", "set it to a hub id or a folder")
        check(self.lora_rank >= 0, "model.lora_rank", "must be >= 0 (0 = off)")
        check(self.lora_alpha > 0, "model.lora_alpha", "must be > 0")


@dataclass(frozen=True)
class PromptConfig(Section):
    _name: ClassVar[str] = "prompt"
    system: str
    """System message put before every question through the tokenizer's chat template."""


@dataclass(frozen=True)
class RewardConfig(Section):
    _name: ClassVar[str] = "reward"
    correct_exact: float
    """Reward when the tagged answer equals the gold answer string (tutorial: 2.0)."""
    correct_numeric: float
    """Reward when it is numerically equal but written differently (tutorial: 1.5)."""
    format_mode: Literal["presence", "strict", "off"]
    """presence = weight/4 per tag present (tutorial); strict = weight for a well-formed
    completion (reasoning block, one answer block, nothing after it)."""
    format_weight: float
    """Maximum format reward (tutorial: 0.8)."""

    def validate(self) -> None:
        for key in ("correct_exact", "correct_numeric", "format_weight"):
            check(getattr(self, key) >= 0, f"reward.{key}", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig(Section):
    _name: ClassVar[str] = "eval"
    batch_size: int
    """Completions generated together (left-padded, KV cache): batch_size // num_samples
    questions per batch, at least one, so memory does not grow with num_samples."""
    max_new_tokens: int
    """Completion length cap; completions that hit it count as truncated."""
    temperature: float
    """0 = greedy (default); > 0 samples with this temperature, top_p 1, top_k 0."""
    seed: int
    """Sampling seed (used when temperature > 0)."""
    num_samples: int
    """Completions per question (k): 1 = one completion (greedy pass@1 at temperature 0);
    k > 1 samples k completions from one shared prompt prefill and reports pass@1..k and
    maj@1..k (needs temperature > 0)."""

    def validate(self) -> None:
        check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        check(self.temperature >= 0, "eval.temperature", "must be >= 0")
        check(self.num_samples >= 1, "eval.num_samples", "must be >= 1")
        check(
            self.num_samples == 1 or self.temperature > 0,
            "eval.num_samples",
            f"{self.num_samples} samples at temperature 0 would be {self.num_samples} copies "
            f"of the greedy completion",
            "set eval.temperature > 0 (e.g. 0.7) or eval.num_samples to 1",
        )


@dataclass(frozen=True)
class SftConfig(Section):
    _name: ClassVar[str] = "sft"
    enabled: bool
    """Run the supervised format warm-up; off = `models/sft` is a copy of `models/base`."""
    num_examples: int
    """Train problems (from the prepared train split) rewritten into the tagged format."""
    epochs: int
    """Passes over those examples."""
    batch_size: int
    """Examples per optimizer step."""
    learning_rate: float
    """Constant AdamW learning rate after a linear warm-up of `warmup_steps`."""
    warmup_steps: int
    """Linear warm-up steps."""
    weight_decay: float
    """AdamW weight decay."""
    max_grad_norm: float
    """Gradient-norm clip."""
    seed: int
    """Seed of the example order."""

    def validate(self) -> None:
        for key in ("num_examples", "epochs", "batch_size"):
            check(getattr(self, key) >= 1, f"sft.{key}", "must be >= 1")
        check(self.learning_rate > 0, "sft.learning_rate", "must be > 0")
        check(self.warmup_steps >= 0, "sft.warmup_steps", "must be >= 0")
        check(self.weight_decay >= 0, "sft.weight_decay", "must be >= 0")
        check(self.max_grad_norm > 0, "sft.max_grad_norm", "must be > 0")


@dataclass(frozen=True)
class TrainConfig(Section):
    _name: ClassVar[str] = "train"
    num_iterations: int
    """Outer loops; each starts with reference = frozen copy of the policy and a fresh AdamW."""
    num_steps: int
    """GRPO steps (rollout batches) per iteration."""
    batch_size: int
    """Prompts per step (B); the global batch is B x num_generations completions."""
    num_generations: int
    """Completions per prompt (G), the group of the group-relative advantage."""
    max_completion_length: int
    """Completion token cap during rollouts."""
    temperature: float
    """Rollout sampling temperature (log-probs use the same temperature)."""
    top_p: float
    """Nucleus sampling (1.0 = the raw policy)."""
    top_k: int
    """Top-k sampling (0 = off, the raw policy)."""
    stop_at_answer: bool
    """Also stop a completion once `</answer>` is closed."""
    beta: float
    """KL coefficient (k3 estimator); 0 skips the reference model entirely."""
    learning_rate: float
    """Peak AdamW learning rate."""
    lr_scheduler: LrScheduler
    """Schedule after warm-up, over the optimizer updates of one iteration."""
    warmup_steps: int
    """Linear warm-up, in optimizer updates."""
    mu: int
    """Optimizer updates per rollout batch (1 = on-policy, no old-policy forward)."""
    epsilon: float
    """Clip range: ratio clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None
    """Upper clip (DAPO clip-higher); null = epsilon."""
    scale_rewards: ScaleRewards
    """group = divide advantages by the group std (GRPO); none = Dr. GRPO."""
    loss_type: LossType
    """Token aggregation: per-sequence mean then mean (grpo, tutorial), dr_grpo, dapo."""
    max_grad_norm: float
    """Gradient-norm clip (tutorial: 0.1)."""
    weight_decay: float
    """AdamW weight decay."""
    micro_batch_size: int
    """Sequences per forward/backward chunk (gradient accumulation inside a step)."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass (less memory, one more forward pass)."""
    torch_compile: bool
    """torch.compile the training forward (dynamic shapes); pays off on GPUs for long runs."""
    save_every: int
    """Checkpoint every this many steps (0 = only the final model)."""
    nonfinite: Literal["skip", "stop"]
    """A non-finite reward, loss or gradient norm: skip = drop that update and count it
    (`nonfinite_skipped` in the logs); stop = fail naming the step (the last checkpoint stays)."""
    seed: int
    """Seed of prompt sampling, rollouts and initialisation."""
    wandb: Literal["disabled", "offline", "online"]
    """Weights & Biases logging; offline needs no API key."""
    wandb_project: str
    """W&B project name."""
    nproc_per_node: int | Literal["auto"]
    """Training processes on this node (`grpo.launch` starts them when > 1); auto = visible GPUs,
    1 on CPU. The global batch (batch_size x num_generations rows) is split over all processes
    by rows, unevenly when it does not divide (rewards are gathered before the advantages)."""
    strategy: Literal["ddp", "fsdp"]
    """Data parallelism with several processes: ddp (replicated weights, all-reduced
    gradients) or fsdp (FSDP2 fully_shard: weights, gradients and optimizer states sharded)."""

    def validate(self) -> None:
        for key in ("num_iterations", "num_steps", "batch_size", "mu", "micro_batch_size"):
            check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        check(
            self.num_generations >= 2,
            "train.num_generations",
            f"must be >= 2 (got {self.num_generations}): with one completion per prompt every "
            f"group-relative advantage is zero",
            "set it to 2 or more",
        )
        check(
            self.max_completion_length >= 1,
            "train.max_completion_length",
            f"must be >= 1, got {self.max_completion_length}",
        )
        check(self.temperature > 0, "train.temperature", "must be > 0 (rollouts sample)")
        check(0 < self.top_p <= 1, "train.top_p", "must be in (0, 1]")
        check(self.top_k >= 0, "train.top_k", "must be >= 0")
        check(self.beta >= 0, "train.beta", f"must be >= 0, got {self.beta}")
        check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        check(self.epsilon > 0, "train.epsilon", "must be > 0")
        high = self.epsilon_high
        check(high is None or high >= self.epsilon, "train.epsilon_high", "must be >= epsilon")
        check(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.save_every >= 0, "train.save_every", "must be >= 0")
        nproc = self.nproc_per_node
        check(nproc == "auto" or nproc >= 1, "train.nproc_per_node", "must be >= 1 or auto")
        if isinstance(nproc, int):  # auto: the stage checks the count it finds
            check_batch_split(self, nproc, counted="nproc_per_node=")


def check_batch_split(cfg: TrainConfig, processes: int, counted: str = "") -> None:
    """ConfigError unless each of `processes` gets one row of the global batch at least (the
    batch_size x num_generations rows split over processes in any count); `counted` prefixes
    the count in the message (`nproc_per_node=` when it is the params value)."""
    rows = cfg.batch_size * cfg.num_generations
    check(
        rows >= processes,
        "train.batch_size",
        f"{cfg.batch_size} prompts x {cfg.num_generations} generations = {rows} rows, "
        f"fewer than {counted}{processes} processes",
        f"set train.batch_size to {-(-processes // cfg.num_generations)} or more, or lower "
        f"train.nproc_per_node",
    )


SECTIONS: dict[str, type[Section]] = {
    cls._name: cls
    for cls in (
        DataConfig,
        ModelConfig,
        PromptConfig,
        RewardConfig,
        EvalConfig,
        SftConfig,
        TrainConfig,
    )
}


@dataclass(frozen=True)
class Params:
    """All sections of params.yaml."""

    data: DataConfig
    model: ModelConfig
    prompt: PromptConfig
    reward: RewardConfig
    eval: EvalConfig
    sft: SftConfig
    train: TrainConfig

    @classmethod
    def from_dict(cls, raw: Any) -> Params:
        check(isinstance(raw, dict), "<top level>", "expected a mapping of sections")
        for key in raw:
            if key not in SECTIONS:
                close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
                fix = f"did you mean '{close[0]}'? rename it" if close else "remove it"
                raise ConfigError(f"params.yaml: unknown section '{key}'; {fix}")
        for key in SECTIONS:
            check(key in raw, key, "missing section", "add it to params.yaml")
        return cls(**{key: build(sec, raw[key]) for key, sec in SECTIONS.items()})


def load(path: str | Path) -> Params:
    """Read and validate a params file."""
    return Params.from_dict(read_yaml(path))


def default_params_dict() -> dict[str, Any]:
    """The repository's params.yaml as a dict (for tests and doctests)."""
    return yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
