"""The few-column fp32 GEMM of CPU decode steps: W (O, K) @ x (K, n) for n = 16, 32, 48, 64.

Owns `grpo/skinny_gemm.c` (AVX2 + FMA, OpenMP): it is compiled with the system C compiler on
first use into a cache directory (`$GRPO_KERNEL_CACHE`, else `$XDG_CACHE_HOME/grpo-gsm8k`, else
`~/.cache/grpo-gsm8k`), keyed by a hash of source and flags, and loaded with ctypes. Measured on
this project's 2-core AVX2 CPU with SmolLM2-135M's weights: all of a decode step's GEMMs in
51 ms vs MKL's 80 ms at 16 columns, 83 ms vs 126 ms at 32 (MKL repacks W on every call).

`mm` uses the kernel when it applies (CPU, fp32, contiguous, n a multiple of 16 up to
MAX_COLUMNS) and `torch.mm` otherwise. Where the kernel cannot be built (not x86-64 with AVX2,
no compiler, a compile error) `mm` is `torch.mm` and one warning says why, once per process.
`GRPO_SKINNY_GEMM=0` turns the kernel off (same results up to float summation order).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny_gemm.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_COLUMNS = 64  # beyond this MKL's GEMM is as fast (its packing cost is spread over more columns)


def _cache_dir() -> Path:
    if os.environ.get("GRPO_KERNEL_CACHE"):
        return Path(os.environ["GRPO_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "grpo-gsm8k"


def _unavailable(reason: str) -> None:
    log.warning("grpo.skinny_gemm: %s; decode steps use torch.mm (slower on CPU)", reason)


def _build(compiler: str, target: Path) -> None:
    """Compile SOURCE into `target`, atomically (a temp file in the same directory, renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (after one warning) where it cannot be built or is off."""
    if os.environ.get("GRPO_SKINNY_GEMM", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _unavailable(f"the kernel is x86-64 AVX2 code, this is {platform.machine()}")
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _unavailable(f"this CPU lacks AVX2/FMA ({torch.backends.cpu.get_cpu_capability()})")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        _unavailable("no C compiler found (install gcc or set CC)")
        return None
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"skinny_gemm-{digest}.so"
    if not target.exists():
        try:
            _build(compiler, target)
        except subprocess.CalledProcessError as err:
            lines = (err.stderr or "").strip().splitlines()
            detail = lines[0] if lines else f"exit status {err.returncode}"
            _unavailable(f"compiling {SOURCE.name} with {compiler} failed: {detail}")
            return None
        except OSError as err:
            _unavailable(f"cannot build into {target.parent}: {err} (set GRPO_KERNEL_CACHE)")
            return None
    lib = ctypes.CDLL(str(target))
    lib.skinny_gemm.restype = None
    lib.skinny_gemm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
    return lib


def applies(weight: torch.Tensor, xt: torch.Tensor) -> bool:
    """True when the kernel computes weight @ xt for these operands."""
    n = xt.shape[1]
    return (
        weight.device.type == "cpu"
        and weight.dtype == xt.dtype == torch.float32
        and weight.is_contiguous()
        and xt.is_contiguous()
        and n % 16 == 0
        and 0 < n <= MAX_COLUMNS
        and not (torch.is_grad_enabled() and (weight.requires_grad or xt.requires_grad))
        and library() is not None
    )


def mm(weight: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """weight (O, K) @ xt (K, n) -> (O, n), through the kernel where it applies."""
    if not applies(weight, xt):
        return torch.mm(weight, xt)
    rows, inner = weight.shape
    n = xt.shape[1]
    out = weight.new_empty(rows, n)  # (O, n)
    library().skinny_gemm(
        weight.data_ptr(), xt.data_ptr(), out.data_ptr(), rows, inner, n, torch.get_num_threads()
    )
    return out
