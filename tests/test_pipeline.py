"""End-to-end: `dvc repro` of the pipeline in a temporary copy of the repo, with a tiny random
model and GSM8K fixture rows; checks outputs, caching, and that every stage's `params:` list in
dvc.yaml equals the keys its code really read."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
COPY = [
    "dvc.yaml",
    "params.yaml",
    "stages",
    "grpo",
    ".dvc/config",
    ".dvc/.gitignore",
    "models/.gitignore",
]


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(work / ".dvc-site"),
        GRPO_PARAMS_TRACE=str(work / "trace"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


def run(work: Path, *cmd: str) -> str:
    proc = subprocess.run(cmd, cwd=work, env=_env(work), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def edit_params(work: Path, **sections) -> None:
    path = work / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def mirror_of(work: Path) -> Path:
    """The workspace's GSM8K mirror folder, beside it."""
    return work.parent / f"{work.name}-gsm8k"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    for name in COPY:
        src, dst = REPO / name, work / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    # outside the repo, as ../shared/data/gsm8k is: queued experiments run in a copy elsewhere
    tiny.write_gsm8k(mirror_of(work))
    tiny.write_tiny_model(work / "fixtures" / "tiny-model")
    edit_params(
        work,
        data={
            "hub_id": "",
            "mirrors": [f"../{mirror_of(work).name}"],
            "train_size": 8,
            "eval_size": 4,
        },
        model={"name": "fixtures/tiny-model"},
        eval={"batch_size": 2, "max_new_tokens": 8},
        sft={"num_examples": 4, "batch_size": 2},
        train={
            "num_steps": 2,
            "batch_size": 2,
            "num_generations": 2,
            "max_completion_length": 8,
            "save_every": 1,
            # the random model earns no reward (zero advantages, zero gradient): decoupled weight
            # decay makes every step change the weights, so outputs depend on the train params
            "weight_decay": 0.1,
            "learning_rate": 1e-3,
        },
    )
    run(work, "git", "init", "-q")
    run(work, "git", "add", "-A")
    run(work, "git", "commit", "-qm", "fixture")
    run(work, "dvc", "repro")
    return work


def test_repro_writes_every_output(workspace):
    meta = json.loads((workspace / "data/prepared/meta.json").read_text())
    assert meta["source"].startswith("mirror:")
    assert meta["counts"] == {
        "train_rows_read": 10,
        "test_rows_read": 6,
        "train_dropped_overlapping_test": 0,
        "train": 8,
        "eval": 4,
    }
    assert set(meta["sha256"]) == {"train", "test"}
    evals = (workspace / "data/prepared/eval.jsonl").read_text().splitlines()
    assert all(json.loads(line)["id"].startswith("test-") for line in evals)
    assert (workspace / "models/base/model.safetensors").is_file()
    metrics = json.loads((workspace / "metrics/base.json").read_text())
    assert metrics["n"] == 4
    details = json.loads((workspace / "metrics/details/base.json").read_text())
    for key in ("strict_accuracy", "lenient_accuracy", "format_rate"):
        assert 0 <= details[f"{key}_ci_low"] <= metrics[key] <= details[f"{key}_ci_high"] <= 1
    predictions = (workspace / "metrics/predictions/base.jsonl").read_text().splitlines()
    assert len(predictions) == 4
    for name in ("sft", "grpo"):
        other = json.loads((workspace / f"metrics/{name}.json").read_text())
        assert set(other) == set(metrics)
    assert (workspace / "models/grpo/model.safetensors").is_file()
    assert (workspace / "models/grpo-checkpoints/step-000001/COMPLETE").is_file()
    assert (workspace / "dvclive/plots/metrics/reward/mean.tsv").is_file()
    report = (workspace / "metrics/report.md").read_text()
    assert "grpo" in report and (workspace / "metrics/report.png").stat().st_size > 0


def test_sft_and_train_questions_never_overlap_eval(workspace):
    def questions(name):
        lines = (workspace / f"data/prepared/{name}.jsonl").read_text().splitlines()
        return {json.loads(line)["question"] for line in lines}

    assert questions("train").isdisjoint(questions("eval"))


def ran_stages(out: str) -> set[str]:
    """The stages a `dvc repro` log ran, less `prepare` (always_changed: it reruns every time)."""
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    return ran - {"prepare"}


def test_second_repro_is_a_noop(workspace):
    out = run(workspace, "dvc", "repro")
    assert ran_stages(out) == set()


def test_stage_params_match_what_the_code_reads(workspace):
    stages = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        declared = sorted((stage.get("do") or stage).get("params", []))
        read = json.loads((workspace / "trace" / f"{name}.json").read_text())
        assert declared == read, f"stage {name}: dvc.yaml lists {declared}, code reads {read}"


