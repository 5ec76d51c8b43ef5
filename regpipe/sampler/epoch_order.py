"""The order of the training batches, as a function of the epoch, and the passes a loader reads.

A training run reads its batches through a loader (torch ``DataLoader``, DALI, FFCV) that asks for the
next epoch's index lists on its own schedule: DALI and FFCV ask for epoch ``e + 1`` while the loop is still
training on epoch ``e``. A sampler whose next pass depends on a generator's running state then makes
resuming fragile: the state to save is the one at the start of a pass the loader may already have
drawn. Here the order of epoch ``e`` is a pure function of ``(seed, e)`` (:class:`ShuffledBatches`, the
:class:`EpochOrder` protocol), as ``torch.utils.data.DistributedSampler`` does with ``set_epoch``: a
resumed run recomputes it, and drops the batches already trained on without loading them
(:class:`EpochPasses`).

A sampler whose order depends on the model while the epoch runs (the loss orderer scores samples with
the current weights) cannot be recomputed: :class:`EpochPasses` iterates it once per pass as it is, and a
run using it resumes at epoch ends (``skip`` must be 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["EpochOrder", "EpochPasses", "ShuffledBatches", "epoch_seed"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a run seeded ``seed``: numpy's ``SeedSequence`` hash of the two
    integers, so epochs (and seeds) get unrelated streams, not ``seed + epoch`` neighbours."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@runtime_checkable
class EpochOrder(Protocol):
    """Global batches per epoch that depend only on the epoch (and fixed settings such as the seed).

    ``batches(e)`` must return the same index lists whenever it is called; ``len()`` is the number of
    batches of an epoch.
    """

    def batches(self, epoch: int) -> list[list[int]]: ...

    def __len__(self) -> int: ...


class ShuffledBatches:
    """Epoch ``e``: a permutation of ``range(num_rows)`` drawn from a generator seeded with
    :func:`epoch_seed` ``(seed, e)``, cut into ``num_batches`` batches of ``batch_size`` (the rest of the
    permutation is not read that epoch, as ``drop_last=True``).

    Args:
        num_rows: rows of the training set, ``>= 1``.
        batch_size: indices per batch, ``>= 1``.
        num_batches: batches per epoch, ``1 <= num_batches * batch_size <= num_rows``; default
            ``num_rows // batch_size``.
        seed: the run's seed.

    Raises:
        ValueError: sizes outside those ranges (the values are named).

    Example:
        >>> order = ShuffledBatches(10, batch_size=4, seed=0)
        >>> len(order), [len(b) for b in order.batches(0)]
        (2, [4, 4])
        >>> order.batches(3) == ShuffledBatches(10, 4, seed=0).batches(3), order.batches(0) == order.batches(1)
        (True, False)
    """

    def __init__(self, num_rows: int, batch_size: int, num_batches: int | None = None, seed: int = 0) -> None:
        for name, value in (("num_rows", num_rows), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        num_batches = num_rows // batch_size if num_batches is None else num_batches
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1 \
                or num_batches * batch_size > num_rows:
            raise ValueError(f"{num_batches!r} batches of {batch_size} do not fit in {num_rows} rows "
                             f"(batch_size={batch_size} exceeds the training rows, or num_batches is not >= 1)")
        self.num_rows, self.batch_size, self.num_batches, self.seed = num_rows, batch_size, num_batches, seed

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        perm = torch.randperm(self.num_rows, generator=generator)[:self.num_batches * self.batch_size]
        return perm.view(self.num_batches, self.batch_size).tolist()


class EpochPasses:
    """What a loader iterates: one pass per ``iter()``, epoch ``start_epoch`` first (without its first
    ``skip`` batches: a resumed run's position), then ``start_epoch + 1``, ...

    Every loader iterates its batch sampler exactly once per epoch, in epoch order, however far ahead it
    prefetches, so counting passes here tells which epoch a pass is.

    Args:
        order: an :class:`EpochOrder` (recomputed per epoch), or any re-iterable batch sampler (iterated
            as it is once per pass; a live order, e.g. the loss orderer's).
        start_epoch: the epoch of the first pass, ``>= 0``.
        skip: batches of the first pass already trained on, ``0 <= skip < len(order)``; only with an
            :class:`EpochOrder` (a live order cannot be replayed).

    Raises:
        ValueError: a negative start, a skip out of range or with a live order (the values are named).
    """

    def __init__(self, order: EpochOrder | Iterable[Sequence[int]], start_epoch: int = 0, skip: int = 0) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ValueError(f"skip must be an integer >= 0, got {skip!r}")
        if skip and not isinstance(order, EpochOrder):
            raise ValueError(f"skip={skip}: a {type(order).__name__} order depends on the run while it is drawn and "
                             "cannot be replayed part-way; resume it at an epoch start")
        if skip and skip >= len(order):
            raise ValueError(f"skip={skip} drops the whole epoch of {len(order)} batches")
        self.order, self.next_epoch, self._skip = order, start_epoch, skip

    @property
    def replayable(self) -> bool:
        """Whether an epoch can be recomputed and entered part-way (mid-epoch resume)."""
        return isinstance(self.order, EpochOrder)

    def __len__(self) -> int:
        return len(self.order)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.next_epoch, self._skip
        self.next_epoch, self._skip = epoch + 1, 0
        if isinstance(self.order, EpochOrder):
            yield from self.order.batches(epoch)[skip:]
        else:
            yield from ([int(i) for i in batch] for batch in self.order)
