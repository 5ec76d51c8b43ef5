"""Explicit, resumable randomness: one ``torch.Generator`` per op, on the batch's device.

Every op owns a :class:`DeviceGenerator`; nothing draws from torch's or numpy's global generators, so
the same seed gives the same batches and a resumed run draws what the uninterrupted run would have.

Draws the host must know before it can launch anything (a batch's MixUp ``lam``, a CutMix box) come from a
:class:`HostGenerator` the op owns as well: reading them back from the device generator would cost a device
synchronisation per batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["DeviceGenerator", "HostGenerator", "rank_seed"]


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s generators under ``torchrun``: ``seed`` on rank 0 (a one-process run is
    unchanged), ``seed + rank * 1_000_003`` on the others (a prime stride, so ranks never share a seed)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
    return seed + rank * 1_000_003


class DeviceGenerator:
    """A seeded ``torch.Generator`` created lazily on the device of the first batch it serves.

    Ops draw their parameters from it, so the same seed gives the same parameters, and its state goes
    into the op's ``state_dict`` so a resumed run draws what the uninterrupted run would have drawn.
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: torch.Tensor | None = None

    def get(self, device: torch.device | str) -> torch.Generator:
        """The generator on ``device`` (created and seeded on first use; moving devices is an error)."""
        device = torch.device(device)
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        elif self._generator.device.type != device.type:
            raise ValueError(f"this op's generator lives on {self._generator.device}, the batch is on {device}; "
                             "use one op instance per device")
        return self._generator

    def reseed(self, seed: int) -> None:
        """Start over from ``seed`` (the generator is created again on the next batch's device)."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._generator = None
        self._pending_state = None

    def state_dict(self) -> dict[str, Any]:
        state = self._generator.get_state() if self._generator is not None else self._pending_state
        return {"seed": self.seed, "generator": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generator = None
        self._pending_state = state["generator"]


class HostGenerator:
    """A seeded numpy generator (PCG64) for the draws an op needs as host numbers.

    Per-row choices (permutations, partner indices) are drawn on the batch's device by
    :class:`DeviceGenerator`; scalars that decide what the host launches (one ``lam`` per batch, a box, a
    coin) are drawn here, so no device value is read back. Its state goes into the op's ``state_dict`` like the
    device generator's.

    Attributes:
        numpy: the ``numpy.random.Generator`` to draw from.
    """

    def __init__(self, seed: int) -> None:
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start over from ``seed``."""
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.numpy = np.random.Generator(np.random.PCG64(seed))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "state": self.numpy.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in ("seed", "state") if key not in state]
        if missing:
            raise KeyError(f"HostGenerator state lacks {missing} (keys: {sorted(state)})")
        self.reseed(int(state["seed"]))
        self.numpy.bit_generator.state = state["state"]
