"""Checks a run makes before any work, and the per-GPU memory estimate of a params set.

Owns the answer to "can this machine run these params?", asked by the `train` stage (before it
relaunches itself under `grpo.launch`), `sft` and `evaluate`, so that a GPU run on the wrong machine
fails in a second with one line naming the fix instead of hours later (or never, on a CPU).

Which runs ask for a GPU (`gpu_reasons`): `train.nproc_per_node: auto` (one process per GPU),
`train.gradient_checkpointing: true` (it only saves GPU memory; on a CPU it only costs time), or
a model of more than `CPU_MAX_PARAMETERS` parameters (Qwen2.5-0.5B and up: days per run on a
CPU). LoRA, FSDP and an integer `nproc_per_node` > 1 run on a CPU too (gloo processes; the tests
use them), so they do not ask for a GPU by themselves. Every GPU preset asks for one.

Checks, in order, each failure a `PreflightError` of one line:
1. a run that asks for a GPU has a CUDA build of torch (`torch.version.cuda`) and a visible GPU;
2. when CUDA is visible: at least `nproc_per_node` GPUs; compute capability >= 8.0 for an
   explicit `model.dtype: bfloat16` or `model.attn_implementation: flash_attention_2` (and
   flash-attn importable, `grpo.device.attention`);
3. the estimated peak memory per GPU fits in `total_memory` of every GPU the run uses.

The memory estimate is `grpo.memory`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo import device, model
from grpo.errors import UserError
from grpo.memory import (
    Estimate,
    GiB,
    ModelShape,
    TrainSettings,
    eval_estimate,
    sft_estimate,
    shape_for,
    train_estimate,
)

CPU_MAX_PARAMETERS = 300_000_000
"""Above this a model asks for a GPU: the CPU demo's 135M model already takes ~25 s a step."""
CPU_PRESET = "python -m stages.preset apply cpu-demo"
MEMORY_FIX = (
    "lower train.micro_batch_size, train.num_generations or train.max_completion_length, turn "
    "on train.gradient_checkpointing, or use model.lora_rank > 0 or train.strategy: fsdp over "
    "more GPUs"
)


class PreflightError(UserError):
    """This machine cannot run these params."""


def gpu_reasons(
    shape: ModelShape | None,
    *,
    model: str | Path = "the model",
    nproc: int | str = 1,
    checkpointing: bool = False,
) -> list[str]:
    """Why a run asks for a GPU (the rule in the module docstring), each naming its key or the
    `model` folder; [] = a CPU can run it."""
    reasons = []
    if nproc == "auto":
        reasons.append("params.yaml: train.nproc_per_node: auto")
    if checkpointing:
        reasons.append("params.yaml: train.gradient_checkpointing: true")
    if shape is not None and shape.parameters() > CPU_MAX_PARAMETERS:
        reasons.append(
            f"{model}: a model of {shape.parameters() / 1e9:.2f} B parameters "
            f"(a CPU run takes at most {CPU_MAX_PARAMETERS / 1e9:.1f} B)"
        )
    return reasons


def check_cuda(reasons: list[str]) -> None:
    """A run that asks for a GPU has CUDA torch and sees a GPU."""
    if not reasons:
        return
    if torch.version.cuda is None:
        raise PreflightError(
            f"{reasons[0]} asks for a GPU, but torch {torch.__version__} is a CPU "
            f'build; install the CUDA build of torch (README "Install"), or run on a CPU '
            f"({CPU_PRESET})"
        )
    if not torch.cuda.is_available():
        raise PreflightError(
            f"{reasons[0]} asks for a GPU, but CUDA sees none; check the driver "
            f"(nvidia-smi) and CUDA_VISIBLE_DEVICES, or run on a CPU ({CPU_PRESET})"
        )


