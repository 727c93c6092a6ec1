"""Our launcher for multi-process training: spawns the workers of this node, forwards stop
signals to them once, and ends the job when one of them fails.

    python -m stages.launch --nproc-per-node 2 -- python -m stages.train ...

It replaces torchrun for three reasons: a signal must reach each worker exactly once (Slurm's
`scancel` signals every process; torchrun forwarded it a second time), workers need as long as
a step plus a checkpoint to stop (torchrun kills them after 30 s), and a failed worker must end
the job at once instead of leaving the others in a collective until the NCCL timeout.

Rendezvous is static (torch's `env://`): every worker gets RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. One node by default (127.0.0.1, a free port);
several nodes from these environment variables, set the same on every node but the rank:

    GRPO_NNODES       number of nodes (default 1)
    GRPO_NODE_RANK    this node's index, 0 .. GRPO_NNODES - 1 (node 0 hosts the rendezvous)
    GRPO_MASTER_ADDR  node 0's address, reachable from every node (required when GRPO_NNODES > 1)
    GRPO_MASTER_PORT  a free TCP port on node 0 (default 29500 with several nodes)

Signals: workers run in their own session, so a terminal's Ctrl-C (sent to the foreground
process group) reaches only the launcher, and they die with it if it is SIGKILLed (Linux
PR_SET_PDEATHSIG). The first SIGINT / SIGTERM is forwarded once as SIGTERM to every worker,
which finishes its step, saves a checkpoint and exits with 128 + SIGTERM; the launcher waits
as long as that takes and exits with 128 + the signal it got. A second signal kills the workers.
Workers see GRPO_LAUNCHER_PID and leave the escalation to the launcher: they ignore repeats.

Failures: when a worker exits non-zero (a stop on a signal aside), the others get
`GRACE_SECONDS` to exit on their own, then are killed; the launcher names the rank that failed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from grpo.errors import UserError

log = logging.getLogger(__name__)

NNODES, NODE_RANK = "GRPO_NNODES", "GRPO_NODE_RANK"
MASTER_ADDR, MASTER_PORT = "GRPO_MASTER_ADDR", "GRPO_MASTER_PORT"
LAUNCHER_PID = "GRPO_LAUNCHER_PID"
"""Set in every worker's environment: the pid of the launcher that escalates signals."""
DEFAULT_PORT = 29500
GRACE_SECONDS = 10.0
"""After a worker fails, how long the others may take to exit on their own before the kill."""
STOP_CODES = (128 + signal.SIGTERM, 128 + signal.SIGINT)
"""Exit codes of a worker that saved a checkpoint and stopped on a signal."""
_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.05


class LaunchError(UserError):
    """Bad multi-node settings, or a worker that failed or was stopped (its own exit code)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Topology:
    """Where this node's workers sit in the job."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc

    def describe(self) -> str:
        procs = f"{self.nproc} process{'es' if self.nproc != 1 else ''}"
        if self.nnodes == 1:
            return f"{procs} on a single node"
        first = self.node_rank * self.nproc
        return (
            f"{procs} on node {self.node_rank} of {self.nnodes} "
            f"(ranks {first}-{first + self.nproc - 1} of {self.world}), "
            f"rendezvous at {self.master_addr}:{self.master_port}"
        )


