"""Reliability of the GRPO loop on a tiny model: a run stopped at any step and resumed from its
last checkpoint ends exactly where an uninterrupted run ends; SIGTERM saves and stops; a NaN is
skipped or stops the run without touching the last good checkpoint; stale or half-written
checkpoints are never resumed."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from test_trainer import LengthReward, _cfg, _trainer

from grpo import checkpoint, launch
from grpo.run import Interrupted, Run
from grpo.trainer import NonFiniteError


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even `except Exception`)."""


def _metrics(log_dir: Path) -> dict:
    """Every logged series (the time/ ones aside), read back from DVCLive's TSV files."""
    out = {}
    for tsv in sorted((log_dir / "plots" / "metrics").rglob("*.tsv")):
        name = str(tsv.relative_to(log_dir))
        if "/time/" not in name:
            out[name] = tsv.read_text()
    return out


def _run(tmp_path: Path, cfg, *, kill_after: int | None = None, resume: bool = False):
    """Train; optionally die right after step `kill_after` (before its checkpoint is written);
    return (run, model)."""
    trainer, model = _trainer(tmp_path, cfg)
    run = Run(trainer, tmp_path / "log", {}, fingerprint="fp")
    if kill_after is not None:
        step = run._step

        def dying_step(n, *args):
            step(n, *args)
            if n == kill_after:
                raise Killed

        run._step = dying_step
    found = checkpoint.complete(trainer.checkpoint_dir) if resume else []
    state = checkpoint.load(found[-1]) if found else None
    with contextlib.suppress(Killed):
        run.train(state)
    return run, model


@pytest.mark.parametrize(
    ("overrides", "kill_after", "resumed_from"),
    [
        # killed during step 3's checkpoint write: step 2 is the last complete one
        ({"num_steps": 4}, 3, 2),
        # mid-iteration 2: the saved reference, optimizer and schedule come back
        ({"num_steps": 2, "num_iterations": 2, "mu": 2, "lr_scheduler": "linear"}, 4, 3),
        # between two checkpoints: the steps after the last one are redone, no more
        ({"num_steps": 2, "num_iterations": 2, "save_every": 2}, 4, 2),
    ],
    ids=["one-iteration", "mid-second-iteration", "between-checkpoints"],
)
def test_resumed_run_ends_identical_to_uninterrupted(tmp_path, overrides, kill_after, resumed_from):
    cfg = _cfg(**overrides)
    _, straight = _run(tmp_path / "straight", cfg)
    _run(tmp_path / "killed", cfg, kill_after=kill_after)
    assert checkpoint.complete(tmp_path / "killed/out/checkpoints")[-1].name == (
        f"step-{resumed_from:06d}"
    )
    _, resumed = _run(tmp_path / "killed", cfg, resume=True)
    resumed_state = resumed.state_dict()
    for name, a in straight.state_dict().items():
        assert torch.equal(a, resumed_state[name]), name
    assert _metrics(tmp_path / "killed/log") == _metrics(tmp_path / "straight/log")


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    cfg = _cfg(num_steps=4, save_every=0)
    trainer, _ = _trainer(tmp_path, cfg)

    class TermAtStep2(LengthReward):
        calls = 0

        def score(self, completion, gold):
            TermAtStep2.calls += 1
            if TermAtStep2.calls == 7:  # during step 2 (6 completions per step)
                os.kill(os.getpid(), signal.SIGTERM)
            return super().score(completion, gold)

    trainer.reward_fns = TermAtStep2()
    with pytest.raises(Interrupted, match=r"SIGTERM after step 2 of 4.*dvc repro") as err:
        Run(trainer, tmp_path / "log", {}).train()
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in checkpoint.complete(trainer.checkpoint_dir)] == ["step-000002"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


@pytest.mark.parametrize("launched", [False, True], ids=["alone", "under-launcher"])
def test_a_repeated_signal_stops_at_once_alone_and_is_ignored_under_the_launcher(
    tmp_path, monkeypatch, launched
):
    """Alone, the second signal goes to the previous handler (by default: stop at once). Under
    `grpo.launch` a worker may get one signal twice (`scancel` plus the launcher's forward):
    the repeat is ignored and the step still ends with its checkpoint."""
    if launched:
        monkeypatch.setenv(launch.LAUNCHER_PID, "1")
    else:
        monkeypatch.delenv(launch.LAUNCHER_PID, raising=False)
    trainer, _ = _trainer(tmp_path, _cfg(num_steps=4, save_every=0))
    previous: list[int] = []  # stands in for the default action, which would end pytest

    class TermTwiceAtStep2(LengthReward):
        calls = 0

        def score(self, completion, gold):
            TermTwiceAtStep2.calls += 1
            if TermTwiceAtStep2.calls in (7, 8):  # twice during step 2
                os.kill(os.getpid(), signal.SIGTERM)
            return super().score(completion, gold)

    trainer.reward_fns = TermTwiceAtStep2()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda signum, frame: previous.append(signum))
    try:
        with pytest.raises(Interrupted, match=r"SIGTERM after step 2 of 4"):
            Run(trainer, tmp_path / "log", {}).train()
        os.kill(os.getpid(), signal.SIGTERM)  # after the stop, before the process exits
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    # alone: the repeat and the late one reach the previous handler (the default action would
    # have stopped at once); under the launcher both are ignored until the worker exits
    assert previous == ([] if launched else [signal.SIGTERM, signal.SIGTERM])
    assert [p.name for p in checkpoint.complete(trainer.checkpoint_dir)] == ["step-000002"]


def _nan_at_step(step: int):
    class NanReward(LengthReward):
        calls = 0

        def score(self, completion, gold):
            NanReward.calls += 1
            out = super().score(completion, gold)
            if (NanReward.calls - 1) // 6 + 1 == step:  # 6 completions per step
                out["correctness"] = math.nan
            return out

    return NanReward()


