"""`grpo.launch` and the train stage under it: multi-node settings from GRPO_* variables (a
partial setting is one line), and stop signals on 2 gloo workers: a signal to the whole process
group (a terminal's Ctrl-C) and SIGTERM to every process (Slurm's `scancel`) each end with one
checkpoint and exit code 128 + the signal, and the rerun resumes from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_trainer import _records

from grpo import checkpoint, config, launch

REPO = Path(__file__).resolve().parent.parent


def test_one_node_by_default_on_a_free_local_port():
    topo = launch.topology(2, {})
    assert (topo.nnodes, topo.node_rank, topo.master_addr) == (1, 0, "127.0.0.1")
    assert topo.master_port > 0 and topo.world == 2
    assert topo.describe() == "2 processes on a single node"


def test_several_nodes_from_the_environment():
    env = {launch.NNODES: "2", launch.NODE_RANK: "1", launch.MASTER_ADDR: "10.0.0.5"}
    topo = launch.topology(4, env)
    assert (topo.world, topo.master_port) == (8, launch.DEFAULT_PORT)
    assert topo.describe() == (
        "4 processes on node 1 of 2 (ranks 4-7 of 8), rendezvous at 10.0.0.5:29500"
    )
    worker = launch.worker_env(topo, 2, {"OMP_NUM_THREADS": "3"})
    assert {k: worker[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")} == {
        "RANK": "6",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
    }
    assert (worker["MASTER_ADDR"], worker["MASTER_PORT"], worker["OMP_NUM_THREADS"]) == (
        "10.0.0.5",
        "29500",
        "3",
    )
    assert worker[launch.LAUNCHER_PID] == str(os.getpid())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {launch.NNODES: "2", launch.NODE_RANK: "0"},
            "GRPO_MASTER_ADDR: not set while GRPO_NNODES=2",
        ),
        (
            {launch.NNODES: "2", launch.MASTER_ADDR: "h"},
            "GRPO_NODE_RANK: not set while GRPO_NNODES=2",
        ),
        (
            {launch.NNODES: "2", launch.NODE_RANK: "2", launch.MASTER_ADDR: "h"},
            "GRPO_NODE_RANK: expected a whole number from 0 to 1, got '2'",
        ),
        ({launch.NNODES: "two"}, "GRPO_NNODES: expected a whole number from 1 to"),
        ({launch.NODE_RANK: "1"}, "GRPO_NODE_RANK: expected a whole number from 0 to 0"),
    ],
    ids=["no-address", "no-node-rank", "rank-out-of-range", "not-a-number", "rank-on-one-node"],
)
def test_partial_or_bad_multi_node_settings_are_one_line_errors(env, message):
    with pytest.raises(launch.LaunchError) as err:
        launch.topology(2, env)
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value) and "; " in str(err.value)


def test_a_failed_worker_gets_the_others_killed_after_the_grace_and_is_named():
    code = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    start = time.monotonic()
    outcome = launch.run([sys.executable, "-c", code], launch.topology(2, {}), grace=0.5)
    assert time.monotonic() - start < 20
    assert outcome.codes == {0: -signal.SIGKILL, 1: 3} and outcome.failed == [1]
    assert outcome.exit_code == 3
    assert str(outcome.error("train")).startswith(
        "train: rank 1 failed first (exit code 3); the other workers were killed; fix"
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_with_a_killed_launcher(tmp_path):
    code = (
        "import os, sys, time\n"
        "open(sys.argv[1] + '/' + os.environ['RANK'], 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    cmd = [sys.executable, "-m", "stages.launch", "--nproc-per-node=2", "--"]
    proc = subprocess.Popen([*cmd, sys.executable, "-c", code, str(tmp_path)], env=_env())
    deadline = time.monotonic() + 30
    while not all((tmp_path / r).exists() and (tmp_path / r).read_text() for r in "01"):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    pids = [int((tmp_path / r).read_text()) for r in "01"]
    proc.kill()  # SIGKILL: the launcher can forward nothing
    proc.wait()
    deadline = time.monotonic() + 10
    try:
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "workers outlived their launcher"
            time.sleep(0.02)
    finally:
        for pid in filter(_alive, pids):
            os.kill(pid, signal.SIGKILL)


# a worker that records the signals it gets for a second after the first one, then stops
# like the trainer (128 + the first signal)
SIGNAL_WORKER = (
    "import os, signal, sys, time\n"
    "got = []\n"
    "signal.signal(signal.SIGTERM, lambda s, f: got.append(s))\n"
    "signal.signal(signal.SIGINT, lambda s, f: got.append(s))\n"
    "open(os.path.join(sys.argv[1], os.environ['RANK'] + '.ready'), 'w').close()\n"
    "while not got: time.sleep(0.01)\n"
    "time.sleep(float(sys.argv[2]))\n"
    "open(os.path.join(sys.argv[1], os.environ['RANK']), 'w').write(repr(got))\n"
    "sys.exit(128 + got[0])\n"
)


def _interrupt_launcher(tmp: Path, times: int, stop_seconds: float) -> launch.Outcome:
    """Run 2 SIGNAL_WORKERs; once both are ready, SIGINT the launcher (only) `times` times."""

    def interrupt_when_ready():
        while len(list(tmp.glob("*.ready"))) < 2:
            time.sleep(0.01)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    cmd = [sys.executable, "-c", SIGNAL_WORKER, str(tmp), str(stop_seconds)]
    return launch.run(cmd, launch.topology(2, {}))


def test_the_first_signal_reaches_each_worker_once_as_sigterm_and_is_waited_for(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    outcome = _interrupt_launcher(tmp_path, 1, stop_seconds=1.0)
    assert outcome.signum == signal.SIGINT and outcome.exit_code == 128 + signal.SIGINT
    assert outcome.codes == {0: 128 + signal.SIGTERM, 1: 128 + signal.SIGTERM}
    for rank in (0, 1):
        assert (tmp_path / str(rank)).read_text() == f"[{int(signal.SIGTERM)}]"
    assert "every worker saved a checkpoint and stopped" in str(outcome.error("train"))
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_a_second_signal_kills_the_workers(tmp_path):
    start = time.monotonic()
    outcome = _interrupt_launcher(tmp_path, 2, stop_seconds=60.0)
    assert time.monotonic() - start < 20
    assert outcome.codes == {0: -signal.SIGKILL, 1: -signal.SIGKILL} and outcome.killed
    assert outcome.exit_code == 128 + signal.SIGINT
    assert "workers ended with codes rank 0: -9, rank 1: -9" in str(outcome.error("train"))


def _stage(tmp: Path, model_dir: Path) -> list[str]:
    """The train stage's command on the tiny model in 2 processes, writing under `tmp`."""
    raw = config.default_params_dict()
    raw["train"].update(
        num_steps=100,
        batch_size=2,
        num_generations=2,
        max_completion_length=6,
        micro_batch_size=4,
        save_every=0,
        nproc_per_node=2,
    )
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw))
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return [
        sys.executable,
        "-m",
        "stages.train",
        "--params",
        str(tmp / "params.yaml"),
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(tmp / "out"),
        "--checkpoints",
        str(tmp / "checkpoints"),
        "--log-dir",
        str(tmp / "log"),
    ]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
    }


