"""Data parallelism on CPU (gloo), under `grpo.launch`: 2 processes give the same parameters and
metrics after GRPO steps as 1 process with the same global batch and seed, for DDP and FSDP2;
checkpoints move across process counts and strategies; a signal saves one checkpoint; one rank's
error ends the job; two nodes without a shared folder resume from the same step."""

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

from grpo import checkpoint, distributed, launch

WORKER = Path(__file__).parent / "dist_worker.py"
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(WORKER)]
    launcher = [sys.executable, "-m", "stages.launch", f"--nproc-per-node={nproc}", "--"]
    return [*launcher, sys.executable, str(WORKER)]


def _run(out: Path, nproc: int, *args: str) -> dict[str, torch.Tensor]:
    proc = subprocess.run(
        [*_cmd(nproc), "--out", str(out), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "params.pt", weights_only=True)


def _metrics(out: Path) -> dict:
    metrics = json.loads((out / "log" / "metrics.json").read_text())
    metrics.pop("time")
    return metrics


UPDATE_METRICS = ("loss", "kl", "clip_ratio", "grad_norm")
"""What `GRPOTrainer.update` reports; the gradient norm is taken before clipping, so unlike the
weights after AdamW and clipping it shows a gradient scaled by a constant."""


def _steps(out: Path) -> dict[str, list[float]]:
    """Each update metric's logged value at every step, from DVCLive's TSV files."""
    series = {}
    for name in UPDATE_METRICS:
        lines = (out / "log" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
        assert lines[0] == f"step\t{name}"
        series[name] = [float(line.split("\t")[1]) for line in lines[1:]]
    return series


def assert_same_steps(one: Path, many: Path) -> dict[str, list[float]]:
    """1 and N processes logged the same update metrics at every step; return 1's."""
    a, b = _steps(one), _steps(many)
    for name in UPDATE_METRICS:
        assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-7), name
    return a


@pytest.mark.parametrize(
    "args",
    [
        ("--strategy", "ddp"),
        ("--strategy", "fsdp", "--iterations", "2"),
        ("--strategy", "ddp", "--loss-type", "dapo", "--mu", "2", "--beta", "0"),
        # off-policy updates far enough from the rollout policy to clip some ratios
        ("--strategy", "ddp", "--mu", "3", "--lr", "0.003"),
    ],
    ids=["ddp", "fsdp-2-iterations", "ddp-dapo-mu2", "ddp-mu3-clipping"],
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
    steps = assert_same_steps(tmp_path / "one", tmp_path / "two")
    assert all(v > 0 for v in steps["grad_norm"])
    if "--beta" not in args:  # the default 0.04: the policy leaves the reference after step 1
        assert any(v > 0 for v in steps["kl"]), steps
    if "--lr" in args:
        assert any(v > 0 for v in steps["clip_ratio"]), steps


def test_checkpoint_of_one_process_resumes_under_fsdp_on_two(tmp_path):
    """Checkpoints are full and keyed by name: a 1-process run's step-1 checkpoint resumes
    under 2-process FSDP (rank 0 reads it, the optimizer state is broadcast and resharded) and
    ends where the 1-process run ends; the FSDP run's own step-2 checkpoint (gathered by both
    ranks, kept by rank 0 only) holds the same full states as the 1-process one."""
    one = _run(tmp_path / "one", 1, "--steps", "3", "--save-every", "1")
    ckpt = tmp_path / "one" / "out" / "checkpoints" / "step-000001"
    args = ("--strategy", "fsdp", "--steps", "3", "--save-every", "1", "--resume-from", str(ckpt))
    two = _run(tmp_path / "two", 2, *args)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    a, b = (
        checkpoint.load(tmp_path / run / "out/checkpoints/step-000002") for run in ("one", "two")
    )
    torch.testing.assert_close(b.model_state, a.model_state, rtol=1e-4, atol=1e-6)
    names = [[g["params"] for g in c.optimizer_state["param_groups"]] for c in (a, b)]
    assert names[0] == names[1]  # keyed by parameter name (fused differs: FSDP is not fused)
    torch.testing.assert_close(
        b.optimizer_state["state"], a.optimizer_state["state"], rtol=1e-4, atol=1e-6
    )


def test_sigterm_to_the_launcher_saves_one_checkpoint_and_stops_every_rank(tmp_path):
    args = ["--out", str(tmp_path), "--steps", "50", "--save-every", "100"]
    proc = subprocess.Popen(
        [*_cmd(2), *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    log = tmp_path / "log" / "plots" / "metrics" / "loss.tsv"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # 2 steps logged
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the launcher forwards it to both ranks
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "rank 0: train: stopped by SIGTERM" in out and "rank 1: train: stopped by SIGTERM" in out
    (saved,) = checkpoint.complete(tmp_path / "out" / "checkpoints")
    state = json.loads((saved / "state.json").read_text())
    assert 2 <= state["step"] < 50 and state["world_size"] == 2


def test_an_error_on_one_rank_ends_every_process_with_that_error(tmp_path):
    """Rank 1 raises at step 2 while rank 0 waits in a collective: no barrier on the failing
    rank, and the launcher stops the other and names the rank."""
    start = time.monotonic()
    proc = subprocess.run(
        [*_cmd(2), "--out", str(tmp_path), "--steps", "50", "--fail-on-rank", "1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = proc.stdout + proc.stderr
    assert time.monotonic() - start < 60, out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    assert "RuntimeError: injected failure on rank 1 at step 2" in out
    assert "error [launch]: launch: rank 1 failed first (exit code 1)" in out


def test_two_nodes_without_a_shared_folder_resume_from_the_same_step(tmp_path):
    """Two nodes on localhost (1 process each, world 2), each with its own folder: after node 1
    lost its newest checkpoint both resume from the newest step they both have, end with the
    weights of the uninterrupted run, and each writes the final model."""
    port = str(launch.free_port())

    def both_nodes(*args: str) -> list[str]:
        procs = []
        for node in (0, 1):
            env = {
                **ENV,
                launch.NNODES: "2",
                launch.NODE_RANK: str(node),
                launch.MASTER_ADDR: "127.0.0.1",
                launch.MASTER_PORT: port,
            }
            work = tmp_path / f"node{node}"  # each node's own working copy
            work.mkdir(exist_ok=True)
            cmd = [*_cmd(2), "--out", str(work), *args]
            cmd[cmd.index("--nproc-per-node=2")] = "--nproc-per-node=1"
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=work,  # not this repo: DVCLive's step marker there is one per machine
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outs = [p.communicate(timeout=300)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out[-3000:]
        return outs

    args = ("--steps", "3", "--save-every", "1", "--resume")
    outs = both_nodes(*args)
    assert "launching 1 process on node 1 of 2 (ranks 1-1 of 2)" in outs[1]
    straight = torch.load(tmp_path / "node0" / "params.pt", weights_only=True)
    for node in (0, 1):
        folder = tmp_path / f"node{node}" / "out" / "checkpoints"
        assert [p.name for p in checkpoint.complete(folder)] == ["step-000001", "step-000002"]
        (tmp_path / f"node{node}" / "params.pt").unlink()
    (tmp_path / "node1" / "out" / "checkpoints" / "step-000002" / checkpoint.COMPLETE).unlink()

    outs = both_nodes(*args)
    for rank, out in enumerate(outs):
        assert f"rank {rank}: resuming from" in out and "(step 1)" in out, out[-3000:]
    for node in (0, 1):
        final = torch.load(tmp_path / f"node{node}" / "params.pt", weights_only=True)
        for name, tensor in straight.items():
            assert torch.equal(final[name], tensor), (node, name)


def test_shard_keeps_rank_order_and_splits_unevenly():
    d0, d1 = distributed.Dist(0, 2), distributed.Dist(1, 2)
    assert distributed.shard([5, 6, 7, 8], d0) == [5, 6]
    assert distributed.shard([5, 6, 7, 8], d1) == [7, 8]
    assert distributed.shard([1, 2, 3], d0) == [1, 2]
    assert distributed.shard([1, 2, 3], d1) == [3]