def _whole(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise LaunchError(
            f"{name}: expected a whole number from {low} to {high}, got {raw!r}; "
            f"fix it in the environment (see README, Several GPUs or nodes)"
        )
    return value


def topology(nproc: int, environ: Mapping[str, str] | None = None) -> Topology:
    """This node's topology from the GRPO_* variables; one node unless GRPO_NNODES > 1."""
    env = os.environ if environ is None else environ
    nnodes = _whole(env, NNODES, 1, 1, 1 << 16)
    if nnodes == 1:
        _whole(env, NODE_RANK, 0, 0, 0)
        port = _whole(env, MASTER_PORT, 0, 1, 65535) or free_port()
        return Topology(nproc, master_addr=env.get(MASTER_ADDR) or "127.0.0.1", master_port=port)
    for name in (MASTER_ADDR, NODE_RANK):
        if not env.get(name, "").strip():
            raise LaunchError(
                f"{name}: not set while {NNODES}={nnodes}; set {MASTER_ADDR} (node 0's address) "
                f"and {NODE_RANK} (0 to {nnodes - 1}) on every node, or unset {NNODES}"
            )
    return Topology(
        nproc,
        nnodes,
        _whole(env, NODE_RANK, 0, 0, nnodes - 1),
        env[MASTER_ADDR].strip(),
        _whole(env, MASTER_PORT, DEFAULT_PORT, 1, 65535),
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (single node: nobody else needs to know it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(topo: Topology, local_rank: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of one worker: torch's env:// rendezvous variables and our marker."""
    threads = max(1, len(os.sched_getaffinity(0)) // topo.nproc)  # the node's cores, shared
    return {
        "OMP_NUM_THREADS": str(threads),
        **environ,
        "RANK": str(topo.node_rank * topo.nproc + local_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(topo.world),
        "LOCAL_WORLD_SIZE": str(topo.nproc),
        "GROUP_RANK": str(topo.node_rank),
        "MASTER_ADDR": topo.master_addr,
        "MASTER_PORT": str(topo.master_port),
        LAUNCHER_PID: str(os.getpid()),
    }


def _die_with(parent: int):
    """preexec_fn: the worker gets SIGKILL when its launcher dies (Linux only). libc is looked
    up here, in the launcher: the forked child only makes the call."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def setup() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


@dataclass
class Outcome:
    """How the workers ended."""

    codes: dict[int, int] = field(default_factory=dict)  # global rank -> exit code
    failed: list[int] = field(default_factory=list)  # global ranks that failed, in exit order
    signum: int | None = None  # the signal the launcher (or a worker) stopped on
    killed: bool = False  # workers were SIGKILLed (second signal or failure grace)

    @property
    def exit_code(self) -> int:
        if self.signum is not None:
            return 128 + self.signum
        if self.failed:
            code = self.codes[self.failed[0]]
            return code if code > 0 else 128 - code  # a negative code: killed by that signal
        return 0

    def error(self, stage: str) -> LaunchError | None:
        """The one-line error for `stage`, None when every worker succeeded."""
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            if all(code in STOP_CODES for code in self.codes.values()):
                what = "every worker saved a checkpoint and stopped"
            else:
                what = "workers ended with codes " + ", ".join(
                    f"rank {r}: {c}" for r, c in sorted(self.codes.items())
                )
            return LaunchError(
                f"{stage}: stopped by {name}: {what}; run `dvc repro` to resume from the last "
                f"complete checkpoint",
                self.exit_code,
            )
        if self.failed:
            first = self.failed[0]
            others = "the other workers were killed" if self.killed else "the others exited"
            return LaunchError(
                f"{stage}: rank {first} failed first (exit code {self.codes[first]}); {others}; "
                f"fix the error rank {first} printed above and rerun",
                self.exit_code,
            )
        return None


def run(
    cmd: Sequence[str],
    topo: Topology,
    *,
    grace: float = GRACE_SECONDS,
    environ: Mapping[str, str] | None = None,
) -> Outcome:
    """Run `cmd` in `topo.nproc` workers of this node and wait for them (see the module doc)."""
    env = dict(os.environ if environ is None else environ)
    first_rank = topo.node_rank * topo.nproc
    received: list[int] = []
    outcome = Outcome()

    def on_signal(signum, frame) -> None:
        received.append(signum)

    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, on_signal) for s in stop_signals}
    workers: dict[int, subprocess.Popen] = {}
    try:
        log.info("launching %s", topo.describe())
        die_with_launcher = _die_with(os.getpid())
        for local in range(topo.nproc):
            if received:
                break
            workers[first_rank + local] = subprocess.Popen(
                list(cmd),
                env=worker_env(topo, local, env),
                start_new_session=True,  # terminal signals reach the launcher only
                preexec_fn=die_with_launcher,
            )
        _supervise(workers, received, outcome, grace)
        if received and outcome.signum is None:  # stopped before every worker started
            outcome.signum = received[0]
    finally:
        for worker in workers.values():  # only reached with live workers on a launcher bug
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcome


def _supervise(
    workers: dict[int, subprocess.Popen], received: list[int], outcome: Outcome, grace: float
) -> None:
    """Wait for every worker: forward the first signal, kill on the second or after a failure."""
    live = dict(workers)
    forwarded = 0
    kill_at: float | None = None
    while live:
        if len(received) > forwarded:
            if forwarded == 0:
                outcome.signum = received[0]
                name = signal.Signals(received[0]).name
                log.warning(
                    "%s: asking %d workers to finish their step, save a checkpoint and stop "
                    "(signal again to kill them at once)",
                    name,
                    len(live),
                )
                for worker in live.values():
                    worker.send_signal(signal.SIGTERM)
            else:
                log.warning("second signal: killing %d workers", len(live))
                kill_at = time.monotonic()
            forwarded = len(received)
        for rank, worker in list(live.items()):
            code = worker.poll()
            if code is None:
                continue
            del live[rank]
            outcome.codes[rank] = code
            if code in STOP_CODES:
                if outcome.signum is None:  # a worker got the signal directly, the rest follow
                    outcome.signum = code - 128
            elif code != 0:  # also a stop signal's default action: the others cannot finish
                outcome.failed.append(rank)
                log.error("rank %d exited with code %d", rank, code)
                if kill_at is None:
                    kill_at = time.monotonic() + grace
        if live and kill_at is not None and time.monotonic() >= kill_at:
            outcome.killed = True
            for worker in live.values():
                worker.kill()
            for rank, worker in live.items():
                outcome.codes[rank] = worker.wait()
            live.clear()
        time.sleep(_POLL_SECONDS)