def cuda_devices(nproc: int | str) -> list[torch.device]:
    """The GPUs a run of `nproc` processes per node uses ([] without CUDA); fewer visible GPUs
    than processes is a PreflightError."""
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    need = count if nproc == "auto" else int(nproc)
    if need > count:
        raise PreflightError(
            f"params.yaml: train.nproc_per_node: {need} processes need {need} GPUs, {count} "
            f"visible; set train.nproc_per_node to at most {count} (and train.batch_size to a "
            f"multiple of it), or check CUDA_VISIBLE_DEVICES"
        )
    return [torch.device("cuda", i) for i in range(max(1, need))]


def check_capability(devices: list[torch.device], dtype: str, attn: str) -> None:
    """An explicit bf16 dtype or flash_attention_2 needs what every used GPU must have."""
    for dev in devices:
        if dtype == "bfloat16" and not device.bf16_native(dev):
            cap = device.capability(dev)
            raise PreflightError(
                f"params.yaml: model.dtype: bfloat16 needs compute capability >= 8.0 "
                f"({dev} has {cap[0]}.{cap[1]}: bf16 would be emulated); use auto (fp32 there) "
                f"or float32"
            )
        device.attention(attn, dev)


def check_memory(estimate: Estimate, devices: list[torch.device], fix: str) -> None:
    """The estimated peak fits in the memory of every used GPU."""
    for dev in devices:
        props = torch.cuda.get_device_properties(dev.index)
        if estimate.total > props.total_memory:
            raise PreflightError(
                f"params.yaml: estimated peak memory per GPU {estimate.describe()} exceeds "
                f"the {props.total_memory / GiB:.1f} GiB of {dev} ({props.name}); {fix}"
            )


def _bf16(devices: list[torch.device]) -> bool:
    return bool(devices) and all(device.bf16_native(dev) for dev in devices)


def check_train(params, model_dir: str | Path) -> None:
    """Everything the train stage needs from this machine (once, before the launcher)."""
    model.check_context(
        model_dir, "train.max_completion_length", params.train.max_completion_length
    )
    settings = TrainSettings.from_params(params)
    nproc, attn = params.train.nproc_per_node, params.model.attn_implementation
    shape = shape_for(model_dir)
    ckpt = settings.gradient_checkpointing
    check_cuda(gpu_reasons(shape, model=model_dir, nproc=nproc, checkpointing=ckpt))
    devices = cuda_devices(nproc)
    check_capability(devices, "auto", attn)
    if devices and shape is not None:
        estimate = train_estimate(shape, settings, world=len(devices), bf16=_bf16(devices))
        check_memory(estimate, devices, MEMORY_FIX)


def check_evaluate(params, model_dir: str | Path) -> None:
    """Everything the evaluate stage needs from this machine (it uses one device)."""
    dtype, attn = params.model.dtype, params.model.attn_implementation
    batch_size, max_new_tokens = params.eval.batch_size, params.eval.max_new_tokens
    batch_size = max(batch_size, params.eval.num_samples)  # a question's samples share a batch
    model.check_context(model_dir, "eval.max_new_tokens", max_new_tokens)
    shape = shape_for(model_dir)
    check_cuda(gpu_reasons(shape, model=model_dir))
    devices = [device.pick_device()] if torch.cuda.is_available() else []
    check_capability(devices, dtype, attn)
    if devices and shape is not None:
        size = torch.finfo(device.model_dtype(dtype, devices[0])).bits // 8
        estimate = eval_estimate(shape, batch_size, max_new_tokens, weight_bytes=size)
        check_memory(estimate, devices, "lower eval.batch_size or eval.max_new_tokens")


def check_sft(params, model_dir: str | Path) -> None:
    """Everything the sft stage needs from this machine (it uses one device)."""
    attn, batch_size = params.model.attn_implementation, params.sft.batch_size
    shape = shape_for(model_dir)
    check_cuda(gpu_reasons(shape, model=model_dir))
    devices = [device.pick_device()] if torch.cuda.is_available() else []
    check_capability(devices, "auto", attn)
    if devices and shape is not None:
        estimate = sft_estimate(shape, batch_size, bf16=_bf16(devices))
        check_memory(estimate, devices, "lower sft.batch_size, or set sft.enabled: false")
