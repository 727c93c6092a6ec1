"""params.yaml schema: strictness, coercion, range checks, read tracking."""

from __future__ import annotations

import copy

import pytest
import yaml

from grpo import config, schema
from grpo.config import Params
from grpo.schema import ConfigError


@pytest.fixture
def raw():
    return config.default_params_dict()


def test_committed_params_are_valid(raw):
    Params.from_dict(raw)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r["eval"].update(batch_sise=4),
            "unknown key 'eval.batch_sise'; did you mean 'eval.batch_size'",
        ),
        (lambda r: r["eval"].pop("batch_size"), "missing key 'eval.batch_size'"),
        (lambda r: r.update(evall={}), "unknown section 'evall'; did you mean 'eval'"),
        (lambda r: r.pop("model"), "model: missing section"),
        (lambda r: r["eval"].update(temperature="fast"), "eval.temperature: expected a number"),
        (lambda r: r["eval"].update(batch_size=2.5), "eval.batch_size: expected an integer"),
        (lambda r: r["eval"].update(batch_size=True), "eval.batch_size: expected an integer"),
        (lambda r: r["model"].update(trust_remote_code="yes"), "expected true or false"),
        (lambda r: r["model"].update(dtype="fp8"), "model.dtype: must be one of"),
        (lambda r: r["eval"].update(max_new_tokens=0), "eval.max_new_tokens: must be >= 1"),
        (lambda r: r["data"].update(eval_size=-1), "data.eval_size: must be > 0 or null"),
        (lambda r: r["data"].update(mirrors="x"), "data.mirrors: expected a list"),
        (lambda r: r["reward"].update(format_mode="loose"), "reward.format_mode: must be one of"),
    ],
)
def test_bad_params_give_one_line_errors(raw, edit, message):
    bad = copy.deepcopy(raw)
    edit(bad)
    with pytest.raises(ConfigError) as err:
        Params.from_dict(bad)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("processes", "counted", "message"),
    [
        (7, "", "fewer than 7 processes"),
        (8, "nproc_per_node=", "fewer than nproc_per_node=8 processes"),
    ],
)
def test_batch_split_needs_a_row_per_process(raw, processes, counted, message):
    raw["train"].update(batch_size=3, num_generations=2, nproc_per_node=1)
    cfg = Params.from_dict(raw).train
    config.check_batch_split(cfg, 6, counted)  # 6 rows: one for each of 6 processes
    with pytest.raises(ConfigError) as err:
        config.check_batch_split(cfg, processes, counted)
    assert str(err.value) == (
        f"params.yaml: train.batch_size: 3 prompts x 2 generations = 6 rows, {message}; set "
        "train.batch_size to 4 or more, or lower train.nproc_per_node"
    )


def test_float_strings_from_dvc_exp_run_are_coerced(raw):
    raw["eval"]["temperature"] = "7e-01"  # what `dvc exp run -S` writes for small floats
    assert Params.from_dict(raw).eval.temperature == pytest.approx(0.7)


def test_load_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("eval: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_reads_are_tracked_but_validation_and_to_dict_are_not(raw, tmp_path, monkeypatch):
    schema._READ.clear()
    params = Params.from_dict(raw)
    assert schema.read_keys() == []
    params.eval.to_dict()
    assert schema.read_keys() == []
    _ = params.eval.max_new_tokens
    assert schema.read_keys() == ["eval.max_new_tokens"]
    monkeypatch.setenv(schema.TRACE_ENV, str(tmp_path))
    schema.write_trace("evaluate")
    assert yaml.safe_load((tmp_path / "evaluate.json").read_text()) == ["eval.max_new_tokens"]


def _dvc_stage_params() -> dict[str, list[str]]:
    from pathlib import Path

    stages = yaml.safe_load((Path(__file__).parent.parent / "dvc.yaml").read_text())["stages"]
    return {name: (s.get("do") or s).get("params", []) for name, s in stages.items()}


def test_dvc_yaml_params_exist_in_the_schema_and_cover_it(raw):
    known = {f"{section}.{key}" for section, keys in raw.items() for key in keys}
    listed = {key for keys in _dvc_stage_params().values() for key in keys}
    assert listed - known == set(), "dvc.yaml lists keys params.yaml does not have"
    assert known - listed == set(), "params.yaml has keys no stage declares (dead hyperparameters)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  beta: 0.1\n  beta: 0.2\n",
            "p.yaml:3:3: duplicate key 'beta' (first on line 2)",
        ),
        ("a: 1\nb:\n\tc: 2\n", "p.yaml:3:1: not valid YAML (found character '\\t'"),
        ("a: 1\nb: [1,\n", "p.yaml:3:1: not valid YAML (expected the node content"),
        (b"a: caf\xe9\n", "p.yaml: cannot read params file ("),
    ],
    ids=["duplicate-key", "tab", "syntax", "not-utf8"],
)
def test_yaml_errors_keep_file_and_line(text, message, tmp_path):
    path = tmp_path / "p.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=r"; (fix|remove|check)") as info:
        config.load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
