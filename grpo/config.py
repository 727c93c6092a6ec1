"""Typed, strict view of params.yaml: one frozen dataclass per section.

Owns the schema of every hyperparameter. Loading fails on unknown keys (with the closest valid
name), missing keys, wrong types and out-of-range values; numbers written as strings by
`dvc exp run -S` (``2e-06``) are coerced where the field is a float. Every attribute read of a
section is recorded, so a test can compare what a stage really reads with the `params:` list of
its dvc.yaml entry (`read_keys`).

>>> cfg = Params.from_dict(default_params_dict())
>>> cfg.train.learning_rate > 0
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from grpo.errors import UserError

_READ: set[str] = set()
_TRACKING = [True]
TRACE_ENV = "GRPO_PARAMS_TRACE"


ScaleRewards = Literal["group", "none"]
"""How rewards become advantages (`grpo.loss.group_advantages`)."""
LossType = Literal["grpo", "dr_grpo", "dapo"]
"""How token losses aggregate into one scalar (`grpo.loss.grpo_loss`)."""
LrScheduler = Literal["constant", "linear", "cosine"]
"""The learning-rate shape after warm-up (`grpo.schedule.lr_factor`)."""
SCALE_REWARDS: tuple[str, ...] = typing.get_args(ScaleRewards)
LOSS_TYPES: tuple[str, ...] = typing.get_args(LossType)


class ConfigError(UserError):
    """params.yaml is invalid."""


class _Section:
    """Base of every section: records `section.key` on each field read."""

    _name: ClassVar[str]

    def __getattribute__(self, key: str) -> Any:
        cls = object.__getattribute__(self, "__class__")
        if _TRACKING[0] and key in cls.__dataclass_fields__:
            _READ.add(f"{cls._name}.{key}")
        return object.__getattribute__(self, key)

    def validate(self) -> None:
        """Range checks across fields; raise ConfigError. Default: nothing to check."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, without recording them as read."""
        return {f.name: object.__getattribute__(self, f.name) for f in dataclasses.fields(self)}


FIX = "fix it in params.yaml"
INT_LIMIT = 2**63
"""Integers (seeds included) must fit a signed 64-bit integer, as torch and numpy take them."""


def _error(key: str, msg: str, fix: str = FIX) -> ConfigError:
    """The one-line error for `key`: what is wrong, then how to fix it."""
    return ConfigError(f"params.yaml: {key}: {msg}; {fix}")


def _check(cond: bool, key: str, msg: str, fix: str = FIX) -> None:
    if not cond:
        raise _error(key, msg, fix)


