"""The one plan every mixing op draws: which rows each output row sums, and with what weights.

Sum Augmentation (Simionescu 2020, section 3.3, and its gradual variant, section 3.5), MixUp (Zhang et al.
2018), CutMix's pairing (Yun et al. 2019) and test-time sum augmentation all form, for every output row
``i``, a weighted sum of ``k`` rows of the batch::

    out[i] = sum_{g < k} weights[i, g] * x[sources[i, g]]          (inputs, and targets alike)

An op's ``draw`` returns a :class:`MixPlan` on the batch's device without reading any device value on the
host; whichever executor runs it (the torch reference :func:`regpipe.functional.sum_mix.mix_rows`, or the
fused kernel of :mod:`regpipe.kernels`) is chosen by the caller, not by the op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from regpipe.core.checks import is_host

__all__ = ["MixPlan"]


@dataclass(frozen=True)
class MixPlan:
    """One batch's mix.

    Attributes:
        sources: ``(N_out, k)`` int64 rows of the batch each output row reads, on the batch's device.
        weights: ``(N_out, k)`` float32 weights on the same device; each row sums to 1 (a zero weight's row is
            not read by the executors that know it is zero: see ``column_weights``).
        column_weights: the ``k`` weights as host floats when every output row has the same ones (Sum
            Augmentation, MixUp), else ``None``. Executors use them to skip zero columns and to build their
            coefficients without reading ``weights`` back from the device.
        groups: the output rows come in contiguous groups of ``groups`` rows that are views of one mixture
            (the ``m`` copies of the same seeds, with the same weights): a consistency loss may compare the
            rows of a group. ``1``: no such groups.
        identity: the plan leaves the batch as it is (one column of weight 1 reading every row in order, made
            by :meth:`unmixed`): executors return the batch unchanged instead of copying it. Declared by the
            plan's maker, since reading ``sources`` to find out would cost a device synchronisation.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit (named); ``column_weights`` that are not ``k``
            finite non-negative host numbers; ``groups`` that do not divide ``N_out``. Device values are never
            read here.
    """

    sources: torch.Tensor
    weights: torch.Tensor
    column_weights: tuple[float, ...] | None = None
    groups: int = 1
    identity: bool = False

    def __post_init__(self) -> None:
        s, w = self.sources, self.weights
        if not isinstance(s, torch.Tensor) or s.dtype != torch.int64 or s.dim() != 2 or s.shape[1] < 1:
            raise ValueError(f"MixPlan.sources must be an (N_out, k) int64 tensor, got "
                             f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
        if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.shape != s.shape:
            raise ValueError(f"MixPlan.weights must be a floating {tuple(s.shape)} tensor like sources, got "
                             f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
        if w.device != s.device:
            raise ValueError(f"MixPlan.sources is on {s.device}, weights on {w.device}")
        if self.column_weights is not None:
            cw = tuple(float(v) for v in self.column_weights)
            if len(cw) != s.shape[1] or not all(math.isfinite(v) and v >= 0 for v in cw):
                raise ValueError(f"MixPlan.column_weights must be {s.shape[1]} finite non-negative numbers, got "
                                 f"{self.column_weights!r}")
            object.__setattr__(self, "column_weights", cw)
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1 \
                or s.shape[0] % self.groups:
            raise ValueError(f"MixPlan.groups must be a positive integer dividing the {s.shape[0]} output rows, got "
                             f"{self.groups!r}")
        if self.identity and (s.shape[1] != 1 or self.column_weights != (1.0,)):
            raise ValueError(f"an identity MixPlan has one column of weight 1, got {s.shape[1]} columns and column "
                             f"weights {self.column_weights!r}")

    @property
    def k(self) -> int:
        """Rows summed into each output row."""
        return int(self.sources.shape[1])

    @property
    def rows_out(self) -> int:
        return int(self.sources.shape[0])

    @property
    def device(self) -> torch.device:
        return self.sources.device

    def check_rows(self, n_rows: int) -> None:
        """Refuse a plan for another batch: ``sources`` must index rows ``0 .. n_rows - 1``. The values are read
        only when they are on the host (an accelerator's plan comes from an op that draws its rows in range;
        reading it back would cost a synchronisation).

        Raises:
            ValueError: the offending row index and the batch size are named.
        """
        s = self.sources
        if not is_host(s) or s.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(s))
        if low < 0 or high >= n_rows:
            raise ValueError(f"the plan reads row {low if low < 0 else high}, outside the batch's {n_rows} rows")

    def active_columns(self) -> list[int]:
        """The columns an executor must read: those with a non-zero ``column_weights`` entry (all when the
        weights vary by row)."""
        if self.column_weights is None:
            return list(range(self.k))
        return [g for g, v in enumerate(self.column_weights) if v != 0.0]

    @classmethod
    def unmixed(cls, n_rows: int, device: torch.device | str) -> MixPlan:
        """The plan that mixes nothing: row ``i`` is row ``i`` (``identity=True``), e.g. Gradually Cascading Sum
        Augmentation's fine-tune phase or Sum Augmentation with ``k = 1``."""
        sources = torch.arange(n_rows, device=device).unsqueeze(1)
        return cls(sources=sources, weights=torch.ones(n_rows, 1, device=device), column_weights=(1.0,),
                   identity=True)

    @classmethod
    def uniform(cls, sources: torch.Tensor, column_weights: tuple[float, ...], groups: int = 1) -> MixPlan:
        """A plan whose every row has ``column_weights`` (the table is expanded on ``sources``' device).

        The ``k`` host weights travel with a non-blocking copy: a blocking host -> accelerator copy waits for the
        stream (a synchronisation), and these host floats need no ordering with the device's queue."""
        w = torch.tensor(column_weights, dtype=torch.float32).to(sources.device, non_blocking=True)
        w = w.expand(sources.shape).contiguous()
        return cls(sources=sources, weights=w, column_weights=tuple(column_weights), groups=groups)
