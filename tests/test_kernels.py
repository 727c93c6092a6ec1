"""The C kernels' build and the decode steps' few-column GEMM: same products as torch.mm, clear
fallbacks."""

from __future__ import annotations

import logging
import shutil

import pytest
import tiny
import torch

from grpo import kernels
from grpo.kernels import skinny_gemm

BUILDABLE = tiny.KERNELS_BUILDABLE


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel built from scratch into tmp_path, and the cached one restored afterwards."""
    monkeypatch.setenv("GRPO_KERNEL_CACHE", str(tmp_path))
    kernels.library.cache_clear()
    yield tmp_path
    kernels.library.cache_clear()


@pytest.mark.skipif(not BUILDABLE, reason="the kernel needs x86-64 with AVX2 and a C compiler")
def test_kernel_builds_here_atomically(fresh):
    assert kernels.library() is not None
    assert [p.name for p in fresh.iterdir()] == [p.name for p in fresh.glob("kernels-*.so")]
    assert len(list(fresh.iterdir())) == 1  # no temp file left behind


@pytest.mark.skipif(not BUILDABLE, reason="the kernel needs x86-64 with AVX2 and a C compiler")
@pytest.mark.parametrize("n", [16, 32, 48, 64])
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (5, 3), (6, 64), (7, 33), (97, 40)])
def test_kernel_equals_torch_mm(n, out_features, in_features):
    """Row blocks of 3 (32 columns) and 6 (16 columns) plus left-over rows, any K; also
    written transposed (the LM head's (n, O) logits)."""
    g = torch.Generator().manual_seed(n * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=g)  # (O, K)
    xt = torch.randn(in_features, n, generator=g)  # (K, n)
    assert skinny_gemm.applies(weight, xt)
    torch.testing.assert_close(skinny_gemm.mm(weight, xt), weight @ xt, rtol=1e-5, atol=1e-5)
    transposed = skinny_gemm.mm(weight, xt, transposed=True)
    assert transposed.shape == (n, out_features) and transposed.is_contiguous()
    torch.testing.assert_close(transposed, (weight @ xt).t(), rtol=1e-5, atol=1e-5)


def test_what_the_kernel_does_not_take_goes_to_torch_mm():
    weight = torch.randn(8, 4)
    cases = {
        "8 columns": torch.randn(4, 8),
        "past MAX_COLUMNS": torch.randn(4, skinny_gemm.MAX_COLUMNS + 16),
        "float64": torch.randn(4, 16, dtype=torch.float64),
        "not contiguous": torch.randn(16, 4).t(),
    }
    for name, xt in cases.items():
        w = weight.to(xt.dtype)
        assert not skinny_gemm.applies(w, xt), name
        torch.testing.assert_close(skinny_gemm.mm(w, xt), w @ xt)
    needs_grad = weight.clone().requires_grad_()
    assert not skinny_gemm.applies(needs_grad, torch.randn(4, 16))
    with torch.no_grad():
        assert skinny_gemm.applies(needs_grad, torch.randn(4, 16)) == BUILDABLE


def test_a_failed_build_warns_once_and_falls_back(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    with caplog.at_level(logging.WARNING, logger="grpo.kernels"):
        weight, xt = torch.randn(6, 5), torch.randn(5, 16)
        out = skinny_gemm.mm(weight, xt)
        skinny_gemm.mm(weight, xt)
    torch.testing.assert_close(out, weight @ xt)
    assert len(caplog.records) == 1, caplog.text
    if BUILDABLE:
        assert "compiling skinny_gemm.c, llama_step.c, gumbel.c with" in caplog.text
        assert "exit status 1" in caplog.text
    assert list(fresh.iterdir()) == []  # nothing half-written


def test_the_kernel_can_be_switched_off(fresh, monkeypatch):
    monkeypatch.setenv("GRPO_KERNELS", "0")
    assert kernels.library() is None
    assert not skinny_gemm.applies(torch.randn(6, 5), torch.randn(5, 16))


def test_operands_are_padded_to_whole_column_blocks():
    """Every decode-step operand (and llama_step.c's width) is a whole number of the kernels'
    16-column blocks: the kernels read 16 columns at a time."""
    widths = [skinny_gemm.column_width(n) for n in (1, 15, 16, 17, 33, 64)]
    assert widths == [16, 16, 16, 32, 48, 64]
    weight = torch.randn(3, 2)
    assert all(skinny_gemm.applies(weight, torch.randn(2, w)) == BUILDABLE for w in widths)
