"""Training checkpoints: what one holds, how it is written, found and read back for resume.

A checkpoint is a folder `step-XXXXXX` in the run's checkpoint folder, written under a temporary
name and renamed into place, with a `COMPLETE` marker written last; anything else in the folder
(a temp folder left by a kill, a folder without the marker) is never picked up:

    model.safetensors   the trained module's full state dict (plain, unsharded, exact keys)
    ref.safetensors     the reference model, when it is no longer the starting model (iteration > 0)
    optimizer.pt        optimizer state keyed by parameter name (portable across DDP / FSDP)
    scheduler.pt, rng.pt  learning-rate schedule and every RNG state (torch, CUDA, Python)
    dvclive/            the DVCLive folder as of this step, so the resumed plots are the same
    state.json          step, iteration, prompt-sampler position, reward history, skipped steps,
                        W&B run id, and the run fingerprint (params, inputs and code)
    COMPLETE

The `.pt` files hold only tensors and plain containers and are read with `weights_only=True`.
A checkpoint whose fingerprint differs from the current run's is stale: `resumable` removes the
folder so the run starts fresh instead of continuing with other params, data, model or code.

Several nodes: each node's writer keeps its own folder (no shared filesystem needed) and
`agreed` picks the newest step every node has complete with the same fingerprint, else none.
On resume only global rank 0 reads the weights and optimizer state (`load(weights=False)`
elsewhere); the trainer broadcasts them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from grpo import distributed
from grpo.fsutil import atomic_dir

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
KEEP = 2


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (generation uses per-row seeds and needs none of them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, tied ones copied (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def save(
    folder: Path,
    *,
    state: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    ref_state: Mapping[str, torch.Tensor] | None,
    optimizer_state: Mapping[str, Any],
    scheduler_state: Mapping[str, Any],
    log_dir: Path | None,
) -> Path:
    """Write `folder/step-XXXXXX` atomically and keep the newest `KEEP` complete checkpoints."""
    target = folder / f"step-{state['step']:06d}"
    with atomic_dir(target) as tmp:
        save_file(_unshared(model_state), tmp / "model.safetensors")
        if ref_state is not None:
            save_file(_unshared(ref_state), tmp / "ref.safetensors")
        torch.save(dict(optimizer_state), tmp / "optimizer.pt")
        torch.save(dict(scheduler_state), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        if log_dir is not None and log_dir.is_dir():
            shutil.copytree(log_dir, tmp / "dvclive")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        (tmp / COMPLETE).write_text("")
    for old in complete(folder)[:-KEEP]:
        shutil.rmtree(old)
    return target


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if (p / COMPLETE).is_file())


@dataclass
class Checkpoint:
    """A checkpoint read back into memory."""

    path: Path
    state: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ref_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load(path: Path, *, weights: bool = True) -> Checkpoint:
    """Read a checkpoint; `weights=False` skips the model, reference and optimizer files (their
    dicts stay empty: a rank that receives them by broadcast), `ref_state` None still means
    there is no reference file."""
    ref = path / "ref.safetensors"
    return Checkpoint(
        path=path,
        state=json.loads((path / "state.json").read_text()),
        model_state=load_file(path / "model.safetensors") if weights else {},
        ref_state=(load_file(ref) if weights else {}) if ref.exists() else None,
        optimizer_state=(torch.load(path / "optimizer.pt", weights_only=True) if weights else {}),
        scheduler_state=torch.load(path / "scheduler.pt", weights_only=True),
        rng=torch.load(path / "rng.pt", weights_only=True),
    )


def resumable(folder: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint of this very run, or None (then `folder` is emptied).

    Leftovers of an interrupted write (temp folders, folders without COMPLETE) are removed.
    """
    if not folder.is_dir():
        return None
    done = complete(folder)
    for item in folder.iterdir():
        if item not in done:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    if not done:
        return None
    latest = done[-1]
    found = json.loads((latest / "state.json").read_text()).get("fingerprint")
    if found != fingerprint:
        log.warning(
            "%s: made with other params, inputs or code (fingerprint %s, now %s); "
            "starting a fresh run",
            latest,
            str(found)[:12],
            fingerprint[:12],
        )
        for item in done:
            shutil.rmtree(item)
        return None
    return latest


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def agreed(folder: Path, fingerprint: str, d: distributed.Dist) -> Path | None:
    """The checkpoint every node resumes from: the newest step that every node's writer has
    complete with this same fingerprint, or None (a fresh start). A collective.

    Each writer first creates and cleans its folder (`resumable`), and afterwards drops what it
    will not resume from: newer checkpoints, or all of them on a fresh start. The folder exists
    afterwards even if the run saves nothing (`dvc` fails on a missing output).
    """
    view = None
    if d.writes_files:
        folder.mkdir(parents=True, exist_ok=True)
        latest = resumable(folder, fingerprint)
        view = (fingerprint, [_step(p) for p in complete(folder)] if latest else [])
    nodes = [v for v in distributed.all_gather_objects(view, d) if v is not None]
    common: set[int] = set()
    if len({fp for fp, _ in nodes}) > 1:
        log.warning(
            "the nodes' runs differ in params, inputs or code (fingerprints %s); starting a "
            "fresh run",
            ", ".join(sorted({fp[:12] for fp, _ in nodes})),
        )
    else:
        common = set.intersection(*(set(steps) for _, steps in nodes))
    step = max(common, default=None)
    if d.writes_files:
        for path in complete(folder):
            if step is None or _step(path) > step:
                shutil.rmtree(path)
    if step is None:
        if any(steps for _, steps in nodes):
            log.warning("no checkpoint that every node has; starting a fresh run")
        return None
    return folder / f"step-{step:06d}"


def restore_log_dir(ckpt: Path, log_dir: Path) -> None:
    """Put the checkpoint's DVCLive folder back, dropping steps logged after it."""
    snapshot = ckpt / "dvclive"
    if log_dir.exists():
        shutil.rmtree(log_dir)
    if snapshot.is_dir():
        shutil.copytree(snapshot, log_dir)