@dataclass(frozen=True)
class DataConfig(_Section):
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
        _check(
            bool(self.hub_id) or bool(self.mirrors),
            "data",
            "no source: hub_id is empty and mirrors is []",
            "set data.hub_id or add a folder to data.mirrors",
        )
        for key in ("train_size", "eval_size"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", f"must be > 0 or null, got {value}")


@dataclass(frozen=True)
class ModelConfig(_Section):
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
        _check(bool(self.name.strip()), "model.name", "is empty", "set it to a hub id or a folder")
        _check(self.lora_rank >= 0, "model.lora_rank", "must be >= 0 (0 = off)")
        _check(self.lora_alpha > 0, "model.lora_alpha", "must be > 0")


@dataclass(frozen=True)
class PromptConfig(_Section):
    _name: ClassVar[str] = "prompt"
    system: str
    """System message put before every question through the tokenizer's chat template."""


@dataclass(frozen=True)
class RewardConfig(_Section):
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
            _check(getattr(self, key) >= 0, f"reward.{key}", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig(_Section):
    _name: ClassVar[str] = "eval"
    batch_size: int
    """Prompts generated together (left-padded, KV cache)."""
    max_new_tokens: int
    """Completion length cap; completions that hit it count as truncated."""
    temperature: float
    """0 = greedy (default); > 0 samples with this temperature, top_p 1, top_k 0."""
    seed: int
    """Sampling seed (used when temperature > 0)."""

    def validate(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0, "eval.temperature", "must be >= 0")


@dataclass(frozen=True)
class SftConfig(_Section):
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
            _check(getattr(self, key) >= 1, f"sft.{key}", "must be >= 1")
        _check(self.learning_rate > 0, "sft.learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "sft.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "sft.weight_decay", "must be >= 0")
        _check(self.max_grad_norm > 0, "sft.max_grad_norm", "must be > 0")


@dataclass(frozen=True)
class TrainConfig(_Section):
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
            _check(getattr(self, key) >= 1, f"train.{key}", "must be >= 1")
        _check(
            self.num_generations >= 2,
            "train.num_generations",
            f"must be >= 2 (got {self.num_generations}): with one completion per prompt every "
            f"group-relative advantage is zero",
            "set it to 2 or more",
        )
        _check(
            self.max_completion_length >= 1,
            "train.max_completion_length",
            f"must be >= 1, got {self.max_completion_length}",
        )
        _check(self.temperature > 0, "train.temperature", "must be > 0 (rollouts sample)")
        _check(0 < self.top_p <= 1, "train.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "train.top_k", "must be >= 0")
        _check(self.beta >= 0, "train.beta", f"must be >= 0, got {self.beta}")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.epsilon > 0, "train.epsilon", "must be > 0")
        high = self.epsilon_high
        _check(high is None or high >= self.epsilon, "train.epsilon_high", "must be >= epsilon")
        _check(self.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.save_every >= 0, "train.save_every", "must be >= 0")
        nproc = self.nproc_per_node
        _check(nproc == "auto" or nproc >= 1, "train.nproc_per_node", "must be >= 1 or auto")
        if isinstance(nproc, int):  # auto: the stage checks the count it finds
            check_batch_split(self, nproc, counted="nproc_per_node=")


def check_batch_split(cfg: TrainConfig, processes: int, counted: str = "") -> None:
    """ConfigError unless each of `processes` gets one row of the global batch at least (the
    batch_size x num_generations rows split over processes in any count); `counted` prefixes
    the count in the message (`nproc_per_node=` when it is the params value)."""
    rows = cfg.batch_size * cfg.num_generations
    _check(
        rows >= processes,
        "train.batch_size",
        f"{cfg.batch_size} prompts x {cfg.num_generations} generations = {rows} rows, "
        f"fewer than {counted}{processes} processes",
        f"set train.batch_size to {-(-processes // cfg.num_generations)} or more, or lower "
        f"train.nproc_per_node",
    )


SECTIONS: dict[str, type[_Section]] = {
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


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, coercing numeric strings for float fields."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise _error(key, f"expected {' or '.join(map(_type_name, args))}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise _error(key, f"must be one of {list(args)}, got {value!r}", "use one of those")
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"expected an integer, got {value!r}")
        low = 0 if key.endswith("seed") else -INT_LIMIT  # seeds are non-negative everywhere
        _check(low <= value < INT_LIMIT, key, f"must be in [{low}, 2**63), got {value}")
        return value
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):  # not a number: the error below says so
                number = float(value)
        if number is None:
            raise _error(key, f"expected a number, got {value!r}", "write a number such as 3.0e-5")
        _check(math.isfinite(number), key, f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type[_Section], raw: Any) -> _Section:
    name = cls._name
    _check(isinstance(raw, dict), name, f"expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            fix = f"did you mean '{name}.{close[0]}'? rename it" if close else "remove it"
            raise ConfigError(f"params.yaml: unknown key '{name}.{key}'; {fix}")
    missing = [f for f in fields if f not in raw]
    if missing:
        raise ConfigError(f"params.yaml: missing key '{name}.{missing[0]}'; add it to params.yaml")
    values = {f: _coerce(raw[f], hints[f], f"{name}.{f}") for f in fields}
    section = cls(**values)
    _TRACKING[0] = False
    try:
        section.validate()
    finally:
        _TRACKING[0] = True
    return section


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
        _check(isinstance(raw, dict), "<top level>", "expected a mapping of sections")
        for key in raw:
            if key not in SECTIONS:
                close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
                fix = f"did you mean '{close[0]}'? rename it" if close else "remove it"
                raise ConfigError(f"params.yaml: unknown section '{key}'; {fix}")
        for key in SECTIONS:
            _check(key in raw, key, "missing section", "add it to params.yaml")
        return cls(**{key: _build(sec, raw[key]) for key, sec in SECTIONS.items()})


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):  # PyYAML's own check reports it
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first on line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML file `path`; unreadable files, syntax errors and duplicate keys raise
    ConfigError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or str(err)
        raise ConfigError(
            f"{path}: cannot read params file ({why}); check the --params path"
        ) from err
    try:
        return yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = err.problem or err.context or "invalid YAML"
        if "duplicate key" in what:
            raise ConfigError(f"{where}: {what}; remove one of them") from err
        raise ConfigError(f"{where}: not valid YAML ({what}); fix the YAML syntax") from err
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first}); fix the YAML syntax") from err


def load(path: str | Path) -> Params:
    """Read and validate a params file."""
    return Params.from_dict(read_yaml(path))


def default_params_dict() -> dict[str, Any]:
    """The repository's params.yaml as a dict (for tests and doctests)."""
    return yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())


def read_keys() -> list[str]:
    """Every `section.key` read so far in this process, sorted."""
    return sorted(_READ)


def write_trace(stage: str) -> None:
    """If $GRPO_PARAMS_TRACE names a folder, record the keys this stage read as `<stage>.json`."""
    folder = os.environ.get(TRACE_ENV)
    if folder and os.environ.get("RANK", "0") == "0":
        path = Path(folder) / f"{stage}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = set(read_keys())
        if path.exists():  # a launcher and its workers record the same stage
            keys |= set(json.loads(path.read_text()))
        path.write_text(json.dumps(sorted(keys)))
