"""Preflight: GPU runs check CUDA torch, GPU count, capability and memory before any work, and
`stages.preset show` prints the memory estimate. GPUs are simulated (tests/test_device.py)."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
import yaml
from test_device import A100, T4, fake_gpus, flash_attn_installed

from grpo import config, memory, preflight, preset
from grpo.config import Params
from grpo.device import DeviceError
from grpo.memory import KNOWN_SHAPES, GiB
from grpo.preflight import PreflightError
from stages import evaluate as evaluate_stage
from stages import preset as preset_command
from stages import sft as sft_stage
from stages import train as train_stage

QWEN_1_5B = "Qwen/Qwen2.5-1.5B-Instruct"
A10G = ("NVIDIA A10G", (8, 6), 22 * GiB)


def params_of(name: str, **changes) -> Params:
    """A preset's effective params, with `changes` ({"train": {...}}) on top."""
    raw = preset.merge(config.default_params_dict(), preset.load_overlay(name), name)
    for section, values in changes.items():
        raw[section].update(values)
    return Params.from_dict(raw)


def one_line_error(call, *args, kind=PreflightError) -> str:
    with pytest.raises(kind) as err:
        call(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_gpu_rule():
    small, big = KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"], KNOWN_SHAPES[QWEN_1_5B]
    assert preflight.gpu_reasons(small, nproc=2) == []  # gloo processes on a CPU are fine
    assert preflight.gpu_reasons(None) == []
    assert preflight.gpu_reasons(small, nproc="auto") == ["params.yaml: train.nproc_per_node: auto"]
    assert "gradient_checkpointing" in preflight.gpu_reasons(small, checkpointing=True)[0]
    assert preflight.gpu_reasons(big, model="models/sft")[0].startswith(
        "models/sft: a model of 1.54 B parameters"
    )


def test_cpu_torch_refuses_a_gpu_preset_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = one_line_error(preflight.check_train, params_of("seed-qwen2.5-1.5b"), QWEN_1_5B)
    assert message.startswith("params.yaml: train.gradient_checkpointing: true asks for a GPU")
    assert "is a CPU build; install the CUDA build of torch" in message
    message = one_line_error(preflight.check_evaluate, params_of("seed-qwen2.5-1.5b"), QWEN_1_5B)
    assert "1.54 B parameters" in message and "CPU build" in message
    preflight.check_train(params_of("cpu-demo"), "HuggingFaceTB/SmolLM2-135M-Instruct")
    preflight.check_train(params_of("cpu-demo", train={"nproc_per_node": 2}), "x")  # gloo


def test_cuda_torch_without_a_visible_gpu(monkeypatch):
    fake_gpus(monkeypatch, count=0)
    message = one_line_error(preflight.check_train, params_of("qwen2.5-0.5b-1gpu"), QWEN_1_5B)
    assert "asks for a GPU, but CUDA sees none; check the driver (nvidia-smi)" in message


def test_fewer_gpus_than_processes(monkeypatch):
    seed = params_of("seed-qwen2.5-1.5b")
    n = seed.train.nproc_per_node
    fake_gpus(monkeypatch, A100, count=4)
    message = one_line_error(preflight.check_train, seed, QWEN_1_5B)
    assert f"train.nproc_per_node: {n} processes need {n} GPUs, 4 visible" in message
    assert "set train.nproc_per_node to at most 4" in message
    fake_gpus(monkeypatch, A100, count=8)
    preflight.check_train(seed, QWEN_1_5B)
    preflight.check_train(params_of("qwen2.5-1.5b-fsdp-1node"), QWEN_1_5B)  # auto = 8


def test_capability_for_explicit_bf16_and_flash_attention(monkeypatch):
    fake_gpus(monkeypatch, T4)
    bf16 = params_of("qwen2.5-0.5b-1gpu", model={"dtype": "bfloat16"})
    message = one_line_error(preflight.check_evaluate, bf16, "Qwen/Qwen2.5-0.5B-Instruct")
    assert "model.dtype: bfloat16 needs compute capability >= 8.0 (cuda:0 has 7.5" in message
    flash_attn_installed(monkeypatch)
    flash = params_of("qwen2.5-0.5b-1gpu", model={"attn_implementation": "flash_attention_2"})
    message = one_line_error(
        preflight.check_train, flash, "Qwen/Qwen2.5-0.5B-Instruct", kind=DeviceError
    )
    assert "model.attn_implementation: flash_attention_2 needs compute capability" in message
    preflight.check_train(params_of("qwen2.5-0.5b-1gpu"), "Qwen/Qwen2.5-0.5B-Instruct")
    fake_gpus(monkeypatch, A100)
    preflight.check_evaluate(bf16, "Qwen/Qwen2.5-0.5B-Instruct")
    preflight.check_train(flash, "Qwen/Qwen2.5-0.5B-Instruct")


def test_memory_per_gpu(monkeypatch):
    seed_on_one = params_of("seed-qwen2.5-1.5b", train={"nproc_per_node": 1})
    fake_gpus(monkeypatch, A10G)
    message = one_line_error(preflight.check_train, seed_on_one, QWEN_1_5B)
    assert re.search(r"estimated peak memory per GPU \d+\.\d GiB \(weights", message)
    assert "exceeds the 22.0 GiB of cuda:0 (NVIDIA A10G)" in message
    assert "lower train.micro_batch_size" in message
    preflight.check_train(params_of("qwen2.5-1.5b-lora-1gpu"), QWEN_1_5B)  # LoRA fits 24 GB
    preflight.check_evaluate(seed_on_one, QWEN_1_5B)
    huge_eval = params_of("seed-qwen2.5-1.5b", eval={"batch_size": 4096})
    message = one_line_error(preflight.check_evaluate, huge_eval, QWEN_1_5B)
    assert "lower eval.batch_size" in message
    fake_gpus(monkeypatch, A100)
    preflight.check_train(seed_on_one, QWEN_1_5B)


def test_sft_checks_its_own_batch(monkeypatch, tiny_model_dir):
    fake_gpus(monkeypatch, ("small", (8, 0), GiB // 2))
    message = one_line_error(preflight.check_sft, params_of("cpu-demo"), tiny_model_dir)
    assert "lower sft.batch_size, or set sft.enabled: false" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preflight.check_sft(params_of("cpu-demo"), tiny_model_dir)


def test_preset_show_prints_the_memory_estimate(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert preset_command.main(["show", "seed-qwen2.5-1.5b"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("# estimated peak memory per GPU (t"))
    params = params_of("seed-qwen2.5-1.5b")
    n = params.train.nproc_per_node
    expected = memory.train_estimate(
        KNOWN_SHAPES[QWEN_1_5B], memory.TrainSettings.from_params(params), world=n
    )
    assert line == f"# estimated peak memory per GPU (train, {n} processes): {expected.describe()}"
    assert "# estimated peak memory per GPU (evaluate): " in out
    assert out.startswith("data:")  # the YAML first, still parseable
    assert preset_command.main(["show", "qwen2.5-1.5b-fsdp-1node"]) == 0
    assert "(train, 8 processes)" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["train", "evaluate", "sft"])
def test_stages_run_preflight_before_any_work(stage, tmp_path, monkeypatch):
    """On CPU torch, each stage refuses a 1.5B model folder before reading data or weights."""
    monkeypatch.setattr(torch.version, "cuda", None)
    big = tmp_path / "big"
    big.mkdir()
    qwen = KNOWN_SHAPES[QWEN_1_5B]
    (big / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "hidden_size": qwen.hidden,
                "num_hidden_layers": qwen.layers,
                "intermediate_size": qwen.intermediate,
                "vocab_size": qwen.vocab,
                "num_attention_heads": qwen.heads,
                "num_key_value_heads": qwen.kv_heads,
            }
        )
    )
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config.default_params_dict()))
    out = tmp_path / "out"
    common = {"params": str(params), "model": str(big), "data": str(tmp_path / "missing.jsonl")}
    extra = {
        "train": {
            "out": str(out),
            "checkpoints": str(tmp_path / "c"),
            "log_dir": str(tmp_path / "l"),
        },
        "evaluate": {"metrics": str(out / "m.json"), "predictions": str(out / "p.jsonl")},
        "sft": {"out": str(out)},
    }[stage]
    main = {"train": train_stage.main, "evaluate": evaluate_stage.main, "sft": sft_stage.main}
    message = one_line_error(main[stage], argparse.Namespace(**common, **extra))
    assert message.startswith(f"{big}: a model of 1.54 B parameters")
    assert "is a CPU build; install the CUDA build of torch" in message
