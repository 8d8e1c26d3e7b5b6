"""torch.distributed scale-out: ranks, sharding of work items, gathers and sums across ranks.

A small wrapper over PyTorch's own engine (torch.distributed process groups, started by
`torchrun` / torch.distributed.run with a c10d rendezvous); nothing here launches processes.

    ctx = context()                        # read RANK, WORLD_SIZE, LOCAL_RANK from torchrun
    mine = shard(len(items), ctx, "variants")   # this rank's contiguous range of item indices
    parts = gather(my_result, ctx)         # every rank's object, in rank order, on every rank
    all_reduce_sum_(stats, ctx)            # sums (sufficient statistics) over ranks, in place
    check_same({"lr": lr, ...}, ctx)       # refuse settings that differ between ranks

Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) `context()` returns world_size 1, starts
no process group, and every helper is a no-op (gather returns [obj]), so single-process code
paths stay exactly as they were. With WORLD_SIZE > 1 the default process group is started
once: NCCL when the device is a CUDA device (one per LOCAL_RANK), else gloo.

Elastic restarts (torchrun --max-restarts K): torchrun restarts every worker after one
fails; each rank then resumes from its own partial results (ctx.restart_count > 0 says so).
torchrun's workers share one store with the agent across restarts, so the process group of
each attempt is started under its own store prefix (attempt_{TORCHELASTIC_RESTART_COUNT}):
otherwise the new attempt can read the dead attempt's peer addresses. The prefix assumes
every node restarts together (one node, or nodes whose workers all fail with the lost
peer); for multi-node elastic runs, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the launchers'
environment gives every attempt a fresh store instead.

Every helper is a collective: all ranks must call it, in the same order. Errors that all
ranks can see (a world size larger than the work, settings that differ) are raised on every
rank with the same message, so no rank is left waiting in a collective.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from shortcut_fast.validate import check_int, nested_diff

__all__ = ["DistContext", "context", "shard", "gather", "broadcast", "all_reduce_sum_", "barrier",
           "check_same", "is_main", "rank_suffix", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank in [0, world_size), local_rank on its node, the
    process group's backend ("nccl" | "gloo"; None when world_size is 1), the device this
    rank computes on, and restart_count (torchrun's TORCHELASTIC_RESTART_COUNT: > 0 after an
    elastic restart, when a run should resume from its partial results)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    restart_count: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes result.json and the figures."""
        return self.rank == 0


def _env_int(env, name: str, default: int | None, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"torch.distributed: WORLD_SIZE is set but {name} is not; launch with torchrun "
                             f"(python -m torch.distributed.run), which sets RANK, LOCAL_RANK and WORLD_SIZE")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"torch.distributed: the environment variable {name} must be an int, got {raw!r}") from None
    return check_int(f"the environment variable {name}", value, minimum)


def context(device: str | torch.device | None = None, *, env=None) -> DistContext:
    """This process's DistContext, read from the torchrun environment (RANK, WORLD_SIZE,
    LOCAL_RANK, TORCHELASTIC_RESTART_COUNT; `env` defaults to os.environ).

    device: "cpu", "cuda" (rank's GPU = cuda:LOCAL_RANK) or None (cuda when available, else
    cpu). With WORLD_SIZE > 1 the default process group is initialized here once (a second
    call reuses it): backend nccl on CUDA devices, gloo otherwise.
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1, 1)
    restarts = _env_int(env, "TORCHELASTIC_RESTART_COUNT", 0, 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if world == 1:
        return DistContext(device=device, restart_count=restarts)
    rank = _env_int(env, "RANK", None, 0)
    local_rank = _env_int(env, "LOCAL_RANK", None, 0)
    if rank >= world:
        raise ValueError(f"torch.distributed: RANK {rank} must be smaller than WORLD_SIZE {world}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("torch.distributed: device 'cuda' was asked for, but CUDA is not available here; "
                             "use device 'cpu' (gloo)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"torch.distributed: LOCAL_RANK {local_rank} has no GPU (this node has "
                             f"{torch.cuda.device_count()}); start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist = _dist()
    if dist.is_initialized():
        running = dist.get_backend()
        if running != backend:
            raise ValueError(f"torch.distributed: the process group already runs {running!r}, not {backend!r} "
                             f"as device {device} needs")
        if (dist.get_rank(), dist.get_world_size()) != (rank, world):
            raise ValueError(f"torch.distributed: the process group has rank {dist.get_rank()} of "
                             f"{dist.get_world_size()}, the environment says {rank} of {world}")
    else:
        if backend == "gloo" and not dist.is_gloo_available():
            raise ValueError("torch.distributed: the gloo backend (CPU) is not available in this PyTorch build")
        if backend == "nccl" and not dist.is_nccl_available():
            raise ValueError("torch.distributed: the nccl backend (GPU) is not available in this PyTorch build")
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's workers share the agent's store, which outlives an elastic restart:
            # keys of the killed attempt (peers' old addresses) would be read by the new one
            # (gloo: "connection refused"). A prefix per attempt keeps the attempts apart.
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
            store = dist.PrefixStore(f"shortcut_fast/attempt_{restarts}", store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device,
                       restart_count=restarts)


def _dist():
    if not torch.distributed.is_available():
        raise ValueError("torch.distributed is not available in this PyTorch build; run one process")
    return torch.distributed


def shutdown() -> None:
    """Destroy the default process group if one is running (at the end of a distributed job)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _one(ctx: DistContext | None) -> bool:
    return ctx is None or ctx.world_size == 1


