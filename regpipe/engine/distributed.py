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

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from regpipe.core.checks import check_device
from regpipe.core.op import Op
from regpipe.core.rng import rank_seed
from regpipe.loaders.distributed import Ranks, ranks
from regpipe.sampler.epoch_order import EpochOrder

__all__ = ["DistInfo", "RankOrder", "RankSlice", "all_reduce_sum", "rank_order", "rank_seed", "reseed_ops", "resolve_device", "setup",
           "teardown"]


#: This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its machine (``is_main``,
#: ``distributed``); the loaders' :class:`~regpipe.loaders.distributed.Ranks`.
DistInfo = Ranks


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by ``torchrun`` with ``WORLD_SIZE > 1`` (NCCL for CUDA, gloo
    otherwise); one process returns ``DistInfo()`` and initialises nothing."""
    env = ranks()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, checked
    if env.world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env.local_rank)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given.

    Raises:
        ValueError: the name is not a device torch knows, or CUDA is requested but absent.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device("--device", name)


def teardown(info: DistInfo) -> None:
    """Leave the process group joined by :func:`setup`."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def reseed_ops(ops: Iterable[Op], seed: int, rank: int) -> None:
    """Seed every op for ``rank``: ``op.reseed(seed, rank)``, i.e. the op's generators restart from
    :func:`rank_seed` ``(seed, rank)`` (rank 0 keeps ``seed``, so a one-process run draws what it always did).

    Each op decides what reseeding means for it (an op holding sub-ops, e.g. ``Replicate`` and its
    ``Augment``, reseeds them in its own ``reseed``); nothing here looks inside an op. Call it once,
    before the first batch and before restoring a checkpoint's op states (reseeding restarts the
    generators, so it would discard the restored positions).

    Args:
        ops: the run's ops, each with ``reseed(seed, rank)`` (the :class:`~regpipe.core.op.Op` protocol).
        seed: the run's seed (the same on every rank).
        rank: this process's rank, ``>= 0``.

    Raises:
        TypeError: an op without a ``reseed`` method (it is named).
        ValueError: a negative or non-integer rank.
    """
    rank_seed(seed, rank)  # validates rank before any op is touched
    ops = list(ops)
    for op in ops:
        if not callable(getattr(op, "reseed", None)):
            raise TypeError(f"{type(op).__name__} has no reseed(seed, rank) method; every op must define one "
                            "(regpipe.core.op.BatchOp does)")
    for op in ops:
        op.reseed(seed, rank)


def all_reduce_sum(values: Sequence[float], info: DistInfo) -> list[float]:
    """Sum ``values`` over ranks (float64, on the CPU for gloo or the current CUDA device for NCCL)."""
    if not info.distributed:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _rank_part(batch: Sequence[int], info: DistInfo) -> list[int]:
    """Rank ``info.rank``'s contiguous share of one global batch.

    Raises:
        ValueError: a global batch whose size is not divisible by ``world_size`` (the size is named).
    """
    batch, world = [int(i) for i in batch], info.world_size
    if len(batch) % world:
        raise ValueError(f"a global batch of {len(batch)} samples cannot be split over {world} processes; "
                         f"choose a batch size divisible by {world}")
    per_rank = len(batch) // world
    return batch[info.rank * per_rank:(info.rank + 1) * per_rank]


class RankSlice(torch.utils.data.Sampler):
    """Rank ``rank``'s contiguous slice of every global batch of ``batch_sampler`` (a live sampler, iterated
    once per pass).

    Raises:
        ValueError: a global batch whose size is not divisible by ``world_size`` (the size is named).
    """

    def __init__(self, batch_sampler: Iterable[Sequence[int]], info: DistInfo) -> None:
        self.batch_sampler = batch_sampler
        self.info = info

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            yield _rank_part(batch, self.info)


class RankOrder:
    """Rank ``rank``'s contiguous slice of every global batch of an :class:`~regpipe.sampler.epoch_order.EpochOrder`
    (itself one: the slices of epoch ``e`` depend only on ``e``)."""

    def __init__(self, order: EpochOrder, info: DistInfo) -> None:
        self.order, self.info = order, info

    def __len__(self) -> int:
        return len(self.order)

    def batches(self, epoch: int) -> list[list[int]]:
        return [_rank_part(batch, self.info) for batch in self.order.batches(epoch)]


def rank_order(order: EpochOrder | Iterable[Sequence[int]], info: DistInfo) -> EpochOrder | Iterable[Sequence[int]]:
    """This rank's view of the global batch order: :class:`RankOrder` of an epoch order, :class:`RankSlice` of a
    live sampler; the order itself for one process."""
    if not info.distributed:
        return order
    return RankOrder(order, info) if isinstance(order, EpochOrder) else RankSlice(order, info)
