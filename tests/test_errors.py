"""Bad input: every case ends its stage with exit code 2 and ONE line on stderr that names the
file or params key and says how to fix it, and leaves nothing behind in the folder it writes to.

One table of cases (data, params, model, disk), each built in a temporary folder and run through
the real stage entry point in-process (`stages._cli.run`, as `python -m stages.<stage>` does);
`test_real_cli_exit_code` runs two of them as real subprocesses.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tiny
import yaml

from grpo import config, eval_results, fsutil, gsm8k
from grpo.evaluate import summarize
from stages import _cli, base_model, evaluate, prepare, report, sft, train

REPO = Path(__file__).resolve().parents[1]
STAGES = {
    "prepare": prepare,
    "base_model": base_model,
    "sft": sft,
    "train": train,
    "evaluate": evaluate,
    "report": report,
}
FIX = re.compile(
    r"; (fix|add|remove|drop|set|use|write|check|connect|rename|make|re-create|rerun|run|give|"
    r"did you mean)\b"
)
"""The fix clause every error line carries: `; ` then an imperative (or a suggested key)."""


def _params(tmp: Path, model_dir: Path) -> dict:
    """Valid params reading the GSM8K fixture mirror in `tmp/gsm8k` (no hub) and a tiny model."""
    raw = config.default_params_dict()
    raw["data"].update(hub_id="", mirrors=[str(tmp / "gsm8k")], train_size=None, eval_size=2)
    raw["model"]["name"] = str(model_dir)
    return raw


def _records(tmp: Path, split: str) -> Path:
    """The prepared records of a fixture split, as the prepare stage writes them."""
    path = tmp / f"{split}-records.jsonl"
    rows = [{"question": q, "answer": a} for q, a in tiny.GSM8K_ROWS[split]]
    _lines(path, *(json.dumps(gsm8k.make_record(split, i, r)) for i, r in enumerate(rows)))
    return path


def _evaluated(tmp: Path, label: str) -> tuple[str, Path, Path]:
    """A report `--model` of two questions, one right, as the evaluate stage writes them."""
    predictions = [
        {"id": f"test-{i:05d}", "strict_correct": i == 0, "lenient_correct": i == 0}
        for i in range(2)
    ]
    graded = {"gold": "1", "strict_answer": None, "lenient_answer": None, "well_formed": True}
    graded |= {"completion_tokens": 5, "truncated": False}
    metrics = summarize([p | graded for p in predictions], seconds=1.0, temperature=0.0)
    folder = tmp / "evaluated"
    (folder / "details").mkdir(parents=True, exist_ok=True)
    _lines(folder / f"{label}.jsonl", *map(json.dumps, predictions))
    (folder / f"{label}.json").write_text(json.dumps(eval_results.headline(metrics)))
    (folder / "details" / f"{label}.json").write_text(json.dumps(metrics))
    return label, folder / f"{label}.json", folder / f"{label}.jsonl"


def _args(stage: str, tmp: Path, model_dir: Path) -> dict:
    if stage == "evaluate":
        return {
            "model": model_dir,
            "data": _records(tmp, "test"),
            "metrics": tmp / "metrics" / "base.json",
            "predictions": tmp / "metrics" / "base.jsonl",
        }
    if stage == "report":
        return {
            "model": [_evaluated(tmp, "base"), _evaluated(tmp, "grpo")],
            "train_log": tmp / "log",
            "md": tmp / "report" / "report.md",
            "png": tmp / "report" / "report.png",
            "plots": None,
        }
    if stage == "train":
        return {
            "model": model_dir,
            "data": _records(tmp, "train"),
            "out": tmp / "out",
            "checkpoints": tmp / "checkpoints",
            "log_dir": tmp / "log",
        }
    if stage == "sft":
        return {"model": model_dir, "data": tmp / "gsm8k" / "train.jsonl", "out": tmp / "out"}
    return {"out": tmp / "out"}


def _lines(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _append(path: Path, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")


def _set(section: str, key: str, value):
    def edit(ctx: Ctx) -> None:
        ctx.params[section][key] = value

    return edit


def _rename(section: str, key: str, new: str):
    def edit(ctx: Ctx) -> None:
        ctx.params[section][new] = ctx.params[section].pop(key)

    return edit


def _drop(section: str, key: str):
    def edit(ctx: Ctx) -> None:
        del ctx.params[section][key]

    return edit


@dataclass
class Ctx:
    """What a case edits: the temp folder, the params, the stage arguments, monkeypatch."""

    tmp: Path
    params: dict
    args: dict[str, Path]
    model_dir: Path
    monkeypatch: pytest.MonkeyPatch


def _train_all_in_test(ctx: Ctx) -> None:
    shutil.copy(ctx.tmp / "gsm8k" / "test.jsonl", ctx.tmp / "gsm8k" / "train.jsonl")


def _duplicate_row(ctx: Ctx) -> None:
    first = (ctx.tmp / "gsm8k" / "train.jsonl").read_text().splitlines()[0]
    _append(ctx.tmp / "gsm8k" / "train.jsonl", first)


def _hub_without_mirror(ctx: Ctx) -> None:
    ctx.params["data"].update(hub_id="openai/gsm8k", mirrors=[])


def _missing_mirror(ctx: Ctx) -> None:
    ctx.params["data"]["mirrors"] = [str(ctx.tmp / "no-such-folder")]


def _auto_procs_on_eight_gpus(ctx: Ctx) -> None:
    ctx.params["train"].update(nproc_per_node="auto", batch_size=3, num_generations=2)
    ctx.monkeypatch.setattr(train.distributed, "resolve_nproc", lambda value: 8)

    def launch(nproc):
        raise AssertionError("workers launched before the batch split was checked")

    ctx.monkeypatch.setattr(train, "launch", launch)


def _nan_starting_model(ctx: Ctx) -> None:
    """models/sft as a diverged warm-up would have left it: one weight NaN."""
    from safetensors.torch import load_file, save_file

    folder = ctx.tmp / "nan-model"
    shutil.copytree(ctx.model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    ctx.args["model"] = folder


def _sft_diverges(ctx: Ctx) -> None:
    """A finite but absurd learning rate: the first update blows the weights up."""
    ctx.params["sft"].update(
        enabled=True, learning_rate=1e30, num_examples=4, batch_size=2, epochs=2, warmup_steps=0
    )
    rows = [json.loads(line) for line in ctx.args["data"].read_text().splitlines()]
    records = [gsm8k.make_record("train", i, row) for i, row in enumerate(rows)]
    ctx.args["data"] = ctx.tmp / "train.jsonl"
    _lines(ctx.args["data"], *(json.dumps(r) for r in records))


def _sft_more_examples_than_records(ctx: Ctx) -> None:
    _sft_diverges(ctx)
    ctx.params["sft"].update(learning_rate=1e-4, num_examples=11)


def _mirror_is_a_file(ctx: Ctx) -> None:
    ctx.params["data"]["mirrors"] = [str(ctx.tmp / "gsm8k" / "train.jsonl")]


def _not_utf8_line(ctx: Ctx) -> None:
    with open(ctx.tmp / "gsm8k" / "train.jsonl", "ab") as fh:
        fh.write(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')


def _model(name: str | Callable[[Ctx], str]):
    def edit(ctx: Ctx) -> None:
        ctx.params["model"]["name"] = name(ctx) if callable(name) else name

    return edit


def _no_weights(ctx: Ctx) -> str:
    folder = ctx.tmp / "m"
    folder.mkdir()
    shutil.copy(ctx.model_dir / "config.json", folder)
    return str(folder)


def _corrupt_safetensors(ctx: Ctx) -> str:
    folder = ctx.tmp / "m"
    shutil.copytree(ctx.model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return str(folder)


def _unsupported_gguf(ctx: Ctx) -> str:
    import gguf

    path = ctx.tmp / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_context_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _out_under_a_file(ctx: Ctx) -> None:
    (ctx.tmp / "blocker").write_text("a file, not a folder")
    ctx.args["out"] = ctx.tmp / "blocker" / "out"


def _sft_enabled(ctx: Ctx) -> None:
    """sft on, reading prepared records (the default params copy the model instead)."""
    _sft_diverges(ctx)
    ctx.params["sft"]["learning_rate"] = 1e-4


def _sft_first_record(line: str):
    """sft on, `line` as the first record (sft reads the first sft.num_examples)."""

    def edit(ctx: Ctx) -> None:
        _sft_enabled(ctx)
        path = ctx.args["data"]
        path.write_text(line + "\n" + path.read_text())

    return edit


def _arg(key: str, value: Callable[[Ctx], object]):
    def edit(ctx: Ctx) -> None:
        ctx.args[key] = value(ctx)

    return edit


def _metrics_text(label: str, text: str):
    def edit(ctx: Ctx) -> None:
        (ctx.tmp / "evaluated" / f"{label}.json").write_text(text)

    return edit


def _metrics_edit(label: str, change: Callable[[dict], None], details: bool = True):
    """Change the metrics JSON of `label` and (with `details`) its details JSON alike."""

    def edit(ctx: Ctx) -> None:
        path = ctx.tmp / "evaluated" / f"{label}.json"
        for file in (path, eval_results.details_path(path)) if details else (path,):
            metrics = json.loads(file.read_text())
            change(metrics)
            file.write_text(json.dumps(metrics))

    return edit


def _remove(relative: str):
    def edit(ctx: Ctx) -> None:
        (ctx.tmp / relative).unlink()

    return edit


def _metrics_under_a_file(ctx: Ctx) -> None:
    (ctx.tmp / "blocker").write_text("a file, not a folder")
    ctx.args["metrics"] = ctx.tmp / "blocker" / "base.json"


@dataclass
class Case:
    id: str
    stage: str
    edit: Callable[[Ctx], None]
    expect: tuple[str, ...]
    """Substrings of the error line ({tmp} = the temp folder): what is wrong and where, the fix."""
    before_work: bool = True  # found before any model work (checked: fails within seconds)


T, E = "{tmp}/gsm8k/train.jsonl", "{tmp}/gsm8k/test.jsonl"
CASES = [
    # data (stage prepare, reading the mirror folder {tmp}/gsm8k)
    Case("malformed-json", "prepare", lambda c: _append(c.tmp / "gsm8k/train.jsonl", "{oops"),
         (f"{T}:11: malformed JSON", "fix or remove the line")),
    Case("missing-question", "prepare",
         lambda c: _append(c.tmp / "gsm8k/train.jsonl", '{"answer": "#### 1"}'),
         (f"{T}:11: missing 'question'", "fix or remove the line")),
    Case("missing-answer", "prepare",
         lambda c: _append(c.tmp / "gsm8k/test.jsonl", '{"question": "What is 1+1?"}'),
         (f"{E}:7: missing 'answer'", "fix or remove the line")),
    Case("no-####", "prepare",
         lambda c: _append(c.tmp / "gsm8k/train.jsonl", '{"question": "q", "answer": "It is 4"}'),
         (f"{T}:11: no '####'", "fix or remove the line")),
    Case("non-numeric-gold", "prepare",
         lambda c: _append(c.tmp / "gsm8k/train.jsonl", '{"question": "q", "answer": "#### four"}'),
         (f"{T}:11: gold answer 'four' is not a number", "fix or remove the line")),
    Case("empty-file", "prepare", lambda c: _lines(c.tmp / "gsm8k/test.jsonl"),
         (f"{E}: no rows", "write one JSON object")),
    Case("empty-split-after-filtering", "prepare", _train_all_in_test,
         ("mirror:{tmp}/gsm8k: all 6 train questions also occur in the test split",
          "check that train.jsonl holds the official train split")),
    Case("train-size-too-large", "prepare", _set("data", "train_size", 50),
         ("data.train_size: 50 exceeds the 10 train problems", "set it to at most 10 or null")),
    Case("duplicate-rows", "prepare", _duplicate_row,
         (f"{T}:11: duplicate of line 1", "remove one of them")),
    Case("missing-mirror", "prepare", _missing_mirror,
         ("mirror {tmp}/no-such-folder does not exist", "add a folder with train.jsonl/test.jsonl",
          "data.mirrors")),
    Case("hub-offline-no-mirror", "prepare", _hub_without_mirror,
         ("hub not used: HF_HUB_OFFLINE is set", "connect to the hub or add a folder",
          "data.mirrors")),
    # params (stage prepare validates every section before it reads anything)
    Case("unknown-key", "prepare", _rename("train", "learning_rate", "learning_rat"),
         ("params.yaml: unknown key 'train.learning_rat'",
          "did you mean 'train.learning_rate'? rename it")),
    Case("missing-key", "prepare", _drop("train", "beta"),
         ("params.yaml: missing key 'train.beta'", "add it to params.yaml")),
    Case("wrong-type", "prepare", _set("train", "learning_rate", "fast"),
         ("params.yaml: train.learning_rate: expected a number, got 'fast'", "write a number")),
    Case("one-generation", "prepare", _set("train", "num_generations", 1),
         ("params.yaml: train.num_generations: must be >= 2", "set it to 2 or more")),
    Case("fewer-rows-than-processes", "prepare",
         lambda c: c.params["train"].update(nproc_per_node=8, batch_size=3, num_generations=2),
         ("params.yaml: train.batch_size: 3 prompts x 2 generations = 6 rows, fewer than "
          "nproc_per_node=8", "set train.batch_size to 4 or more")),
    Case("fewer-rows-than-processes-auto", "train", _auto_procs_on_eight_gpus,
         ("params.yaml: train.batch_size: 3 prompts x 2 generations = 6 rows, fewer than 8 "
          "processes", "set train.batch_size to 4 or more")),
    Case("negative-beta", "prepare", _set("train", "beta", -0.1),
         ("params.yaml: train.beta: must be >= 0, got -0.1", "fix it in params.yaml")),
    Case("zero-completion-length", "prepare", _set("train", "max_completion_length", 0),
         ("params.yaml: train.max_completion_length: must be >= 1, got 0", "fix it")),
    Case("sft-infinite-learning-rate", "prepare", _set("sft", "learning_rate", float("inf")),
         ("params.yaml: sft.learning_rate: must be a finite number", "fix it in params.yaml")),
    Case("sft-nan-weight-decay", "prepare", _set("sft", "weight_decay", float("nan")),
         ("params.yaml: sft.weight_decay: must be a finite number", "fix it in params.yaml")),
    Case("sft-negative-weight-decay", "prepare", _set("sft", "weight_decay", -1.0),
         ("params.yaml: sft.weight_decay: must be >= 0", "fix it in params.yaml")),
    Case("nan-string-from-exp-run", "prepare", _set("train", "beta", "nan"),
         ("params.yaml: train.beta: must be a finite number", "fix it in params.yaml")),
    Case("sft-seed-beyond-64-bits", "prepare", _set("sft", "seed", 2**70),
         ("params.yaml: sft.seed: must be in [0, 2**63), got 1180591620717411303424", "fix it")),
    Case("negative-seed", "prepare", _set("train", "seed", -1),
         ("params.yaml: train.seed: must be in [0, 2**63), got -1", "fix it")),
    Case("empty-model-name", "prepare", _set("model", "name", ""),
         ("params.yaml: model.name: is empty", "set it to a hub id or a folder")),
    Case("sft-diverges", "sft", _sft_diverges,
         ("sft: non-finite", "nothing was written", "set a lower sft.learning_rate"),
         before_work=False),
    Case("train-record-without-gold", "train",
         lambda c: _append(c.args["data"], '{"id": "train-99999", "question": "q"}'),
         ("{tmp}/train-records.jsonl:11: missing 'gold' or not a string", "re-create the file")),
    Case("train-from-a-nan-model", "train", _nan_starting_model,
         ("{tmp}/nan-model: weight", "is not finite", "sft.learning_rate")),
    Case("sft-more-examples-than-records", "sft", _sft_more_examples_than_records,
         ("params.yaml: sft.num_examples: 11 exceeds the 10 records in {tmp}/train.jsonl",
          "set it to at most 10")),
    Case("mirror-is-a-file", "prepare", _mirror_is_a_file,
         (f"mirror {T} is a file, not a folder", "data.mirrors")),
    Case("not-utf8-line", "prepare", _not_utf8_line,
         (f"{T}:11: not UTF-8 text (invalid continuation byte at byte 18", "re-save the file")),
    Case("completion-beyond-context", "train", _set("train", "max_completion_length", 100000),
         ("params.yaml: train.max_completion_length: 100000 tokens do not fit the model's "
          "context of 1024", "set it below 1024")),
    # model (stage base_model)
    Case("unknown-hub-id-offline", "base_model", _model("no-such-org-xyz/no-such-model"),
         ("model.name: 'no-such-org-xyz/no-such-model' is not in the local Hugging Face cache",
          "HF_HUB_OFFLINE is set", "set model.name to a local folder")),
    Case("folder-without-weights", "base_model", _model(_no_weights),
         ("{tmp}/m: no weights (*.safetensors)", "set model.name to a complete model folder")),
    Case("corrupt-safetensors", "base_model", _model(_corrupt_safetensors),
         ("{tmp}/m/model.safetensors: cannot load", "re-create or re-download")),
    Case("unsupported-gguf-architecture", "base_model", _model(_unsupported_gguf),
         ("{tmp}/m.gguf: cannot load", "rwkv6", "set model.name")),
    # sft: records, params, model
    Case("sft-malformed-records", "sft", _sft_first_record("{oops"),
         ("{tmp}/train.jsonl:1: malformed JSON", "fix or remove the line")),
    Case("sft-record-not-an-object", "sft", _sft_first_record("[1, 2]"),
         ("{tmp}/train.jsonl:1: expected a JSON object, got list", "fix or remove the line")),
    Case("sft-record-without-solution", "sft",
         _sft_first_record('{"id": "train-99999", "question": "q", "gold": "1"}'),
         ("{tmp}/train.jsonl:1: missing 'solution' or not a string", "re-create the file")),
    Case("sft-record-gold-not-a-string", "sft",
         _sft_first_record('{"id": "x", "question": "q", "solution": "s", "gold": 1}'),
         ("{tmp}/train.jsonl:1: missing 'gold' or not a string", "re-create the file")),
    Case("sft-missing-records", "sft",
         lambda c: (_sft_enabled(c), _arg("data", lambda c: c.tmp / "nope.jsonl")(c)),
         ("{tmp}/nope.jsonl: file not found", "check the path")),
    Case("sft-wrong-type", "sft", _set("sft", "batch_size", "two"),
         ("params.yaml: sft.batch_size: expected an integer, got 'two'", "fix it")),
    Case("sft-disabled-missing-model", "sft",
         lambda c: (_set("sft", "enabled", False)(c),
                    _arg("model", lambda c: c.tmp / "no-model")(c)),
         ("{tmp}/no-model: no config.json", "rerun")),
    Case("sft-model-without-weights", "sft",
         lambda c: (_sft_enabled(c), _arg("model", lambda c: Path(_no_weights(c)))(c)),
         ("{tmp}/m: cannot load the model", "re-create or re-download")),
    # evaluate: records, params, model
    Case("evaluate-malformed-records", "evaluate",
         lambda c: _append(c.args["data"], "{oops"),
         ("{tmp}/test-records.jsonl:7: malformed JSON", "fix or remove the line")),
    Case("evaluate-record-without-gold", "evaluate",
         lambda c: _append(c.args["data"], '{"id": "test-99999", "question": "q"}'),
         ("{tmp}/test-records.jsonl:7: missing 'gold' or not a string", "re-create the file")),
    Case("evaluate-record-id-not-a-string", "evaluate",
         lambda c: _append(c.args["data"], '{"id": 7, "question": "q", "gold": "1"}'),
         ("{tmp}/test-records.jsonl:7: missing 'id' or not a string", "re-create the file")),
    Case("evaluate-missing-records", "evaluate", _arg("data", lambda c: c.tmp / "nope.jsonl"),
         ("{tmp}/nope.jsonl: file not found", "check the path")),
    Case("evaluate-wrong-type", "evaluate", _set("eval", "batch_size", "two"),
         ("params.yaml: eval.batch_size: expected an integer, got 'two'", "fix it")),
    Case("evaluate-missing-model", "evaluate", _arg("model", lambda c: c.tmp / "no-model"),
         ("{tmp}/no-model: no config.json", "rerun")),
    Case("evaluate-model-without-weights", "evaluate",
         _arg("model", lambda c: Path(_no_weights(c))),
         ("{tmp}/m: no weights (*.safetensors)", "rerun")),
    Case("evaluate-metrics-parent-is-a-file", "evaluate", _metrics_under_a_file,
         ("{tmp}/blocker/base.json: cannot write the output", "make its parent a writable")),
    # report: the evaluated models' metrics and predictions
    Case("report-metrics-missing", "report", _remove("evaluated/grpo.json"),
         ("{tmp}/evaluated/grpo.json: metrics file not found", "run dvc repro")),
    Case("report-metrics-garbled", "report", _metrics_text("grpo", '{"n": 2,'),
         ("{tmp}/evaluated/grpo.json: malformed JSON", "run dvc repro")),
    Case("report-metrics-not-an-object", "report", _metrics_text("grpo", "[1, 2]"),
         ("{tmp}/evaluated/grpo.json: expected a JSON object", "run dvc repro")),
    Case("report-metrics-missing-key", "report",
         _metrics_edit("grpo", lambda m: m.pop("strict_accuracy")),
         ("{tmp}/evaluated/grpo.json: missing key(s) strict_accuracy", "run dvc repro")),
    Case("report-metrics-wrong-type", "report",
         _metrics_edit("grpo", lambda m: m.update(strict_accuracy="high")),
         ("{tmp}/evaluated/grpo.json: strict_accuracy not a number", "run dvc repro")),
    Case("report-details-missing", "report", _remove("evaluated/details/grpo.json"),
         ("{tmp}/evaluated/details/grpo.json: details file not found", "run dvc repro")),
    Case("report-details-from-another-run", "report",
         _metrics_edit("grpo", lambda m: m.update(format_rate=0.25), details=False),
         ("{tmp}/evaluated/details/grpo.json: format_rate differ from {tmp}/evaluated/grpo.json "
          "(left over from another run)", "run dvc repro")),
    Case("report-predictions-missing", "report", _remove("evaluated/grpo.jsonl"),
         ("{tmp}/evaluated/grpo.jsonl: predictions file not found", "run dvc repro")),
    Case("report-predictions-fewer-than-n", "report",
         _metrics_edit("grpo", lambda m: m.update(n=3)),
         ("{tmp}/evaluated/grpo.jsonl: 2 rows but its metrics say n=3", "run dvc repro")),
    Case("report-repeated-label", "report",
         _arg("model", lambda c: [c.args["model"][0], c.args["model"][0]]),
         ("--model labels repeat (base, base)", "give each model once")),
    # disk
    Case("out-parent-is-a-file", "prepare", _out_under_a_file,
         ("{tmp}/blocker/out: cannot write the output", "make its parent a writable folder")),
    Case("out-parent-is-a-file-model", "base_model", _out_under_a_file,
         ("{tmp}/blocker/out: cannot write the output", "make its parent a writable folder")),
]  # fmt: skip


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`, empty and hidden ones too."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


def _setup(case: Case, tmp: Path, model_dir: Path, monkeypatch) -> argparse.Namespace:
    tiny.write_gsm8k(tmp / "gsm8k")
    ctx = Ctx(tmp, _params(tmp, model_dir), _args(case.stage, tmp, model_dir), model_dir,
              monkeypatch)  # fmt: skip
    case.edit(ctx)
    (tmp / "params.yaml").write_text(yaml.safe_dump(ctx.params, sort_keys=False))
    paths = {k: str(v) if isinstance(v, Path) else v for k, v in ctx.args.items()}  # as argparse
    return argparse.Namespace(params=tmp / "params.yaml", **paths)


def _check_error_line(stderr: str, stage: str, expect: list[str]) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error [" in line]
    assert len(errors) == 1, stderr
    line = errors[0]
    assert line.startswith(f"error [{stage}]: ")
    for text in expect:
        assert text in line, f"{text!r} not in {line!r}"
    assert FIX.search(line), f"no fix in {line!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_error_and_no_output(
    case, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    args = _setup(case, tmp_path, tiny_model_dir, monkeypatch)
    before = _tree(tmp_path)
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        _cli.run(case.stage, STAGES[case.stage].main, args)
    elapsed = time.perf_counter() - start
    assert exit_info.value.code == 2
    _check_error_line(
        capsys.readouterr().err, case.stage, [t.format(tmp=tmp_path) for t in case.expect]
    )
    assert _tree(tmp_path) == before  # no output, no temp sibling, no touched input
    if case.before_work:
        assert elapsed < 2.0, f"{case.id} took {elapsed:.1f} s to fail"


@pytest.mark.parametrize(
    "case_id", ["malformed-json", "unknown-hub-id-offline"], ids=["data", "model"]
)
def test_real_cli_exit_code(case_id, tmp_path, tiny_model_dir, monkeypatch):
    case = next(c for c in CASES if c.id == case_id)
    args = _setup(case, tmp_path, tiny_model_dir, monkeypatch)
    before = _tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", f"stages.{case.stage}", "--params", str(args.params)]
    result = subprocess.run(
        [*cmd, "--out", str(args.out)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    _check_error_line(result.stderr, case.stage, [t.format(tmp=tmp_path) for t in case.expect])
    assert _tree(tmp_path) == before


def test_float_strings_from_dvc_exp_run_are_accepted(tmp_path, tiny_model_dir, capsys):
    """`dvc exp run -S train.learning_rate=2e-6` writes `learning_rate: 2e-06`, which YAML reads
    as a string: the stage coerces it and runs."""
    tiny.write_gsm8k(tmp_path / "gsm8k")
    raw = copy.deepcopy(_params(tmp_path, tiny_model_dir))
    raw["train"]["learning_rate"] = "2e-06"
    text = yaml.safe_dump(raw, sort_keys=False)
    assert "learning_rate: 2e-06\n" in text  # unquoted, as dvc writes it
    (tmp_path / "params.yaml").write_text(text)
    args = argparse.Namespace(params=tmp_path / "params.yaml", out=tmp_path / "out")
    _cli.run("prepare", prepare.main, args)
    assert config.load(args.params).train.learning_rate == 2e-06
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["counts"]["eval"] == 2
    assert "error" not in capsys.readouterr().err


class _FullDisk:
    """Stands in for `json` in stages.prepare: writing a record fails as a full disk does."""

    def __init__(self, code: int):
        self.code = code

    def dumps(self, *args, **kwargs):
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize(
    ("code", "what"), [(errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large")]
)
def test_disk_full_while_writing_gives_one_line(
    code, what, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    case = Case("disk-full", "prepare", lambda c: None, ())
    args = _setup(case, tmp_path, tiny_model_dir, monkeypatch)
    monkeypatch.setattr(prepare, "json", _FullDisk(code))
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _cli.run("prepare", prepare.main, args)
    assert exit_info.value.code == 2
    expect = [f"{tmp_path}/out: cannot write ({what})", "make room on that disk"]
    _check_error_line(capsys.readouterr().err, "prepare", expect)
    assert _tree(tmp_path) == before
    assert not any(tmp_path.glob(".out.tmp.*"))


@pytest.mark.parametrize(
    ("error", "code"),
    [(OSError(errno.ENOSPC, "No space left on device"), 2), (KeyboardInterrupt(), 130)],
    ids=["disk-full", "ctrl-c"],
)
def test_evaluate_writes_predictions_and_metrics_as_one_unit(
    error, code, tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """Writing the details (the last of the three outputs) fails after the predictions and
    metrics are written: none replaces its previous version, and no temp file stays; without
    the failure all are replaced."""
    case = Case("one-unit", "evaluate", _set("eval", "max_new_tokens", 4), ())
    args = _setup(case, tmp_path, tiny_model_dir, monkeypatch)
    Path(args.metrics).parent.mkdir()
    Path(args.metrics).write_text("old metrics\n")
    Path(args.predictions).write_text("old predictions\n")
    eval_results.details_path(args.metrics).parent.mkdir()
    eval_results.details_path(args.metrics).write_text("old details\n")
    before = _tree(tmp_path)
    write_metrics = evaluate.write_json_atomic
    written = []

    def fail(path, obj):
        written.append(Path(path))
        if len(written) == 2:  # the metrics went through, the details fail
            raise error
        write_metrics(path, obj)

    monkeypatch.setattr(evaluate, "write_json_atomic", fail)
    with pytest.raises(SystemExit) as exit_info:
        _cli.run("evaluate", evaluate.main, args)
    assert exit_info.value.code == code
    assert len(written) == 2, "the details write was never reached"
    assert capsys.readouterr().err.count("error [evaluate]: ") == 1
    assert _tree(tmp_path) == before

    monkeypatch.setattr(evaluate, "write_json_atomic", write_metrics)
    _cli.run("evaluate", evaluate.main, args)
    assert set(_tree(tmp_path)) == set(before)  # the same files, no temp file beside them
    predictions = fsutil.read_jsonl(args.predictions)
    assert [p["id"] for p in predictions] == [f"test-{i:05d}" for i in range(6)]
    assert json.loads(Path(args.metrics).read_text())["n"] == 6


def test_ctrl_c_gives_one_line_and_exit_130(tmp_path, capsys):
    def main(args):
        with fsutil.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "predictions.jsonl").write_text("{}\n")
            raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        _cli.run("evaluate", main, argparse.Namespace())
    assert exit_info.value.code == 130
    _check_error_line(capsys.readouterr().err, "evaluate", ["interrupted, nothing written"])
    assert list(tmp_path.iterdir()) == []


def _checkpoint(tmp: Path, model_dir: Path) -> Path:
    folder = tmp / "grpo-checkpoints" / "step-000005"
    folder.mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", folder)
    shutil.copy(model_dir / "config.json", folder)
    return folder


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1, got 0; set it"),
        (["--max-new-tokens", "-5"], "--max-new-tokens: must be >= 1, got -5; set it"),
        (["--model", "{tmp}/nope"], "--model {tmp}/nope: no such folder; use a local model"),
        (["--model", "{tmp}/params.yaml"], "is a file, not a folder; use a model folder"),
        (["--model", "{ckpt}"], "a training checkpoint has weights but no tokenizer; use "
                                "models/grpo"),
    ],
    ids=["zero-tokens", "negative-tokens", "missing-model", "model-is-a-file", "checkpoint"],
)  # fmt: skip
def test_generate_bad_arguments_fail_at_once(argv, expect, tmp_path, tiny_model_dir, capsys):
    from stages import generate

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.default_params_dict()))
    ckpt = _checkpoint(tmp_path, tiny_model_dir)
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_model_dir)]
    start = time.perf_counter()
    code = generate.main([*argv, "--params", str(tmp_path / "params.yaml"), "What is 2 + 2?"])
    assert code == 2
    _check_error_line(capsys.readouterr().err, "generate", [expect.format(tmp=tmp_path, ckpt=ckpt)])
    assert time.perf_counter() - start < 2.0


def test_kernels_off_is_logged_once(monkeypatch, caplog):
    from grpo import kernels

    monkeypatch.setenv("GRPO_KERNELS", "0")
    kernels.library.cache_clear()
    try:
        with caplog.at_level("INFO", logger="grpo.kernels"):
            assert kernels.library() is None
            assert kernels.library() is None
    finally:
        kernels.library.cache_clear()
    lines = [r.getMessage() for r in caplog.records if r.name == "grpo.kernels"]
    assert lines == ["grpo.kernels: off (GRPO_KERNELS=0); decoding and sampling use torch"]


def test_eval_tokens_beyond_context_name_the_key(tiny_model_dir):
    from grpo import model, preflight

    raw = config.default_params_dict()
    raw["eval"]["max_new_tokens"] = 100000
    with pytest.raises(model.ModelError) as info:
        preflight.check_evaluate(config.Params.from_dict(raw), tiny_model_dir)
    assert str(info.value).startswith("params.yaml: eval.max_new_tokens: 100000 tokens do not fit")
    assert "; set it below 1024" in str(info.value)


def test_real_ctrl_c_gives_one_line_and_exit_130(tmp_path):
    """A real SIGINT in a stage process (as Ctrl-C during `evaluate` sends): one line, 130."""
    code = (
        "import sys, time\n"
        "from stages import _cli\n"
        "def main(args):\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "_cli.run('evaluate', main, None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, cwd=tmp_path,
        # a terminal's child: a background job (nohup, `cmd &` in a script) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    _check_error_line(err, "evaluate", ["interrupted, nothing written"])


def test_ctrl_c_during_a_real_evaluation_gives_one_line_and_no_output(tmp_path, tiny_model_dir):
    """Ctrl-C while `python -m stages.evaluate` generates: exit 130, one line, no metrics or
    predictions, no temp file (the old outputs would stay)."""
    raw = _params(tmp_path, tiny_model_dir)
    raw["eval"].update(batch_size=2, max_new_tokens=200)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    q, a = tiny.GSM8K_ROWS["test"][0]
    rows = [gsm8k.make_record("test", i, {"question": q, "answer": a}) for i in range(400)]
    _lines(tmp_path / "records.jsonl", *(json.dumps(r) for r in rows))
    before = _tree(tmp_path)
    cmd = [
        sys.executable, "-m", "stages.evaluate", "--params", "params.yaml",
        "--model", str(tiny_model_dir), "--data", "records.jsonl",
        "--metrics", "metrics/base.json", "--predictions", "metrics/predictions/base.jsonl",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # a terminal's child: a background job (nohup, `cmd &` in a script) inherits SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = []
    for line in proc.stderr:  # the stage logs this line, then generates
        seen.append(line)
        if "evaluating on" in line:
            break
    time.sleep(1.0)
    assert proc.poll() is None, "".join(seen)  # still generating: 400 questions
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    _check_error_line(err, "evaluate", ["interrupted, nothing written"])
    assert _tree(tmp_path) == before
