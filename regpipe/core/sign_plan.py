"""The plan of online SIGN: which rows of a batch are transformed, and with how many iterations.

:class:`~regpipe.ops.sign.SignAugment` draws it (``draw(batch)``) and applies it (``apply(batch, plan)``);
replaying a plan on the same batch gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SignPlan"]


@dataclass(frozen=True)
class SignPlan:
    """Which rows of a batch are transformed, and with how many SIGN iterations ``K``.

    Attributes:
        rows: ``(M,)`` int64 row indices (distinct), on the batch's device, grouped by ``K``: the first
            ``counts[0]`` get ``iters[0]``, the next ``counts[1]`` get ``iters[1]``, ...
        iters: the ``K`` values, ascending, each ``>= 1``.
        counts: rows per ``K`` (host ints; ``sum(counts) == M``).

    Raises:
        ValueError: ``rows`` is not a 1-D int64 tensor, ``iters`` is not ascending and ``>= 1``, or
            ``counts`` does not match ``iters`` and ``rows``.
    """

    rows: torch.Tensor
    iters: tuple[int, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.rows, torch.Tensor) or self.rows.dim() != 1 or self.rows.dtype != torch.int64:
            raise ValueError(f"SignPlan.rows must be a 1-D int64 tensor, got {getattr(self.rows, 'shape', self.rows)} "
                             f"{getattr(self.rows, 'dtype', '')}")
        iters, counts = tuple(self.iters), tuple(self.counts)
        if not iters or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in iters) \
                or list(iters) != sorted(set(iters)):
            raise ValueError(f"SignPlan.iters must be ascending distinct ints >= 1, got {self.iters!r}")
        if len(counts) != len(iters) or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"SignPlan.counts must be one int >= 0 per K in {iters}, got {self.counts!r}")
        if sum(counts) != self.rows.shape[0]:
            raise ValueError(f"SignPlan.counts {counts} sum to {sum(counts)}, "
                             f"but the plan has {self.rows.shape[0]} rows")
        object.__setattr__(self, "iters", iters)
        object.__setattr__(self, "counts", counts)

    def check_rows(self, n: int) -> None:
        """Raise ``ValueError`` when the plan selects a row that a batch of ``n`` rows does not have.

        (One host synchronisation for a CUDA plan, negligible next to the ``K`` teacher passes per row.)
        """
        if self.rows.numel() and (int(self.rows.min()) < 0 or int(self.rows.max()) >= n):
            raise ValueError(f"this SIGN plan selects rows in [{int(self.rows.min())}, {int(self.rows.max())}], "
                             f"the batch has {n} rows")
