"""GPU checks of every GPU preset (`make test-gpu`), on random-init models of the real shapes.

Per preset: one GRPO step with its settings (gradient checkpointing, bf16 autocast, LoRA, its
micro-batch, G and completion length; 2 processes when the preset spans GPUs and 2+ are visible:
FSDP or DDP as it says) ends with a finite loss and changed trainable weights, and its peak GPU
memory stays within the preset's estimate. Per model: the lean decode loop gives the same tokens
as `model.generate` in fp32 (greedy and seeded sampling), and one evaluation batch runs on the
GPU within its estimate; the evaluate stage puts a saved model on the GPU. Fixtures and the step
worker: tests/gpu_fixtures.py.

Skipped without CUDA. `GRPO_GPU_TESTS_DEVICE=cpu` runs the same checks on the CPU with tiny shapes
and short completions (no memory check): a smoke test of the code paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import gpu_fixtures as fx
import pytest
import torch
import yaml

from grpo import config, device, memory, model, preset
from grpo.evaluate import evaluate
from grpo.fsutil import write_jsonl_atomic
from grpo.generation import generate, generation_config
from grpo.prompts import chat_prompt
from grpo.sampling import Sampling, row_seeds, stream_uniforms
from stages import evaluate as evaluate_stage

SMOKE = fx.smoke()
if SMOKE:
    DEVICE: torch.device | None = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda", 0)
else:
    DEVICE = None

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE is None,
        reason=f"needs CUDA (torch.cuda.is_available() is False); {fx.DEVICE_ENV}=cpu runs a "
        f"CPU smoke test",
    ),
]

REPO = Path(__file__).resolve().parent.parent
TOKENS = fx.TINY_TOKENS if SMOKE else None  # None: the presets' own lengths
DECODE_TOKENS = fx.TINY_TOKENS if SMOKE else 64
NEAR_TIE = 1e-4
"""Largest gap between two tokens' scores at which the decoders may pick differently: far above
fp32 rounding, below what a real bug moves (decode positions off by one move random-init
Qwen2.5-0.5B's logits by ~1e-3 to 2e-2)."""

PRESETS = fx.gpu_presets()
MODELS = sorted(fx.SHAPES)


def _processes(name: str) -> int:
    """2 for a preset that spans GPUs when 2+ are visible (gloo processes in the smoke run)."""
    if fx.preset_params(name).train.nproc_per_node == 1:
        return 1
    if SMOKE:
        return 2
    return 2 if torch.cuda.device_count() >= 2 else 1


_STEPS: dict[str, list[dict]] = {}


def step_results(name: str, tmp_path_factory) -> list[dict]:
    """Each rank's result of one GRPO step of preset `name` (run once, in its own processes, so
    the peak memory is the step's alone)."""
    if name not in _STEPS:
        _STEPS[name] = _launch(name, tmp_path_factory.mktemp(name))
    return _STEPS[name]


def _launch(name: str, workdir: Path) -> list[dict]:
    nproc = _processes(name)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if SMOKE:
        env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(fx.__file__))]
    if nproc > 1:  # the launcher the train stage uses
        cmd = [sys.executable, "-m", "stages.launch", "--nproc-per-node", str(nproc), "--", *cmd]
    cmd += ["--preset", name, "--out", str(workdir / "result.json")]
    if TOKENS:
        cmd += ["--tokens", str(TOKENS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((workdir / f"result.json.{r}").read_text()) for r in range(nproc)]


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@pytest.mark.parametrize("name", PRESETS)
def test_grpo_step_of_preset(name, tmp_path_factory):
    results = step_results(name, tmp_path_factory)
    first = results[0]
    print(
        f"\n{name}: {first['world']} process(es) ({first['strategy']}) on {first['device']}, "
        f"{first['batch_size']} prompts x G={first['num_generations']}, "
        f"{first['max_completion_length']} tokens, micro-batch {first['micro_batch_size']}, "
        f"checkpointing {first['checkpointing_on']}, autocast {first['autocast']}: "
        f"loss {first['loss']:.4g}, grad norm {first['grad_norm']:.4g}, "
        f"generation {first['generation_seconds']:.1f} s, "
        f"scoring {first['scoring_seconds']:.1f} s, update {first['update_seconds']:.1f} s, "
        f"peak {_gib(first['peak_bytes'])}"
    )
    params = fx.preset_params(name)
    assert math.isfinite(first["loss"]) and math.isfinite(first["grad_norm"])
    assert first["grad_norm"] > 0
    assert first["groups_with_reward_spread"] > 0, "no group had a reward spread: nothing learnt"
    for r in results:
        assert r["checkpointing_on"] == params.train.gradient_checkpointing
        native = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) >= (8, 0)
        assert r["autocast"] == native  # bf16 autocast where bf16 is native (Ampere on)
        if params.model.lora_rank > 0:
            assert 0 < r["trainable_tensors"] == r["lora_tensors"] < r["parameter_tensors"]
            # B starts at zero, so A gets no gradient in the first step (and B all of it)
            assert all(".lora_A." in n for n in r["unchanged"]), r["unchanged"]
            assert len(r["unchanged"]) <= r["trainable_tensors"] // 2
        else:
            assert r["unchanged"] == [], f"rank {r['rank']}: weights not updated"
            assert r["trainable_tensors"] == r["parameter_tensors"]


