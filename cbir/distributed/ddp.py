"""Data-parallel training with ``torch.distributed`` + ``DistributedDataParallel`` (``torchrun``).

``torchrun --nproc-per-node N -m cbir.cli train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables) in their environment; the engine
(:func:`cbir.engine.train`) sees them through :func:`detect`, and :func:`setup` initialises the
process group: **gloo** on CPU, **nccl** on CUDA (chosen from the device), one device per local
rank (``cuda:LOCAL_RANK``).

The *global* batch is the batch a 1-process run with the same seed draws (the class-balanced
``P x K`` sampler or the seeded shuffle); :class:`ShardedBatchSampler` gives rank ``r`` the
items ``r, r + N, r + 2N, ...`` of it, so the ranks hold disjoint parts of one global batch.
Mean-over-batch loss terms are then global means after DDP's gradient averaging (exactly so when
N divides the batch). Terms that couple items of the batch (DDTL's per-class NT-Xent) are
computed over the global batch: inside :func:`global_batch` the loss calls :func:`gather_cat`,
an all-gather with gradients (``torch.distributed.nn.functional.all_gather``) whose backward
sums every rank's gradient into the local part; every rank computes the same global term, so
after DDP's average the gradient equals the 1-process gradient of that term.

DDTL's optional per-class node-balance term (``balance > 0``) gathers its node logits the same
way, so it too is the global batch's term.

Not global (documented limits): BatchNorm statistics are per rank (DDP keeps rank 0's running
statistics); augmentation draws differ from a 1-process run (each rank augments its own items);
DDTL's monitoring statistics (``saturation``, ``paths_per_class``) are per rank, averaged.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "detect",
    "setup",
    "teardown",
    "ShardedBatchSampler",
    "global_batch",
    "gather_cat",
    "is_gathering",
    "LossModule",
    "all_reduce_mean",
    "all_reduce_max",
]

_GATHER = False


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv | None:
    """The torchrun environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError as e:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {e}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"invalid torchrun environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    return DistEnv(rank, world, local)


def setup(env: DistEnv, device: torch.device) -> torch.device:
    """Initialise the process group (nccl for CUDA, gloo otherwise); returns this rank's device."""
    if device.type == "cuda":
        if device.index is None:
            if env.local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                    "use --nproc-per-node <= the number of GPUs"
                )
            device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("RANK/WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not; start with torchrun")
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **kw)
    return device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatchSampler:
    """Rank ``rank``'s part (items ``rank::world_size``) of each global batch of ``base``.

    ``base`` is any batch sampler (e.g. :class:`cbir.data.sampler.ClassBalancedBatchSampler`);
    every rank builds it with the same seed, so all ranks see the same global batches."""

    def __init__(self, base, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.base, self.rank, self.world_size = base, int(rank), int(world_size)

    def __getattr__(self, name):  # p, k, num_batches ... of the base sampler
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self):
        for batch in self.base:
            batch = list(batch)
            if len(batch) < self.world_size:
                raise ValueError(
                    f"a global batch of {len(batch)} items cannot be split over {self.world_size} "
                    "processes; use a larger batch or fewer processes"
                )
            yield batch[self.rank :: self.world_size]


@contextlib.contextmanager
def global_batch(active: bool = True):
    """Within this block, batch-coupled loss terms gather the global batch (:func:`gather_cat`)."""
    global _GATHER
    prev, _GATHER = _GATHER, bool(active) and dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        _GATHER = prev


def is_gathering() -> bool:
    return _GATHER


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of ``t``'s rows, with gradients to the local rows.

    Ranks may hold different numbers of rows: they are padded to the largest for the gather."""
    if not _GATHER:
        return t
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    m = max(sizes)
    padded = t if t.shape[0] == m else torch.cat([t, t.new_zeros((m - t.shape[0],) + tuple(t.shape[1:]))], 0)
    if t.requires_grad or torch.is_floating_point(t):
        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(padded.contiguous())
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)


class LossModule(torch.nn.Module):
    """``forward(images, targets) = method.training_loss(...)``, so DDP can wrap a method."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, images, targets):
        return self.method.training_loss(images, targets)


def _reduce(values: list[float], op, device, mean: bool) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    if mean:
        t /= dist.get_world_size()
    return t.tolist()


def all_reduce_mean(values: list[float], device) -> list[float]:
    return _reduce(values, dist.ReduceOp.SUM, device, mean=True)


def all_reduce_max(values: list[float], device) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX, device, mean=False)
