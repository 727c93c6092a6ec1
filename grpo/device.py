"""Where a process computes and in which precision: decided here, once, for every stage and CLI.

Owns four choices, each a function of what torch sees at call time (so a CPU test can
monkeypatch `torch.cuda.is_available`, `get_device_capability`, `device_count` and
`get_device_properties` to play an A100, a T4 or no GPU):

- the device: `cuda:LOCAL_RANK` when CUDA is available, else the CPU (`pick_device`);
- whether bf16 is native: CUDA with compute capability >= 8.0 (Ampere and newer). Not
  `torch.cuda.is_bf16_supported()`, which also counts emulation: a T4 or V100 then "supports"
  bf16 at a fraction of its fp32 speed. Those GPUs compute in fp32 instead: no bf16 autocast and
  `model.dtype: auto` = fp32. fp16 is not the fallback because training in fp16 needs loss
  scaling, and Qwen2.5 activations overflow fp16 (`bf16_native`);
- the weights dtype for `model.dtype` (`model_dtype`) and the attention implementation for
  `model.attn_implementation` (`attention`): flash_attention_2 only where it can run (CUDA,
  capability >= 8.0, and `import flash_attn` succeeds), else SDPA; an explicit
  flash_attention_2 where it cannot run is a `DeviceError`;
- the autocast context of training and scoring forwards (`autocast`);
- bit-reproducible backward passes on the CPU (`reproducible`).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator

import torch

from grpo.errors import UserError

BF16_CAPABILITY = (8, 0)
"""Compute capability from which bf16 matmuls run natively (Ampere)."""
FLASH_ATTN_CAPABILITY = (8, 0)
"""flash-attn 2 kernels need Ampere or newer."""


class DeviceError(UserError):
    """The params ask for a device feature this machine lacks."""


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK from `grpo.launch`; 0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device() -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank, count = local_rank(), torch.cuda.device_count()
    if rank >= count:
        raise DeviceError(
            f"train.nproc_per_node: process {rank} has no GPU ({count} visible); set "
            f"train.nproc_per_node to at most {count}, or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", rank)


def _resolve(dev: torch.device | None) -> torch.device:
    return pick_device() if dev is None else dev


def capability(dev: torch.device | None = None) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for the CPU."""
    dev = _resolve(dev)
    if dev.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(dev.index or 0))


def bf16_native(dev: torch.device | None = None) -> bool:
    """True on CUDA devices of compute capability >= 8.0 (emulated bf16 does not count)."""
    cap = capability(dev)
    return cap is not None and cap >= BF16_CAPABILITY


def model_dtype(name: str, dev: torch.device | None = None) -> torch.dtype:
    """The weights dtype for `model.dtype`: `auto` = bf16 where bf16 is native, else fp32 (bf16
    on the CPU is ~10x slower; emulated bf16 on older GPUs too); other names as given."""
    if name == "auto":
        return torch.bfloat16 if bf16_native(dev) else torch.float32
    return getattr(torch, name)


def _import_flash_attn() -> None:
    importlib.import_module("flash_attn")


def flash_attn_problem() -> str | None:
    """Why `import flash_attn` fails here (not installed, or built for another torch/CUDA),
    or None when it imports."""
    try:
        _import_flash_attn()
    except ModuleNotFoundError as err:
        if err.name == "flash_attn":
            return "flash-attn is not installed"
        return f"flash-attn cannot be imported ({err})"
    except (ImportError, OSError) as err:  # a build for another torch or CUDA
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"flash-attn cannot be imported ({first[:160]})"
    return None


def flash_attention_problem(dev: torch.device | None = None) -> str | None:
    """Why flash_attention_2 cannot run on `dev`, or None when it can."""
    dev = _resolve(dev)
    cap = capability(dev)
    if cap is None:
        return "flash_attention_2 needs a CUDA GPU (this process runs on the CPU)"
    if cap < FLASH_ATTN_CAPABILITY:
        return f"flash_attention_2 needs compute capability >= 8.0 ({dev} has {cap[0]}.{cap[1]})"
    return flash_attn_problem()


def attention(name: str, dev: torch.device | None = None) -> str:
    """The attention implementation for `model.attn_implementation`: `auto` = flash_attention_2
    where it can run, else sdpa; an explicit flash_attention_2 where it cannot is a DeviceError."""
    if name == "auto":
        return "flash_attention_2" if flash_attention_problem(dev) is None else "sdpa"
    if name == "flash_attention_2":
        problem = flash_attention_problem(dev)
        if problem is not None:
            raise DeviceError(
                f"params.yaml: model.attn_implementation: {problem}; use auto or sdpa, or run "
                f"on an Ampere or newer GPU with flash-attn installed (pip install '.[gpu]')"
            )
    return name


def autocast(dev: torch.device | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast where bf16 is native; nothing elsewhere (fp32 compute)."""
    dev = _resolve(dev)
    if bf16_native(dev):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def reproducible(dev: torch.device | None = None) -> Iterator[None]:
    """On the CPU, torch's deterministic kernels for the forwards and backwards inside.

    For training forwards and backwards, not decoding (whose kernels it would slow down).
    Packed scoring keeps a group's shared prompt end once per completion, so the backward of
    that gather adds several gradients into one position; torch's default CPU kernel adds them
    in thread order, which changes the weights in the last bits from run to run. Elsewhere
    (CUDA) nothing changes: deterministic CUDA kernels cost speed and need cuBLAS settings.
    """
    if _resolve(dev).type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    # NaN-filling every torch.empty (the mode's default) changes no result, only costs time
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def describe(dev: torch.device | None = None) -> str:
    """One line for logs: the device, its name, capability, memory and precision."""
    dev = _resolve(dev)
    if dev.type != "cuda":
        return f"{dev} (fp32)"
    props = torch.cuda.get_device_properties(dev.index or 0)
    cap = capability(dev)
    precision = "bf16 autocast" if bf16_native(dev) else "fp32, no native bf16"
    return (
        f"{dev} ({props.name}, compute capability {cap[0]}.{cap[1]}, "
        f"{props.total_memory / 2**30:.1f} GiB, {precision})"
    )
