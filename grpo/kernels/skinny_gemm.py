"""The few-column fp32 GEMM of CPU decode steps: W (O, K) @ x (K, n), n a multiple of 16.

Owns `csrc/skinny_gemm.c` (AVX2 + FMA, OpenMP; built and loaded by `grpo.kernels`) and the
column block every decode-step operand is padded to. MKL packs W into its own layout on every
call, which at 16-32 columns costs about as much as the multiply; the kernel reads each block of
W rows once (README "Performance" has the measured speed-up).

`mm` uses the kernel when it applies (CPU, fp32, contiguous, n a multiple of COLUMN_BLOCK up to
MAX_COLUMNS) and `torch.mm` otherwise (also where `grpo.kernels` cannot build the library).
"""

from __future__ import annotations

import torch

from grpo.kernels import library

COLUMN_BLOCK = 16  # csrc/skinny_gemm.c and csrc/llama_step.c take x's columns 16 at a time
MAX_COLUMNS = 64  # beyond this MKL's GEMM is as fast (its packing cost is spread over more columns)


def column_width(n: int) -> int:
    """n columns rounded up to a multiple of COLUMN_BLOCK: the width of a kernel operand."""
    return -(-n // COLUMN_BLOCK) * COLUMN_BLOCK


def applies(weight: torch.Tensor, xt: torch.Tensor) -> bool:
    """True when the kernel computes weight @ xt for these operands."""
    n = xt.shape[1]
    return (
        weight.device.type == "cpu"
        and weight.dtype == xt.dtype == torch.float32
        and weight.is_contiguous()
        and xt.is_contiguous()
        and n % COLUMN_BLOCK == 0
        and 0 < n <= MAX_COLUMNS
        and not (torch.is_grad_enabled() and (weight.requires_grad or xt.requires_grad))
        and library() is not None
    )


def mm(weight: torch.Tensor, xt: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """weight (O, K) @ xt (K, n) -> (O, n), or its transpose as a contiguous (n, O) when
    `transposed` (written so by the kernel, no separate copy), through the kernel where it
    applies."""
    if not applies(weight, xt):
        out = torch.mm(weight, xt)  # (O, n)
        return out.t().contiguous() if transposed else out
    rows, inner = weight.shape
    n = xt.shape[1]
    out = weight.new_empty((n, rows) if transposed else (rows, n))  # (n, O) or (O, n)
    library().skinny_gemm(
        weight.data_ptr(),
        xt.data_ptr(),
        out.data_ptr(),
        rows,
        inner,
        n,
        torch.get_num_threads(),
        int(transposed),
    )
    return out
