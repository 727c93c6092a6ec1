"""Security rules: no remote code unless params allow it, weights only as safetensors, torch.load
only with weights_only=True, and the W&B API key never lands in a file a run writes."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest
import tiny
import yaml

from grpo import config, model
from grpo.gsm8k import make_record
from stages import _cli, base_model, train

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("grpo", "stages", "bench") for p in (REPO / d).rglob("*.py"))
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")
SENTINEL = "wandb-key-sentinel-0123456789abcdef0123456789abcdef"


def _calls():
    """(file:line, ast.Call) for every call in the project's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                yield f"{path.relative_to(REPO)}:{node.lineno}", node


def _is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_no_literal_trust_remote_code_true():
    assert REPO / "grpo" / "model.py" in SOURCES
    bad = [
        where
        for where, call in _calls()
        for kw in call.keywords
        if kw.arg == "trust_remote_code" and _is_true(kw.value)
    ]
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                bad += [
                    f"{path.relative_to(REPO)}:{node.lineno}"
                    for key, value in zip(node.keys, node.values, strict=True)
                    if isinstance(key, ast.Constant)
                    and key.value == "trust_remote_code"
                    and _is_true(value)
                ]
    assert bad == []


def test_every_torch_load_passes_weights_only_true():
    loads = [(where, call) for where, call in _calls() if ast.unparse(call.func) == "torch.load"]
    assert loads, "no torch.load found: the scan is looking at the wrong files"
    bad = [
        where
        for where, call in loads
        if not any(kw.arg == "weights_only" and _is_true(kw.value) for kw in call.keywords)
    ]
    assert bad == []
    imported = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in SOURCES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module == "torch"
        and any(alias.name == "load" for alias in node.names)
    ]
    assert imported == [], "`from torch import load` hides calls from this scan"


def _params(tmp: Path, model_dir: Path, **train_overrides) -> Path:
    raw = config.default_params_dict()
    raw["model"]["name"] = str(model_dir)
    raw["train"].update(train_overrides)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _assert_safetensors_only(folder: Path) -> None:
    names = [p.name for p in folder.rglob("*") if p.is_file()]
    assert "model.safetensors" in names
    assert [n for n in names if n.endswith(PICKLE_SUFFIXES)] == []


@pytest.mark.parametrize("allowed", [False, True], ids=["default-off", "params-on"])
def test_loader_takes_trust_remote_code_from_params(allowed, tmp_path, tiny_model_dir, monkeypatch):
    calls = []

    def spy(cls):
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            calls.append((cls.__name__, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    spy(model.AutoTokenizer)
    spy(model.AutoModelForCausalLM)
    raw = config.default_params_dict()
    assert raw["model"]["trust_remote_code"] is False  # the committed default
    params = _params(tmp_path, tiny_model_dir)
    if allowed:
        text = params.read_text().replace("trust_remote_code: false", "trust_remote_code: true")
        params.write_text(text)
    args = argparse.Namespace(params=params, out=tmp_path / "base")
    _cli.run("base_model", base_model.main, args)
    assert sorted(name for name, _ in calls) == ["AutoModelForCausalLM", "AutoTokenizer"]
    assert all(kwargs["trust_remote_code"] is allowed for _, kwargs in calls)
    model_kwargs = next(kwargs for name, kwargs in calls if name == "AutoModelForCausalLM")
    assert model_kwargs["use_safetensors"] is True  # a .bin file is never unpickled
    _assert_safetensors_only(tmp_path / "base")


def test_wandb_key_is_never_written(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A tiny training run with W&B offline and WANDB_API_KEY set: no file under the output,
    checkpoint, log or W&B folders, and nothing printed, holds the key."""
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    records = [make_record("train", i, {"question": q, "answer": a})
               for i, (q, a) in enumerate(tiny.GSM8K_ROWS["train"])]  # fmt: skip
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    params = _params(
        tmp_path,
        tiny_model_dir,
        num_steps=2,
        batch_size=2,
        num_generations=2,
        max_completion_length=4,
        micro_batch_size=4,
        save_every=1,
        wandb="offline",
    )
    run = tmp_path / "run"
    args = argparse.Namespace(  # strings, as argparse gives them
        params=str(params),
        model=str(tiny_model_dir),
        data=str(data),
        out=str(run / "grpo"),
        checkpoints=str(run / "checkpoints"),
        log_dir=str(run / "dvclive"),
    )
    _cli.run("train", train.main, args)
    _assert_safetensors_only(run / "grpo")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("offline-run" in str(p) for p in files), "W&B wrote nothing: the test is vacuous"
    assert [p for p in files if SENTINEL.encode() in p.read_bytes()] == []
    printed = capsys.readouterr()
    assert SENTINEL not in printed.out + printed.err
