"""The op contract every batch op follows (sum mixing, PatchUp plans, replication, augmentations, SIGN, TTA).

An op is a thin object around a pure function of :mod:`regpipe.functional`:

* ``draw(batch) -> params``: every random choice for this batch, as a frozen dataclass, from the op's
  own :class:`~regpipe.core.rng.DeviceGenerator` (never a global generator);
* ``apply(batch, params) -> Batch``: the deterministic part; it calls the pure function. Replaying the
  same params on the same batch gives the same result (kornia's ``forward(input, params)``);
* ``op(batch)`` is ``apply(batch, draw(batch))``;
* ``state_dict()`` / ``load_state_dict()``: hyper-parameters, schedule position and generator state, so
  an interrupted run resumes drawing what the uninterrupted one would have drawn;
* ``reseed(seed, rank)``: an explicit per-rank seed under ``torchrun`` (:func:`~regpipe.core.rng.rank_seed`).

:class:`BatchOp` implements the shared plumbing; an op subclasses it and writes ``draw`` and ``apply``
(and extends ``state_dict`` with its own settings).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from regpipe.core.batch import Batch
from regpipe.core.rng import DeviceGenerator, rank_seed

__all__ = ["BatchOp", "Op", "Params"]

Params = TypeVar("Params")


@runtime_checkable
class Op(Protocol):
    """What the loaders and the engine may rely on: a callable ``Batch -> Batch`` with state and seeds."""

    def __call__(self, batch: Batch) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def reseed(self, seed: int, rank: int = 0) -> None: ...


class BatchOp(ABC, Generic[Params]):
    """Base of every batch op: one generator, ``draw`` then ``apply``, state and per-rank seeds.

    Args:
        seed: seed of the op's generator (created lazily on the first batch's device).
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = DeviceGenerator(seed)

    @abstractmethod
    def draw(self, batch: Batch) -> Params:
        """Every random choice the op makes for ``batch``, from ``self.rng`` on ``batch.device``."""

    @abstractmethod
    def apply(self, batch: Batch, params: Params) -> Batch:
        """The op with the given parameters (deterministic: the same params give the same batch)."""

    def __call__(self, batch: Batch, params: Params | None = None) -> Batch:
        return self.apply(batch, self.draw(batch) if params is None else params)

    def reseed(self, seed: int, rank: int = 0) -> None:
        """Restart the generator from ``rank_seed(seed, rank)``: ranks of a ``torchrun`` job draw their own
        parameters, rank 0 draws what a one-process run draws."""
        self.rng.reseed(rank_seed(seed, rank))

    def state_dict(self) -> dict[str, Any]:
        """The generator's state; subclasses add their settings and schedule position."""
        return {"rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" not in state:
            raise KeyError(f"{type(self).__name__} state has no 'rng' entry (keys: {sorted(state)})")
        self.rng.load_state_dict(state["rng"])
