"""Data parallelism on CPU (gloo): 2 processes give the same parameters and metrics after GRPO
steps as 1 process with the same global batch and seed, for DDP and FSDP2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch

from grpo import checkpoint, distributed

WORKER = Path(__file__).parent / "dist_worker.py"
REPO = Path(__file__).resolve().parent.parent


def _run(out: Path, nproc: int, *args: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(WORKER),
        ]
    proc = subprocess.run(
        [*cmd, "--out", str(out), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "params.pt", weights_only=True)


def _metrics(out: Path) -> dict:
    metrics = json.loads((out / "log" / "metrics.json").read_text())
    metrics.pop("time")
    return metrics


@pytest.mark.parametrize(
    "args",
    [
        ("--strategy", "ddp"),
        ("--strategy", "fsdp", "--iterations", "2"),
        ("--strategy", "ddp", "--loss-type", "dapo", "--mu", "2", "--beta", "0"),
    ],
    ids=["ddp", "fsdp-2-iterations", "ddp-dapo-mu2"],
)
def test_two_processes_match_one(tmp_path, args):
    one = _run(tmp_path / "one", 1, *args, "--steps", "2")
    two = _run(tmp_path / "two", 2, *args, "--steps", "2")
    assert one.keys() == two.keys()
    tokenizer = tiny.build_tokenizer()
    initial = tiny.build_model(tokenizer, seed=0).state_dict()
    assert any(not torch.equal(one[k], initial[k]) for k in one), "training changed nothing"
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    steps = 4 if "--iterations" in args else 2
    assert m1["step"] == m2["step"] == steps  # rank 0 logged each step once
    assert m1["reward"] == pytest.approx(m2["reward"])
    assert m1["completion"] == pytest.approx(m2["completion"])
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-3, abs=1e-7)


def test_checkpoint_of_one_process_resumes_under_fsdp_on_two(tmp_path):
    """Checkpoints are full and keyed by name: a 1-process run's step-1 checkpoint resumes
    under 2-process FSDP (optimizer state resharded) and ends where the 1-process run ends."""
    one = _run(tmp_path / "one", 1, "--steps", "3", "--save-every", "1")
    ckpt = tmp_path / "one" / "out" / "checkpoints" / "step-000001"
    two = _run(
        tmp_path / "two", 2, "--strategy", "fsdp", "--steps", "3", "--resume-from", str(ckpt)
    )
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sigterm_to_torchrun_saves_one_checkpoint_and_stops_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["--out", str(tmp_path), "--steps", "50", "--save-every", "100"]
    proc = subprocess.Popen(
        [*cmd, str(WORKER), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log = tmp_path / "log" / "plots" / "metrics" / "loss.tsv"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # 2 steps logged
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0
    assert "rank 0: train: stopped by SIGTERM" in out and "rank 1: train: stopped by SIGTERM" in out
    (saved,) = checkpoint.complete(tmp_path / "out" / "checkpoints")
    state = json.loads((saved / "state.json").read_text())
    assert 2 <= state["step"] < 50 and state["world_size"] == 2


def test_torchrun_command_defaults_to_standalone(monkeypatch):
    for var in distributed.RENDEZVOUS_ENV:
        monkeypatch.delenv(var, raising=False)
    cmd = distributed.torchrun_command(2, "stages.train", ["--out", "x"])
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "stages.train",
        "--out",
        "x",
    ]
    monkeypatch.setenv("PET_NNODES", "2")  # multi-node: torchrun reads PET_* itself
    assert "--standalone" not in distributed.torchrun_command(2, "stages.train", [])


def test_shard_keeps_whole_prompts_in_rank_order():
    d0, d1 = distributed.Dist(0, 2), distributed.Dist(1, 2)
    assert distributed.shard([5, 6, 7, 8], d0) == [5, 6]
    assert distributed.shard([5, 6, 7, 8], d1) == [7, 8]
    with pytest.raises(ValueError, match="do not split evenly"):
        distributed.shard([1, 2, 3], d0)
