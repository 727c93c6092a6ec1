"""Data parallelism on torch.distributed: process groups, DDP / FSDP2 wrapping, collectives.

Owns everything that differs between one process and many (launched by `grpo.launch`): which
rank does what (global rank 0 logs to W&B; each node's local rank 0 writes that node's files),
how the global batch of rows (prompts x completions) is split (contiguous slices, uneven
when the count does not divide, so a group may span ranks), how metrics are gathered, how
gradients are synchronised (DDP all-reduce or FSDP2 `fully_shard` sharding, bf16 all-gathers
when training in bf16), and how a full, plain state dict is rebuilt for saving. With one
process every helper is a no-op, so the trainer has a single code path.

Backend: NCCL on CUDA, gloo on CPU; rendezvous from torch's env:// variables (`grpo.launch`
sets them, multi-node from GRPO_* variables). Saving gathers full tensors collectively but only
the writers keep a CPU copy; loading reads on global rank 0 and broadcasts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from grpo.device import pick_device
from grpo.launch import LAUNCHER_PID


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def writes_files(self) -> bool:
        """This node's writer (local rank 0): checkpoints, the final model and DVCLive files
        live on every node, so no node needs a shared filesystem."""
        return self.local_rank == 0


def init() -> Dist:
    """Join the process group the launcher set up (WORLD_SIZE > 1), else a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device()  # cuda:LOCAL_RANK when CUDA is available
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Dist(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, local_rank, device)


def shutdown() -> None:
    """Leave the process group after a run every rank ended at the same point (done, or stopped
    on a signal); every rank waits for the others first (gloo can hang when one rank tears down
    while another is still finishing its last collective)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort() -> None:
    """Leave the process group after an error on this rank: no barrier (the other ranks may sit
    in a collective that never completes; the launcher stops them)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def under_launcher() -> bool:
    """Whether `grpo.launch` started this process (it escalates repeated signals itself)."""
    return LAUNCHER_PID in os.environ


def resolve_nproc(value: int | str) -> int:
    """`auto` = visible GPUs (1 on CPU)."""
    if value == "auto":
        return max(1, torch.cuda.device_count())
    return int(value)


def split_sizes(n: int, world: int) -> list[int]:
    """Rows of each rank when `n` rows split into `world` contiguous slices: the first
    `n % world` ranks take one more (84 over 8: 11, 11, 11, 11, 10, 10, 10, 10).

    >>> split_sizes(8, 3)
    [3, 3, 2]
    """
    if n < world:
        raise ValueError(f"{n} rows cannot give each of {world} processes one")
    per, extra = divmod(n, world)
    return [per + (rank < extra) for rank in range(world)]


def shard(items: Sequence, d: Dist) -> list:
    """This rank's contiguous share of a global list (`split_sizes`: uneven when needed)."""
    sizes = split_sizes(len(items), d.world)
    start = sum(sizes[: d.rank])
    return list(items[start : start + sizes[d.rank]])


def all_gather_rows(t: torch.Tensor, sizes: Sequence[int], d: Dist) -> torch.Tensor:
    """Concatenate every rank's (sizes[rank], ...) tensor in rank order: (sum(sizes), ...).

    Every rank knows `sizes` (`split_sizes`), so each pads to the largest for the collective
    and drops the padding afterwards: no exchange of sizes first.
    """
    if not d.enabled:
        return t
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))  # (max n, ...)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)


def all_reduce_sum(values: Sequence[float], d: Dist) -> list[float]:
    """Sum a few floats over ranks (float64 on the rank's device)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def wrap(
    model: nn.Module, strategy: str, d: Dist, *, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """DDP-wrap or FSDP2-shard `model` for training; unchanged with one process.

    `param_dtype` (FSDP only): the dtype parameters are all-gathered and computed in (bf16 when
    training under bf16 autocast on a GPU, so neither a rollout token nor a training forward
    all-gathers fp32 weights); gradients are reduced in fp32 and the sharded master weights and
    optimizer states stay fp32. None: all in the parameters' own dtype.
    """
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        options = {}
        if param_dtype is not None:
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=param_dtype, reduce_dtype=torch.float32
            )
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh, **options)
        fully_shard(model, mesh=mesh, **options)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; use ddp or fsdp")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (sharded one by one under FSDP)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying HF model (DDP keeps it in `.module`; FSDP2 shards in place)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for all but the last micro-batch."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


@torch.no_grad()
def copy_parameters(target: nn.Module, source: nn.Module) -> None:
    """Copy `source`'s parameters into `target`, wrapped the same way (each rank copies its own
    shards under FSDP: nothing is gathered)."""
    for model in (target, source):
        for module in model.modules():
            if hasattr(module, "reshard"):  # FSDP2 may keep the root unsharded after a forward
                module.reshard()
    src = dict(unwrap(source).named_parameters())
    for name, param in unwrap(target).named_parameters():
        param.copy_(src[name])


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def _gathered(tree, keep: bool):
    """`tree` with every tensor whole and on the CPU where `keep`, else emptied; sharded
    (DTensor) values are gathered on every rank in the same order (a collective each), and the
    ranks that do not keep them drop each full tensor at once."""
    if isinstance(tree, dict):
        out = {k: _gathered(v, keep) for k, v in tree.items()}
        return out if keep else {}
    if isinstance(tree, list):
        out = [_gathered(v, keep) for v in tree]
        return out if keep else []
    if isinstance(tree, torch.Tensor):
        if hasattr(tree, "full_tensor"):
            tree = tree.full_tensor()
        return tree.detach().cpu() if keep else None
    return tree


def full_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """A plain (unsharded, CPU) state dict on the ranks that `keep` it, {} on the others.

    A collective under FSDP (call it on every rank); under DDP only the keepers copy.
    """
    if not is_sharded(model):
        return _gathered(dict(unwrap(model).state_dict()), keep) if keep else {}
    for module in model.modules():
        if hasattr(module, "reshard"):  # FSDP2 may keep the root unsharded after a forward
            module.reshard()
    return _gathered(dict(model.state_dict()), keep)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> dict:
    """The optimizer state as one plain dict keyed by parameter name, so a checkpoint written
    under one strategy or process count loads under another; {} where not `keep` (a collective
    under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not is_sharded(model) and not keep:
        return {}
    local = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=False)
    )
    return _gathered(local, keep)


def _load_options():
    """Full state dicts; with several processes only rank 0 holds one and broadcasts it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    several = dist.is_initialized() and dist.get_world_size() > 1
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=several)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a plain state dict: rank 0 passes the full dict, the others may pass {} (they
    receive it by broadcast; FSDP keeps only its own shards). `state` is consumed."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_load_options())


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Inverse of `full_optimizer_state`; like `load_full_state_dict`, rank 0's copy counts."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_load_options())


def all_gather_objects(obj, d: Dist) -> list:
    """Every rank's picklable `obj`, in rank order (a collective)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
