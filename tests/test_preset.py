"""Presets: each resolves to a valid params set; applying one rewrites params.yaml in place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from grpo import config, preset
from grpo.config import Params
from grpo.schema import ConfigError
from stages import preset as preset_command

REPO = Path(__file__).resolve().parent.parent


def test_required_presets_exist():
    required = {"cpu-demo", "seed-qwen2.5-1.5b", "qwen2.5-0.5b-1gpu", "qwen2.5-1.5b-lora-1gpu"}
    assert required <= set(preset.names())


@pytest.mark.parametrize("name", preset.names())
def test_every_preset_validates_against_the_schema(name):
    merged = preset.merge(config.default_params_dict(), preset.load_overlay(name), name)
    Params.from_dict(merged)


def test_cpu_demo_is_the_committed_params():
    base = config.default_params_dict()
    assert preset.merge(base, preset.load_overlay("cpu-demo"), "cpu-demo") == base


def test_seed_preset_is_the_tutorial():
    t = preset.load_overlay("seed-qwen2.5-1.5b")["train"]
    assert (t["num_steps"], t["batch_size"], t["num_generations"]) == (500, 7, 12)
    assert (t["max_completion_length"], t["beta"], t["learning_rate"]) == (400, 0.04, 5e-6)
    assert (t["mu"], t["epsilon"]) == (1, 0.1)


def test_apply_keeps_comments_and_validates(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    preset.apply("seed-qwen2.5-1.5b", params)
    text = params.read_text()
    assert "# Every hyperparameter" in text
    loaded = yaml.safe_load(text)
    assert loaded["model"]["name"] == "Qwen/Qwen2.5-1.5B-Instruct"
    Params.from_dict(loaded)


def test_unknown_preset_and_key_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        preset.load_overlay("nope")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lr'"):
        preset.merge(config.default_params_dict(), {"train": {"lr": 1}}, "x")


BROKEN = {
    "missing": None,
    "syntax": "train:\n  learning_rate: [1,\n",
    "tab": "train:\n\tlearning_rate: 1.0\n",
    "duplicate": "train:\n  beta: 0.1\n  beta: 0.2\n",
}
BROKEN_MESSAGE = {
    "missing": "params.yaml: cannot read params file (No such file or directory); check",
    "syntax": "params.yaml:3:1: not valid YAML (expected the node content",
    "tab": "params.yaml:2:1: not valid YAML (found character '\\t' that cannot start any token)",
    "duplicate": "params.yaml:3:3: duplicate key 'beta' (first on line 2); remove one of them",
}


@pytest.mark.parametrize("action", ["show", "apply"])
@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_params_file_gives_one_line(kind, action, tmp_path, capsys):
    path = tmp_path / "params.yaml"
    if BROKEN[kind] is not None:
        path.write_text(BROKEN[kind])
    before = sorted(p.name for p in tmp_path.iterdir())
    code = preset_command.main([action, "cpu-demo", "--params", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert BROKEN_MESSAGE[kind] in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if BROKEN[kind] is not None:
        assert path.read_text() == BROKEN[kind]
