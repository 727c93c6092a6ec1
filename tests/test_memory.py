"""Per-GPU memory estimates: model shapes, the train/eval formula's parts, unknown models."""

from __future__ import annotations

import json

import pytest
from test_preflight import QWEN_1_5B, params_of
from transformers import AutoModelForCausalLM

from grpo import memory
from grpo.memory import KNOWN_SHAPES, GiB


@pytest.mark.parametrize(
    ("name", "parameters"),
    [  # the counts the model cards give
        ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
        (QWEN_1_5B, 1_543_714_304),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", 134_515_008),
    ],
)
def test_known_shapes_count_the_real_parameters(name, parameters):
    assert KNOWN_SHAPES[name].parameters() == parameters


def test_shape_of_a_model_folder_counts_its_parameters(tiny_model_dir):
    shape = memory.shape_for(tiny_model_dir)
    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert shape.parameters() == sum(p.numel() for p in real.parameters())
    assert memory.shape_for("no-such-org/model") is None


def test_memory_estimate_parts():
    shape = KNOWN_SHAPES[QWEN_1_5B]
    seed = memory.TrainSettings.from_params(params_of("seed-qwen2.5-1.5b"))
    P = shape.parameters()
    ddp = memory.train_estimate(shape, seed, world=8)
    assert ddp.persistent["weights"] == 4 * P and ddp.persistent["optimizer"] == 8 * P
    assert ddp.persistent["reference"] == 4 * P and ddp.persistent["DDP buckets"] == 4 * P
    rows, seq = 11, memory.PROMPT_TOKENS + 400  # 7 x 12 rows over 8 ranks: 11 at most
    assert ddp.phases["rollout"]["KV cache"] == rows * seq * 28 * 2 * 256 * 2
    fsdp = memory.train_estimate(
        shape, seed.__class__(**{**seed.__dict__, "strategy": "fsdp"}), world=8
    )
    assert fsdp.persistent["weights"] == 4 * P / 8 and fsdp.total < ddp.total / 3
    no_ckpt = seed.__class__(**{**seed.__dict__, "gradient_checkpointing": False})
    assert (
        memory.train_estimate(shape, no_ckpt, world=8).phases["update"]["activations"]
        > 10 * ddp.phases["update"]["activations"]
    )
    lora = memory.TrainSettings.from_params(params_of("qwen2.5-1.5b-lora-1gpu"))
    est = memory.train_estimate(shape, lora)
    assert est.persistent["weights"] < 2.1 * P and est.persistent["reference"] == 0
    assert est.total < ddp.total / 3
    text = ddp.describe()
    assert text.startswith(f"{ddp.total / GiB:.1f} GiB (weights 5.8 + optimizer 11.5")


def test_estimate_of_an_unknown_model_says_what_it_needs(tmp_path):
    params = params_of("cpu-demo")
    (line,) = memory.preset_estimates(params, "some-org/unknown-model")
    assert "needs the config.json of 'some-org/unknown-model'" in line
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "intermediate_size": 128,
                "vocab_size": 1000,
                "num_attention_heads": 4,
            }
        )
    )
    assert "(train, 1 process)" in memory.preset_estimates(params, str(tmp_path))[1]
