"""Test-Time Sum Augmentation op: draws the partners, then calls the pure predict function (SPEC 1.4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from regpipe.functional.tta import test_time_sum_predict
from regpipe.rng import DeviceGenerator

__all__ = ["TestTimeSumAugmentation", "draw_partners"]


def draw_partners(draws: int, n: int, k: int, generator: torch.Generator, pool_size: int | None = None) -> torch.Tensor:
    """``(draws, n, k - 1)`` random partner indices.

    From the test batch itself (``pool_size=None``) a row never draws itself: indices are drawn from the
    ``n - 1`` other rows. From a reference pool any of its ``pool_size`` rows may be drawn.
    """
    device = generator.device
    if pool_size is None:
        if n < 2:
            raise ValueError(f"test-time sum augmentation within the batch needs >= 2 rows, got {n}")
        idx = torch.randint(0, n - 1, (draws, n, k - 1), generator=generator, device=device)
        own = torch.arange(n, device=device).view(1, n, 1)
        return idx + (idx >= own).long()  # skip the row itself
    if pool_size < 1:
        raise ValueError("the reference pool is empty")
    return torch.randint(0, pool_size, (draws, n, k - 1), generator=generator, device=device)


class TestTimeSumAugmentation:
    """Predict with ``draws`` sum-augmented copies of every test input (paper setting: ``k=2, weight=1``).

    Example:
        >>> import torch
        >>> from regpipe import TestTimeSumAugmentation
        >>> tta = TestTimeSumAugmentation(k=2, draws=4, seed=0)
        >>> probs = tta.predict(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), torch.rand(5, 3, 2, 2))
        >>> probs.shape
        torch.Size([5, 3])
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, k: int = 2, draws: int = 8, weight: float = 1.0, seed: int = 0, chunk_size: int = 1024) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an integer >= 2, got {k!r}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
        self.k, self.draws, self.weight, self.chunk_size = k, draws, weight, chunk_size
        self.rng = DeviceGenerator(seed)

    def predict(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                pool: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, K)`` averaged probabilities for ``x`` ``(N, C, H, W)``; partners from ``pool`` or from ``x``."""
        generator = self.rng.get(x.device)
        partners = draw_partners(self.draws, x.shape[0], self.k, generator,
                                 None if pool is None else pool.shape[0])
        return test_time_sum_predict(model, x, partners, pool=pool, weight=self.weight, chunk_size=self.chunk_size)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])