def test_metrics_show_lists_base(workspace):
    out = run(workspace, "dvc", "metrics", "show")
    assert "metrics/base.json" in out and "strict_accuracy" in out


@pytest.mark.parametrize(
    ("edit", "stale"),
    [
        ({"eval": {"max_new_tokens": 6}}, {"evaluate@base", "evaluate@sft", "evaluate@grpo"}),
        ({"train": {"learning_rate": 2e-5}}, {"train"}),
        ({"sft": {"learning_rate": 1e-4}}, {"sft"}),
        ({"data": {"seed": 1}}, {"prepare"}),
    ],
)
def test_param_change_invalidates_only_the_stages_that_read_it(workspace, edit, stale):
    """dvc status names the first stale stages; their downstream reruns on repro."""
    original = (workspace / "params.yaml").read_text()
    try:
        edit_params(workspace, **edit)
        status = json.loads(run(workspace, "dvc", "status", "--json"))
        assert set(status) == stale | {"prepare"}  # prepare is always_changed
    finally:
        (workspace / "params.yaml").write_text(original)


def test_train_param_change_reruns_train_and_downstream_only(workspace):
    original = (workspace / "params.yaml").read_text()
    try:
        edit_params(workspace, train={"learning_rate": 5e-5})
        out = run(workspace, "dvc", "repro")
        assert ran_stages(out) == {"train", "evaluate@grpo", "report"}
        # the checkpoints of the previous run are stale now: a fresh run, not a resume
        assert "starting a fresh run" in out and "resuming from" not in out
    finally:
        (workspace / "params.yaml").write_text(original)
        run(workspace, "dvc", "repro")


def test_exp_run_with_two_processes_launches_workers_and_logs_once(workspace):
    original = (workspace / "params.yaml").read_text()
    try:
        out = run(workspace, "dvc", "exp", "run", "-S", "train.nproc_per_node=2")
        assert "launching 2 processes" in out
        assert ran_stages(out) == {"train", "evaluate@grpo", "report"}
        steps = (workspace / "dvclive/plots/metrics/reward/mean.tsv").read_text().splitlines()
        assert len(steps) == 1 + 2  # header + one row per step, written by rank 0 only
        assert (workspace / "models/grpo/model.safetensors").is_file()
    finally:
        (workspace / "params.yaml").write_text(original)