def test_nonfinite_reward_with_stop_fails_naming_the_step(tmp_path):
    trainer, _ = _trainer(tmp_path, _cfg(num_steps=3, nonfinite="stop"))
    trainer.reward_fns = _nan_at_step(2)
    with pytest.raises(NonFiniteError, match=r"non-finite reward .* at step 2.*step-000001\)"):
        Run(trainer, tmp_path / "log", {}).train()
    (good,) = checkpoint.complete(trainer.checkpoint_dir)
    assert good.name == "step-000001"
    checkpoint.load(good)  # intact


def test_nonfinite_reward_with_skip_drops_that_update_only(tmp_path):
    trainer, model = _trainer(tmp_path, _cfg(num_steps=3, nonfinite="skip"))
    trainer.reward_fns = _nan_at_step(2)
    summary = Run(trainer, tmp_path / "log", {}).train()
    assert summary["nonfinite_skipped"] == 1
    one, two = (checkpoint.load(p) for p in checkpoint.complete(trainer.checkpoint_dir))
    for name, before in one.model_state.items():
        assert torch.equal(two.model_state[name], before), name  # step 2 changed nothing
    assert any(not torch.equal(p, one.model_state[n]) for n, p in model.state_dict().items())
    tsv = (tmp_path / "log/plots/metrics/nonfinite_skipped.tsv").read_text().splitlines()
    assert [float(line.split("\t")[1]) for line in tsv[1:]] == [0.0, 1.0, 1.0]


def test_nonfinite_gradient_is_caught(tmp_path):
    trainer, model = _trainer(tmp_path, _cfg(num_steps=1, nonfinite="stop"))
    weight = next(p for p in model.parameters() if p.requires_grad)
    weight.register_hook(lambda g: g * math.nan)
    with pytest.raises(
        NonFiniteError, match=r"non-finite (loss|gradient norm) .* at step 1; no checkpoint was"
    ):
        Run(trainer, tmp_path / "log", {}).train()


def test_stale_and_half_written_checkpoints_are_never_resumed(tmp_path):
    trainer, _ = _trainer(tmp_path, _cfg(num_steps=3))
    Run(trainer, tmp_path / "log", {}, fingerprint="old").train()
    folder = trainer.checkpoint_dir
    assert [p.name for p in checkpoint.complete(folder)] == ["step-000001", "step-000002"]
    (folder / ".step-000003.tmp.abc").mkdir()  # a write killed before its rename
    (folder / "step-000004").mkdir()  # no COMPLETE marker
    latest = checkpoint.resumable(folder, "old")
    assert latest is not None and latest.name == "step-000002"
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001", "step-000002"]
    assert checkpoint.resumable(folder, "new") is None  # other params/inputs/code
    assert list(folder.iterdir()) == []


def test_checkpoint_holds_every_state_and_loads_with_weights_only(tmp_path):
    trainer, _ = _trainer(tmp_path, _cfg(num_steps=3, num_iterations=2, beta=0.04))
    Run(trainer, tmp_path / "log", {}, fingerprint="fp").train()
    latest = checkpoint.complete(trainer.checkpoint_dir)[-1]
    names = {p.name for p in latest.iterdir()}
    assert {"model.safetensors", "ref.safetensors", "optimizer.pt", "scheduler.pt"} <= names
    assert {"rng.pt", "state.json", "dvclive", checkpoint.COMPLETE} <= names
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 5 and state["iteration"] == 1 and state["fingerprint"] == "fp"
    assert len(state["history"]) == 5
    assert not list(latest.glob("*.bin"))


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(num_steps=3, wandb="offline")
    run, _ = _run(tmp_path, cfg, kill_after=2)
    first_id = run.logger.wandb_id
    (latest,) = checkpoint.complete(run.trainer.checkpoint_dir)
    assert json.loads((latest / "state.json").read_text())["wandb_id"] == first_id
    resumed, _ = _run(tmp_path, cfg, resume=True)
    assert first_id and resumed.logger.wandb_id == first_id


def test_fingerprint_covers_model_dtype_and_all_sources(tmp_path, monkeypatch):
    """A resumed run must compute what the interrupted one did: the base dtype (LoRA loads its
    frozen base in it) and every source file of `grpo/`, in subpackages too (the C kernels of
    grpo/kernels/csrc pick the sampled tokens), are part of it."""
    import shutil

    import yaml

    from grpo import config
    from stages import train as stage

    repo = Path(stage.REPO)
    fake = tmp_path / "repo"
    shutil.copytree(repo / "grpo", fake / "grpo", ignore=shutil.ignore_patterns("__pycache__"))
    (fake / "stages").mkdir()
    shutil.copy(repo / "stages" / "train.py", fake / "stages" / "train.py")
    monkeypatch.setattr(stage, "REPO", fake)
    model_dir, data = tmp_path / "model", tmp_path / "train.jsonl"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    data.write_text("{}\n")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    base = stage.fingerprint(config.Params.from_dict(raw), model_dir, data)
    raw["model"]["dtype"] = "bfloat16"
    assert stage.fingerprint(config.Params.from_dict(raw), model_dir, data) != base
    raw["model"]["dtype"] = "auto"
    assert stage.fingerprint(config.Params.from_dict(raw), model_dir, data) == base
    for source in ("kernels/csrc/gumbel.c", "kernels/csrc/vector_math.h", "decoding/llama.py"):
        path = fake / "grpo" / source
        text = path.read_text()
        path.write_text(text + "\n")
        assert stage.fingerprint(config.Params.from_dict(raw), model_dir, data) != base, source
        path.write_text(text)
    assert stage.fingerprint(config.Params.from_dict(raw), model_dir, data) == base