def is_main(ctx: DistContext | None) -> bool:
    """True on rank 0, and always without distribution."""
    return _one(ctx) or ctx.rank == 0


def rank_suffix(ctx: DistContext | None) -> str:
    """'' without distribution, else '.rank{r}': names this rank's own partial-result files."""
    return "" if _one(ctx) else f".rank{ctx.rank}"


# ---------------------------------------------------------------------------------------
# Work items


def shard(n_items: int, ctx: DistContext | None, what: str = "the job") -> range:
    """The contiguous, balanced range of item indices of this rank: the first n % W ranks get
    one item more; ranks in order cover range(n_items). range(n_items) without distribution.
    A world size larger than n_items is refused (ValueError naming `what`)."""
    n = check_int("n_items", n_items, 0)
    if _one(ctx):
        return range(n)
    w, r = ctx.world_size, ctx.rank
    if w > n:
        raise ValueError(f"world size {w} is larger than the {n} work items of {what}; run at most {n} "
                         f"processes (torchrun --nproc-per-node / --nnodes)")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


# ---------------------------------------------------------------------------------------
# Collectives (no-ops in one process)


def gather(obj: Any, ctx: DistContext | None) -> list:
    """Every rank's `obj` (picklable; tensors travel to the CPU first is the caller's choice),
    in rank order, on every rank (all_gather_object). [obj] without distribution."""
    if _one(ctx):
        return [obj]
    out: list = [None] * ctx.world_size
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: Any, ctx: DistContext | None, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (what other ranks pass is ignored). obj itself without
    distribution."""
    if _one(ctx):
        return obj
    box = [obj if ctx.rank == src else None]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext | None) -> torch.Tensor:
    """Sum `tensor` over ranks, in place, and return it. A tensor on another device than the
    process group's (a CPU tensor under nccl) goes through a copy on the rank's device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"all_reduce_sum_: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if _one(ctx):
        return tensor
    dist = _dist()
    if tensor.device == ctx.device and tensor.is_contiguous():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    tmp = tensor.to(ctx.device).contiguous()
    dist.all_reduce(tmp, op=dist.ReduceOp.SUM)
    tensor.copy_(tmp)
    return tensor


def barrier(ctx: DistContext | None) -> None:
    """Wait until every rank gets here."""
    if _one(ctx):
        return
    dist = _dist()
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


# ---------------------------------------------------------------------------------------
# Settings that must agree across ranks


def _canonical(v: Any) -> Any:
    """JSON-able form of a setting (tuples as lists, tensors as lists, paths as str)."""
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, (torch.device, torch.dtype, os.PathLike)):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return v.item()
    return repr(v)


def _diff(a: dict, b: dict) -> list[str]:
    return nested_diff(a, b, "{key}: {old} on rank 0, {new}")


def check_same(settings: dict, ctx: DistContext | None, what: str = "settings") -> None:
    """Refuse settings that differ between ranks: every rank's settings are gathered and
    compared with rank 0's; on a mismatch EVERY rank raises the same ValueError naming the
    ranks and each differing key (rank 0's value and the other rank's). No-op in one process."""
    if not isinstance(settings, dict):
        raise TypeError(f"check_same: settings must be a dict, got {type(settings).__name__}")
    if _one(ctx):
        return
    mine = _canonical(settings)
    text = json.dumps(mine, sort_keys=True, separators=(",", ":"))
    every = gather(text, ctx)
    if all(t == every[0] for t in every):
        return
    first = json.loads(every[0])
    lines = []
    for r, t in enumerate(every):
        if r and t != every[0]:
            keys = [d + f" on rank {r}" for d in _diff(first, json.loads(t))]
            lines.append(f"rank {r} differs from rank 0 in " + "; ".join(keys or ["key order"]))
    raise ValueError(f"the {what} differ across ranks ({'; '.join(lines)}); every process of a distributed "
                     f"run must be started with the same settings")