def _wait_for_steps(proc: subprocess.Popen, log_dir: Path, steps: int) -> None:
    tsv = log_dir / "plots" / "metrics" / "reward" / "mean.tsv"
    deadline = time.monotonic() + 120
    while not (tsv.exists() and len(tsv.read_text().splitlines()) > steps):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no steps logged after 120 s"
        time.sleep(0.05)


def _workers(launcher: int) -> list[int]:
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children]


def _stop(cmd: list[str], tmp: Path, send, resumed: int = 0) -> int:
    """Run the stage, `send` its signals 2 steps after step `resumed` (the last run's
    checkpoint, resumed from); check it stopped with one new checkpoint; return its step."""
    proc = subprocess.Popen(
        cmd,
        cwd=tmp,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as under a terminal
    )
    _wait_for_steps(proc, tmp / "log", resumed + 2)
    workers = _workers(proc.pid)
    signum = send(proc)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        for pid in workers:  # PYTHONFAULTHANDLER: each prints where it hangs
            os.kill(pid, signal.SIGABRT)
        pytest.fail("the stop hung:\n" + proc.communicate(timeout=60)[0][-6000:])
    assert proc.returncode == 128 + signum, out[-3000:]
    if resumed:
        assert f"resuming from {tmp / 'checkpoints' / f'step-{resumed:06d}'}" in out
    name = signal.Signals(signum).name
    assert f"error [train]: train: stopped by {name}: every worker saved a checkpoint" in out, out[
        -3000:
    ]
    saved = [json.loads((p / "state.json").read_text())["step"] for p in _complete(tmp)]
    assert saved[:-1] == ([resumed] if resumed else []), saved  # one new checkpoint
    assert resumed + 2 <= saved[-1] < 100
    assert not (tmp / "out").exists()
    return saved[-1]


def _complete(tmp: Path) -> list[Path]:
    return checkpoint.complete(tmp / "checkpoints")


def test_ctrl_c_and_sigterm_to_every_process_each_save_one_checkpoint_and_reruns_resume(
    tmp_path, tiny_model_dir
):
    """A terminal's Ctrl-C reaches the whole process group; Slurm's `scancel` sends SIGTERM to
    every process, so each worker gets it twice (directly and from the launcher), close
    together: the repeat must not be taken as "stop at once". Each stop saves one checkpoint
    and exits with 128 + the signal; each rerun resumes from it; the last one completes."""

    def ctrl_c(proc):
        os.killpg(proc.pid, signal.SIGINT)
        return signal.SIGINT

    def scancel(proc):
        pids = [*_workers(proc.pid), proc.pid]
        assert len(pids) == 3
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        return signal.SIGTERM

    cmd = _stage(tmp_path, tiny_model_dir)
    first = _stop(cmd, tmp_path, ctrl_c)
    second = _stop(cmd, tmp_path, scancel, resumed=first)
    rerun = subprocess.run(
        cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300
    )
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-3000:]
    assert f"resuming from {_complete(tmp_path)[-1]} (step {second})" in out, out[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    rows = (tmp_path / "log/plots/metrics/reward/mean.tsv").read_text().splitlines()
    assert len(rows) == 1 + 100  # header + each step once