def test_sigkill_mid_training_then_repro_resumes_to_the_same_weights(workspace):
    """Kill `dvc repro` (and the train stage under it) with SIGKILL after a few steps; the next
    `dvc repro` resumes from the last complete checkpoint and ends with the weights and metrics
    of an uninterrupted run. An SFT long enough to make the tiny model write the tags, scored
    with the `presence` format reward, gives groups with unequal rewards in the resumed steps:
    the policy gradient, not only weight decay and KL, moves the weights resumed."""
    original = (workspace / "params.yaml").read_text()
    ckpts = workspace / "models/grpo-checkpoints"
    metrics_dir = workspace / "dvclive/plots/metrics"
    try:
        edit_params(
            workspace,
            sft={"epochs": 25, "learning_rate": 1e-2},
            reward={"format_mode": "presence"},
            train={"num_steps": 8, "save_every": 1, "num_generations": 4},
        )
        run(workspace, "dvc", "repro", "train")
        straight = load_file(workspace / "models/grpo/model.safetensors")
        straight_log = {p.name: p.read_text() for p in metrics_dir.glob("reward/*.tsv")}

        shutil.rmtree(ckpts)  # else the forced rerun would resume from the finished run
        proc = subprocess.Popen(
            ["dvc", "repro", "-f", "train"],
            cwd=workspace,
            env=_env(workspace),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while not (ckpts / "step-000003" / "COMPLETE").exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (workspace / "models/grpo/model.safetensors").exists()
        saved = [p.name for p in ckpts.glob("step-*") if (p / "COMPLETE").exists()]
        assert "step-000008" not in saved and len(saved) >= 1

        out = run(workspace, "dvc", "repro")
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert "train" in ran
        assert "resuming from" in out
        resumed_from = int(re.search(r"resuming from .* \(step (\d+)\)", out)[1])
        zero_std = (metrics_dir / "frac_reward_zero_std.tsv").read_text().splitlines()[1:]
        redone = [float(line.split("\t")[1]) for line in zero_std[resumed_from:]]
        assert len(redone) == 8 - resumed_from >= 1
        assert all(frac < 1 for frac in redone), redone  # some group has non-zero advantages
        resumed = load_file(workspace / "models/grpo/model.safetensors")
        assert resumed.keys() == straight.keys()
        start = load_file(workspace / "models/sft/model.safetensors")
        assert any(not torch.equal(start[k], straight[k]) for k in start), "training was a no-op"
        for name, tensor in straight.items():
            assert torch.equal(resumed[name], tensor), name
        assert {p.name: p.read_text() for p in metrics_dir.glob("reward/*.tsv")} == straight_log
    finally:
        (workspace / "params.yaml").write_text(original)


@pytest.mark.parametrize("overrides", [["train.num_steps=1"], ["train.save_every=0"]])
def test_run_that_saves_no_checkpoint_still_leaves_the_checkpoint_folder(workspace, overrides):
    """DVC fails a stage whose output is missing: a run too short to save a checkpoint (or with
    saving off), started without the folder, must still leave it."""
    original = (workspace / "params.yaml").read_text()
    try:
        shutil.rmtree(workspace / "models/grpo-checkpoints", ignore_errors=True)
        args = [a for o in overrides for a in ("-S", o)]
        run(workspace, "dvc", "exp", "run", *args)
        assert (workspace / "models/grpo-checkpoints").is_dir()
    finally:
        (workspace / "params.yaml").write_text(original)
        run(workspace, "dvc", "repro")  # the workspace's outputs back to the fixture's params


def run_queue(workspace, timeout: float) -> str:
    """`dvc queue start`, then wait until no experiment is queued or running; the final
    `dvc queue status`."""
    run(workspace, "dvc", "queue", "start")
    deadline = time.monotonic() + timeout
    while True:
        status = run(workspace, "dvc", "queue", "status")
        if not any(s in status for s in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(2)


def test_queued_experiments_both_succeed(workspace):
    """`dvc exp run --queue` runs each experiment in a fresh copy of the repo, where the
    persist output `models/grpo-checkpoints` starts out missing."""
    run(workspace, "dvc", "exp", "run", "--queue", "-S", "train.learning_rate=2e-06")
    run(workspace, "dvc", "exp", "run", "--queue", "-S", "train.num_steps=1")
    status = run_queue(workspace, timeout=600)
    lines = [line for line in status.splitlines() if "Success" in line or "Failed" in line]
    assert len(lines) == 2 and all("Success" in line for line in lines), status


def test_edited_mirror_reruns_prepare_and_what_reads_its_records(workspace):
    """The GSM8K mirror is outside what DVC tracks: an edited gold answer must still reach
    data/prepared and the evaluations, while an unchanged mirror reruns nothing downstream."""
    test = mirror_of(workspace) / "test.jsonl"
    original = test.read_text()
    try:
        assert ran_stages(run(workspace, "dvc", "repro")) == set()
        rows = [json.loads(line) for line in original.splitlines()]
        for row in rows:
            row["answer"] = row["answer"].rsplit("####", 1)[0] + "#### 123456789"
        test.write_text("".join(json.dumps(row) + "\n" for row in rows))
        assert "prepare" in json.loads(run(workspace, "dvc", "status", "--json"))
        out = run(workspace, "dvc", "repro")
        assert "evaluate@base" in ran_stages(out)
        golds = (workspace / "data/prepared/eval.jsonl").read_text()
        assert "123456789" in golds
    finally:
        test.write_text(original)
        run(workspace, "dvc", "repro")


def test_failed_params_run_keeps_the_results_or_one_command_restores_them(workspace):
    """A params error fails `prepare` (always_changed, it validates every section) before DVC
    deletes any later stage's outputs; a failure inside `train` itself loses its outputs, and
    `git checkout -- params.yaml dvclive && dvc checkout` (README) brings back the last committed
    results: DVCLive's files from git, the model from the DVC cache."""
    run(workspace, "git", "add", "-A")
    run(workspace, "git", "commit", "-qm", "results")
    kept = {
        p: (workspace / p).read_bytes()
        for p in ("dvclive/metrics.json", "models/grpo/model.safetensors")
    }
    edit_params(workspace, train={"learning_rate": [1, 2]})
    proc = subprocess.run(
        ["dvc", "exp", "run", "-S", "train.num_steps=abc"],
        cwd=workspace,
        env=_env(workspace),
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "error [prepare]" in proc.stdout + proc.stderr
    for path, data in kept.items():
        assert (workspace / path).read_bytes() == data, path
    # what a failure inside train leaves: DVC removed its outputs before running it
    shutil.rmtree(workspace / "models/grpo")
    shutil.rmtree(workspace / "dvclive")
    run(workspace, "git", "checkout", "--", "params.yaml", "dvclive")
    run(workspace, "dvc", "checkout")
    for path, data in kept.items():
        assert (workspace / path).read_bytes() == data, path
    assert (workspace / "dvclive/plots/metrics/reward/mean.tsv").is_file()
    assert set(json.loads(run(workspace, "dvc", "status", "--json"))) == {"prepare"}
