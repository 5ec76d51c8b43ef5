"""Multi-GPU helpers for user pipelines under ``torchrun``: each rank reads its own shard and draws its own
randomness.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in every process. A DALI reader shards with
``shard_id`` / ``num_shards`` (:func:`dali_shard`), an FFCV ``Loader`` with ``distributed=True`` (it reads the
rank from ``torch.distributed``; :func:`ffcv_distributed`), and every regpipe op and FFCV operation
draws from ``rank_seed(seed, rank)`` (:func:`reseed`): rank 0 keeps the single-process draws, the others
differ (``seed + rank * 1_000_003``), so ranks never mix or crop alike.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from regpipe.core.rng import rank_seed

__all__ = ["Ranks", "ranks", "dali_shard", "ffcv_distributed", "reseed"]


@dataclass(frozen=True)
class Ranks:
    """``rank`` (global), ``world_size`` and ``local_rank`` (the GPU on this node) of this process (the defaults:
    one process). The training engine's ``DistInfo``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int, env: dict[str, str]) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"${name} must be >= 0, got {value}")
    return value


def ranks(env: dict[str, str] | None = None) -> Ranks:
    """This process's ranks from the ``torchrun`` environment (one process: rank 0 of 1).

    Raises:
        ValueError: a variable that is not a non-negative integer, or ``RANK >= WORLD_SIZE`` (named).
    """
    env = dict(os.environ) if env is None else env
    world = _env_int("WORLD_SIZE", 1, env)
    rank = _env_int("RANK", 0, env)
    local = _env_int("LOCAL_RANK", rank, env)
    if world < 1 or rank >= world:
        raise ValueError(f"$RANK={rank} must be below $WORLD_SIZE={world}")
    return Ranks(rank=rank, world_size=world, local_rank=local)


def dali_shard(env: dict[str, str] | None = None) -> dict[str, int]:
    """Keyword arguments for a DALI reader and ``pipeline_def``: ``shard_id``/``num_shards`` (the reader's slice)
    and ``device_id`` (this node's GPU): ``fn.readers.file(..., **dali_shard())`` minus ``device_id``, which
    goes to the pipeline. Use ``DaliLoader(..., reader_name=...)`` so each rank's epoch is its shard's size."""
    r = ranks(env)
    return {"shard_id": r.rank, "num_shards": r.world_size, "device_id": r.local_rank}


def ffcv_distributed(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for an FFCV ``Loader`` on this rank: ``distributed`` (more than one rank; FFCV then
    needs ``torch.distributed`` initialised and an order of ``RANDOM`` or ``SEQUENTIAL``)."""
    return {"distributed": ranks(env).world_size > 1}


def reseed(ops: Iterable[Any], seed: int, env: dict[str, str] | None = None) -> None:
    """Give every op its per-rank seed: ``op.reseed(seed, rank)`` for regpipe ops (``rank_seed(seed, rank)``),
    and ``op.seed = rank_seed(seed, rank)`` for regpipe's FFCV operations and decoders (counter-based draws;
    set before the ``Loader`` compiles them).

    Raises:
        TypeError: an op that has neither ``reseed`` nor a ``seed`` attribute (named).
    """
    rank = ranks(env).rank
    for op in ops:
        if hasattr(op, "reseed"):
            op.reseed(seed, rank)
        elif hasattr(op, "seed") and hasattr(op, "set_epoch"):
            op.seed = rank_seed(seed, rank)
        else:
            raise TypeError(f"{type(op).__name__} has no per-rank seed (no reseed(), not a regpipe FFCV operation)")
