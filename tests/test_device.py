"""grpo.device decides device, dtype, attention and autocast once; simulated GPUs on the CPU."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
from collections import namedtuple

import pytest
import tiny
import torch
import yaml

from grpo import config, device, model, trainer
from grpo.device import DeviceError
from stages import evaluate, generate, sft

Props = namedtuple("Props", "name total_memory")
GiB = 2**30
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB)
T4 = ("Tesla T4", (7, 5), 15 * GiB)


def fake_gpus(monkeypatch, gpu=A100, count=1) -> None:
    """Make torch see `count` GPUs of kind `gpu`: (name, capability, memory). torch's own
    `is_bf16_supported` says True, as it does for emulated bf16 on a T4."""
    name, cap, memory = gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: Props(name, memory))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "cuda", "12.4")


def flash_attn_installed(monkeypatch, installed: bool = True) -> None:
    monkeypatch.setitem(
        sys.modules, "flash_attn", types.ModuleType("flash_attn") if installed else None
    )


def test_no_gpu_is_cpu_fp32_sdpa_without_autocast(monkeypatch):
    fake_gpus(monkeypatch, count=0)
    flash_attn_installed(monkeypatch)
    assert device.pick_device() == torch.device("cpu")
    assert device.capability() is None and not device.bf16_native()
    assert device.model_dtype("auto") == torch.float32
    assert device.model_dtype("bfloat16") == torch.bfloat16  # explicit: as given
    assert device.attention("auto") == "sdpa"
    assert isinstance(device.autocast(), contextlib.nullcontext)
    assert device.describe() == "cpu (fp32)"


def test_a100_is_local_rank_bf16_and_flash_attention(monkeypatch):
    fake_gpus(monkeypatch, A100, count=2)
    flash_attn_installed(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "1")
    dev = device.pick_device()
    assert dev == torch.device("cuda", 1)
    assert device.bf16_native(dev) and device.model_dtype("auto") == torch.bfloat16
    assert device.attention("auto") == "flash_attention_2"
    ctx = device.autocast(dev)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert "A100" in device.describe(dev) and "bf16 autocast" in device.describe(dev)


def test_t4_computes_in_fp32_although_torch_says_bf16_is_supported(monkeypatch):
    fake_gpus(monkeypatch, T4)
    flash_attn_installed(monkeypatch)
    dev = device.pick_device()
    assert dev == torch.device("cuda", 0) and torch.cuda.is_bf16_supported()
    assert not device.bf16_native(dev)
    assert device.model_dtype("auto") == torch.float32
    assert device.attention("auto") == "sdpa"  # flash-attn installed, but capability 7.5
    assert isinstance(device.autocast(dev), contextlib.nullcontext)


def test_everything_else_delegates_to_grpo_device(monkeypatch):
    fake_gpus(monkeypatch, T4)
    assert model.pick_dtype("auto") == torch.float32
    assert model.pick_attention("auto") == "sdpa"
    assert isinstance(trainer.autocast_context(torch.device("cuda", 0)), contextlib.nullcontext)
    fake_gpus(monkeypatch, A100)
    assert model.pick_dtype("auto") == torch.bfloat16
    assert isinstance(trainer.autocast_context(torch.device("cuda", 0)), torch.autocast)


def test_flash_attention_needs_an_importable_flash_attn(monkeypatch):
    fake_gpus(monkeypatch, A100)
    flash_attn_installed(monkeypatch, installed=False)
    assert device.flash_attn_problem() == "flash-attn is not installed"
    assert device.attention("auto") == "sdpa"

    def broken():
        raise OSError("libcudart.so.11.0: cannot open shared object file")

    monkeypatch.setattr(device, "_import_flash_attn", broken)
    assert "cannot be imported (libcudart.so.11.0" in device.flash_attn_problem()
    assert device.attention("auto") == "sdpa"
    with pytest.raises(DeviceError) as err:
        device.attention("flash_attention_2")
    message = str(err.value)
    assert message.startswith("params.yaml: model.attn_implementation: flash-attn cannot be")
    assert "use auto or sdpa" in message and "\n" not in message


@pytest.mark.parametrize(
    ("gpu", "count", "problem"),
    [(T4, 1, "needs compute capability >= 8.0 (cuda:0 has 7.5)"), (A100, 0, "needs a CUDA GPU")],
)
def test_explicit_flash_attention_where_it_cannot_run_is_one_line(monkeypatch, gpu, count, problem):
    fake_gpus(monkeypatch, gpu, count)
    flash_attn_installed(monkeypatch)
    with pytest.raises(DeviceError) as err:
        device.attention("flash_attention_2")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert device.attention("sdpa") == "sdpa" and device.attention("eager") == "eager"


def test_local_rank_without_its_gpu_is_a_user_error(monkeypatch):
    fake_gpus(monkeypatch, A100, count=2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceError, match=r"process 2 has no GPU \(2 visible\)"):
        device.pick_device()


@pytest.fixture
def stage_inputs(tmp_path):
    """A params file (small sft and eval) and prepared records, for running stages."""
    raw = config.default_params_dict()
    raw["sft"].update(num_examples=2, batch_size=2)
    raw["eval"].update(batch_size=2, max_new_tokens=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    records = tmp_path / "records.jsonl"
    rows = [
        {"id": f"q{i}", "question": q, "solution": a, "gold": a.split("####")[-1].strip()}
        for i, (q, a) in enumerate(tiny.GSM8K_ROWS["train"][:2])
    ]
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return params, records


def _run(which, tiny_model_dir, tmp_path, params, records):
    if which == "generate":
        argv = ["--model", str(tiny_model_dir), "--params", str(params), "--max-new-tokens", "3"]
        assert generate.main([*argv, "How much is 2 + 2?"]) == 0
    elif which == "evaluate":
        evaluate.main(
            argparse.Namespace(
                params=str(params),
                model=str(tiny_model_dir),
                data=str(records),
                metrics=str(tmp_path / "m.json"),
                predictions=str(tmp_path / "p.jsonl"),
            )
        )
    else:
        sft.main(
            argparse.Namespace(
                params=str(params),
                model=str(tiny_model_dir),
                data=str(records),
                out=str(tmp_path / "o"),
            )
        )


@pytest.mark.parametrize("which", ["generate", "evaluate", "sft"])
def test_stages_move_the_model_to_the_chosen_device(
    which, tiny_model_dir, tmp_path, stage_inputs, monkeypatch
):
    """Every entry point that loads a model puts it on `grpo.device.pick_device()` (here a
    stand-in CPU device, recorded) before computing with it."""
    chosen = torch.device("cpu", 0)
    monkeypatch.setattr(device, "pick_device", lambda: chosen)
    moves, load = [], model.load_model

    def load_and_spy(*args, **kwargs):
        lm = load(*args, **kwargs)
        to = lm.to

        def spy(*a, **k):
            moves.append(a[0] if a else k.get("device"))
            return to(*a, **k)

        lm.to = spy
        return lm

    monkeypatch.setattr(model, "load_model", load_and_spy)
    _run(which, tiny_model_dir, tmp_path, *stage_inputs)
    assert moves == [chosen]


def _repeated_index_backward(runs: int) -> list[torch.Tensor]:
    """Gradients of a gather whose positions repeat, as packed scoring keeps a group's shared
    prompt end once per completion: the backward adds several rows into one position."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 1200, 576, generator=gen, requires_grad=True)  # (1, L, C)
    keep = torch.cat([torch.arange(0, 1200, 2), torch.full((300,), 100), torch.full((300,), 700)])
    upstream = torch.randn(1, keep.numel(), 576, generator=gen)  # (1, K, C)
    grads = []
    for _ in range(runs):
        hidden.grad = None
        hidden[:, keep].backward(upstream)
        grads.append(hidden.grad.clone())
    return grads


def test_reproducible_gives_bit_identical_cpu_backwards_and_restores_the_flags():
    torch.use_deterministic_algorithms(False)
    with device.reproducible(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory  # costs time only
        grads = _repeated_index_backward(20)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory  # torch's default, restored


def test_reproducible_leaves_cuda_kernels_alone(monkeypatch):
    torch.use_deterministic_algorithms(False)
    with device.reproducible(torch.device("cuda", 0)):
        assert not torch.are_deterministic_algorithms_enabled()