def train_estimate(name: str, world: int) -> memory.Estimate:
    """`grpo.memory`'s per-GPU estimate of the step that ran (the one `stages.preset show`
    prints for the preset, at this world size and completion length)."""
    params = fx.step_params(name, TOKENS)
    settings = memory.TrainSettings.from_params(params)
    shape = memory.shape_for(params.model.name)
    return memory.train_estimate(shape, settings, world=world, bf16=device.bf16_native(DEVICE))


@pytest.mark.parametrize("name", MODELS)
def test_estimates_are_for_the_shape_that_runs(name):
    """grpo.memory's shape of the preset's model is the one these tests build."""
    built = memory.shape_from_config(fx.qwen2_config(name, tiny_shape=False).to_dict())
    assert memory.shape_for(name) == built
    assert built.parameters() == fx.PARAMETERS[name]


@pytest.mark.parametrize("name", PRESETS)
def test_peak_memory_within_estimate(name, tmp_path_factory):
    if DEVICE.type != "cuda":
        pytest.skip("peak GPU memory needs CUDA (CPU smoke run)")
    results = step_results(name, tmp_path_factory)
    measured = max(r["peak_bytes"] for r in results)
    estimate = train_estimate(name, results[0]["world"])
    print(f"\n{name}: peak {_gib(measured)} per GPU; estimate {estimate.describe()}")
    assert measured <= estimate.total


@contextlib.contextmanager
def fp32_matmuls():
    """Inside: CUDA matmuls in full fp32 (not rounded to TF32, whatever the caller set)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _near_tie(lm, gen, row: int, t: int, sampling: Sampling, seed: int, a: int, b: int) -> float:
    """|score(a) - score(b)| of row `row`'s step `t`, from a fresh forward of its prompt and
    its first t tokens: the logits (greedy) or logits / T + the row's Gumbel noise (sampled)."""
    prompt = gen.prompt_ids[row][gen.prompt_mask[row].bool()]
    ids = torch.cat([prompt, gen.completion_ids[row, :t]])[None]  # (1, P + t)
    logits = lm(input_ids=ids).logits[0, -1].float()  # (V,)
    if sampling.temperature > 0:
        vocab = logits.shape[-1]
        u = stream_uniforms(torch.tensor([seed]), torch.tensor([t * vocab]), vocab)[0]  # (V,)
        gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))
        logits = logits / sampling.temperature + gumbel.to(logits.device)
    return abs(float(logits[a] - logits[b]))


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name", MODELS)
def test_lean_decode_matches_generate_fp32(name, temperature):
    fx.free_memory()
    tokenizer = fx.tokenizer_once()
    lm = fx.build_model(name, tiny_shape=SMOKE, device=DEVICE, dtype=torch.float32)
    system = fx.preset_params(PRESETS[0]).prompt.system
    prompts = [chat_prompt(tokenizer, r["question"], system) for r in fx.records("test", 4)]
    G = 2
    eos = model.eos_token_ids(lm, tokenizer)
    cfg = generation_config(
        max_new_tokens=DECODE_TOKENS, eos_ids=eos, pad_id=tokenizer.pad_token_id
    )
    sampling = Sampling(temperature=temperature)
    seeds = row_seeds(0, 0, range(len(prompts) * G))
    with torch.no_grad(), fp32_matmuls():
        out = {
            decoder: generate(
                lm,
                tokenizer,
                prompts,
                cfg,
                sampling=sampling,
                seeds=seeds,
                num_return_sequences=G,
                decoder=decoder,
            )
            for decoder in ("lean", "hf")
        }
        lean, hf = out["lean"], out["hf"]
        assert lean.completion_ids.device.type == DEVICE.type
        same, ties = 0, []
        for row in range(len(seeds)):
            a = lean.completion_ids[row, : lean.num_tokens[row]].tolist()
            b = hf.completion_ids[row, : hf.num_tokens[row]].tolist()
            if a == b:
                same += 1
                continue
            t = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            assert t is not None, f"row {row}: one decoder stopped early ({len(a)} vs {len(b)})"
            gap = _near_tie(lm, hf, row, t, sampling, seeds[row], a[t], b[t])
            ties.append((row, t, gap))
    print(f"\n{name} fp32 {sampling}: {same}/{len(seeds)} rows identical, near-ties {ties}")
    assert all(gap < NEAR_TIE for _, _, gap in ties), f"tokens differ beyond a near-tie: {ties}"
    assert same >= len(seeds) // 2
    del lm
    fx.free_memory()


