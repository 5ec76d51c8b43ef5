"""Multi-process training under ``torchrun`` (DistributedDataParallel), without home-made coordination.

The launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) is
read by ``torch.distributed``; nothing here is needed for one process (every helper is then the
identity). Conventions **(ours, Composer's)**:

* ``--batch-size`` is the **global** batch: every rank draws the same global batch order from the
  run's seed and takes its contiguous slice (:class:`RankSlice`), so a run on ``N`` processes sees
  the same samples per step as one process, and a model without BatchNorm takes the same steps.
* Ops draw per-rank parameters: their generators are re-seeded from ``(seed, rank)``
  (:func:`rank_seed`, :func:`reseed_ops`); rank 0 keeps the seed, so a one-process run is unchanged.
  Each generator then advances with every step, so a rank's draws follow from (seed, rank, step).
* Metrics are reduced across ranks (:func:`all_reduce_sum`); only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from regpipe.rng import DeviceGenerator

__all__ = ["DistInfo", "RankSlice", "all_reduce_sum", "rank_seed", "reseed_ops", "setup", "teardown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1`` (NCCL for CUDA, gloo
    otherwise); one process returns ``DistInfo()`` and initialises nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def teardown(info: DistInfo) -> None:
    """Leave the process group joined by :func:`setup`."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s generators: ``seed`` on rank 0, a distinct large offset on the others."""
    return seed + rank * 1_000_003


def reseed_ops(ops: Iterable[object], rank: int) -> None:
    """Give every op's generators (attributes holding a :class:`~regpipe.rng.DeviceGenerator`, also one level
    down, e.g. ``Replicate.augment.rng``) the seed :func:`rank_seed` of their seed and ``rank``."""
    if rank == 0:
        return
    for op in ops:
        for owner in (op, *(v for v in vars(op).values() if hasattr(v, "__dict__"))):
            for name, value in list(vars(owner).items()):
                if isinstance(value, DeviceGenerator):
                    setattr(owner, name, DeviceGenerator(rank_seed(value.seed, rank)))


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Sum ``values`` over ranks (float64, on the CPU for gloo or the current CUDA device for NCCL)."""
    if not info.distributed:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class RankSlice(torch.utils.data.Sampler):
    """Rank ``rank``'s contiguous slice of every global batch of ``batch_sampler``.

    Raises:
        ValueError: a global batch whose size is not divisible by ``world_size`` (the size is named).
    """

    def __init__(self, batch_sampler: Iterable[Sequence[int]], info: DistInfo) -> None:
        self.batch_sampler = batch_sampler
        self.info = info

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self.info.rank, self.info.world_size
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) % world:
                raise ValueError(f"a global batch of {len(batch)} samples cannot be split over {world} processes; "
                                 f"choose a batch size divisible by {world}")
            per_rank = len(batch) // world
            yield batch[rank * per_rank:(rank + 1) * per_rank]