@pytest.mark.parametrize("name", MODELS)
def test_evaluation_batch_on_device(name):
    fx.free_memory()
    params = next(p for p in map(fx.preset_params, PRESETS) if p.model.name == name)
    dtype = device.model_dtype(params.model.dtype, DEVICE)  # as the evaluate stage picks them
    attn = device.attention(params.model.attn_implementation, DEVICE)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        baseline = torch.cuda.memory_allocated(DEVICE)
    lm = fx.build_model(name, tiny_shape=SMOKE, device=DEVICE, dtype=dtype, attn=attn)
    tokenizer = fx.tokenizer_once()
    e = params.eval
    max_new_tokens = fx.TINY_TOKENS if SMOKE else e.max_new_tokens
    metrics, predictions = evaluate(
        lm,
        tokenizer,
        fx.records("test", e.batch_size),
        system=params.prompt.system,
        batch_size=e.batch_size,
        max_new_tokens=max_new_tokens,
        temperature=e.temperature,
        seed=e.seed,
        eos_ids=model.eos_token_ids(lm, tokenizer),
    )
    print(
        f"\n{name} eval batch of {e.batch_size} on {DEVICE} ({dtype}, {attn}): "
        f"{metrics['tokens_per_second']:.0f} tokens/s, "
        f"mean length {metrics['mean_completion_tokens']:.0f}"
    )
    assert metrics["n"] == len(predictions) == e.batch_size
    assert all(1 <= p["completion_tokens"] <= max_new_tokens for p in predictions)
    assert {p.device.type for p in lm.parameters()} == {DEVICE.type}
    assert DEVICE.type == "cpu" or dtype == torch.bfloat16
    if DEVICE.type == "cuda":  # against what `stages.preset show` prints for evaluate
        measured = torch.cuda.max_memory_allocated(DEVICE) - baseline
        shape = memory.shape_for(name)
        size = torch.finfo(dtype).bits // 8
        estimate = memory.eval_estimate(shape, e.batch_size, max_new_tokens, weight_bytes=size)
        print(f"{name} eval: peak {_gib(measured)}; estimate {estimate.describe()}")
        assert measured <= estimate.total
    del lm
    fx.free_memory()


def test_evaluate_stage_puts_the_model_on_the_gpu(tmp_path):
    """The evaluate stage end to end on a saved model folder of the 0.5B preset's shape: it
    loads the model where `grpo.device` says and evaluates one batch there."""
    name = "qwen2.5-0.5b-1gpu"
    raw = preset.merge(config.default_params_dict(), preset.load_overlay(name), name)
    if SMOKE:
        raw["eval"]["max_new_tokens"] = fx.TINY_TOKENS
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    params = config.Params.from_dict(raw)
    weights = device.model_dtype(params.model.dtype, DEVICE)
    lm = fx.build_model(params.model.name, tiny_shape=SMOKE, device=DEVICE, dtype=weights)
    folder = tmp_path / "model"
    lm.save_pretrained(folder, safe_serialization=True)
    fx.tokenizer_once().save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in lm.parameters())
    del lm
    data = tmp_path / "eval.jsonl"
    write_jsonl_atomic(data, fx.records("test", params.eval.batch_size))
    args = argparse.Namespace(
        params=str(params_file),
        model=str(folder),
        data=str(data),
        metrics=str(tmp_path / "metrics.json"),
        predictions=str(tmp_path / "predictions.jsonl"),
    )
    fx.free_memory()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
        baseline = torch.cuda.memory_allocated(DEVICE)
    evaluate_stage.main(args)
    metrics = json.loads((tmp_path / "details" / "metrics.json").read_text())  # timings, n
    print(f"\nevaluate stage ({name} shape): {metrics['tokens_per_second']:.0f} tokens/s")
    assert metrics["n"] == params.eval.batch_size
    if DEVICE.type == "cuda":
        assert torch.cuda.max_memory_allocated(DEVICE) - baseline >= size  # weights were there
    fx.free_memory()
