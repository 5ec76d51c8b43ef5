"""Test-Time Sum Augmentation op: draw the partners, then call the pure predict function.

Simionescu (2020), *Deep Learning Training Procedure Augmentations* (MSc thesis, arXiv:2211.14395),
section 3.6: a test input ``x`` is predicted ``M`` times, each time mixed with ``k - 1`` random other
inputs ``x_{rho_{j,1}}, ..., x_{rho_{j,k-1}}``,

    ``x~_j = (w * x + sum_{r=1}^{k-1} x_{rho_{j,r}}) / (w + k - 1)``,  ``p(x) = (1/M) sum_j softmax(f(x~_j))``,

and the predicted class is ``argmax p(x)``. The thesis uses ``k = 2`` and ``w = 1`` (plain averaging),
partners from the test set; here they come from the same test batch (never the row itself) or from a
reference pool.

The op follows the op contract (:class:`~regpipe.core.op.BatchOp`) for its randomness: ``draw(batch)``
returns a frozen :class:`TTAParams`, and ``reseed`` / ``state_dict`` come from the base. Its result,
though, is predictions, not a batch: :meth:`TestTimeSumAugmentation.predict` is the method to call.
``apply(batch, params)`` returns the ``M * N`` mixed inputs as a :class:`~regpipe.core.batch.Batch`
(for inspection and replay); ``predict`` does not build that batch but streams the mixes through the
model in chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from regpipe.core.batch import Batch
from regpipe.core.checks import check_finite_number
from regpipe.core.mix_plan import MixPlan
from regpipe.core.op import BatchOp
from regpipe.functional.partners import draw_partners
from regpipe.functional.tta import test_time_sum_predict
from regpipe.ops.sum_mix import mix_batch

__all__ = ["TTAParams", "TestTimeSumAugmentation", "draw_partners"]


def _tta_weights(weight: float, k: int) -> tuple[float, ...]:
    """``c = (w, 1, ..., 1) / (w + k - 1)``: the row itself and its ``k - 1`` partners."""
    denom = weight + k - 1
    return (weight / denom,) + (1.0 / denom,) * (k - 1)


@dataclass(frozen=True)
class TTAParams(MixPlan):
    """The random choices of one test-time sum augmentation call: the :class:`~regpipe.core.mix_plan.MixPlan` of
    its ``M * N`` mixed rows. Row ``j * N + i`` (draw ``j`` of input ``i``) reads ``sources[j * N + i] = [i,
    partners...]`` with the weights ``(w, 1, ..., 1) / (w + k - 1)``; the partner columns index the batch itself,
    or a reference pool of ``pool_size`` rows.

    Attributes:
        draws: ``M``, the number of mixes per input.
        pool_size: ``None`` when the partners index the test batch itself, else the size of the
            reference pool they index.

    Raises:
        ValueError: what :class:`MixPlan` refuses, fewer than 2 columns, ``draws`` not dividing the rows, or
            ``pool_size`` not ``None`` or a positive integer.
    """

    draws: int = 1
    pool_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sources.shape[1] < 2:
            raise ValueError(f"TTAParams needs the row and at least one partner (k >= 2), got {self.sources.shape[1]} "
                             "column(s)")
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1 \
                or self.sources.shape[0] % self.draws:
            raise ValueError(f"TTAParams.draws must be a positive integer dividing the {self.sources.shape[0]} rows, "
                             f"got {self.draws!r}")
        if self.pool_size is not None and (isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int)
                                           or self.pool_size < 1):
            raise ValueError(f"TTAParams.pool_size must be None or an integer >= 1, got {self.pool_size!r}")

    @classmethod
    def from_partners(cls, partners: torch.Tensor, weight: float = 1.0, pool_size: int | None = None) -> TTAParams:
        """The plan of ``(M, N, k - 1)`` int64 partner indices (``partners[j, i, r]``: the ``r``-th partner of row
        ``i`` in draw ``j``) with the row's own weight ``weight``."""
        p = partners
        if not isinstance(p, torch.Tensor) or p.dtype != torch.int64 or p.dim() != 3 or 0 in (p.shape[0], p.shape[2]):
            raise ValueError(f"partners must be an (M, N, k - 1) int64 tensor with M, k - 1 >= 1, got "
                             f"{getattr(p, 'dtype', type(p).__name__)} of shape {tuple(getattr(p, 'shape', ()))}")
        draws, n, _ = p.shape
        own = torch.arange(n, device=p.device).repeat(draws).unsqueeze(1)
        sources = torch.cat([own, p.reshape(draws * n, -1)], dim=1)
        return cls.uniform(sources, _tta_weights(weight, p.shape[2] + 1), draws=draws, pool_size=pool_size)

    @classmethod
    def uniform(cls, sources: torch.Tensor, column_weights: tuple[float, ...], groups: int = 1,
                draws: int = 1, pool_size: int | None = None) -> TTAParams:
        plan = MixPlan.uniform(sources, column_weights, groups)
        return cls(sources=plan.sources, weights=plan.weights, column_weights=plan.column_weights, groups=groups,
                   draws=draws, pool_size=pool_size)

    @property
    def partners(self) -> torch.Tensor:
        """``(M, N, k - 1)`` int64, ``partners[j, i, r]`` = the ``r``-th partner of row ``i`` in draw ``j``."""
        return self.sources[:, 1:].reshape(self.draws, self.batch_size, self.k - 1)

    @property
    def batch_size(self) -> int:
        """``N``, the number of test inputs the partners were drawn for."""
        return self.rows_out // self.draws


class TestTimeSumAugmentation(BatchOp[TTAParams]):
    """Predict with ``draws`` sum-augmented copies of every test input (thesis setting: ``k=2, weight=1``).

    Args:
        k: inputs per mix (the row and ``k - 1`` partners), ``>= 2``.
        draws: ``M``, mixes per input.
        weight: ``w``, the weight of the input being predicted.
        seed: seed of the partner generator.
        chunk_size: rows per forward pass in :meth:`predict`.

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
        super().__init__(seed)
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"k must be an integer >= 2, got {k!r}")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
        check_finite_number("weight", weight, 0.0, low_open=True)  # inf would drown the partners, nan poison all
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.k, self.draws, self.weight, self.chunk_size = k, draws, float(weight), chunk_size

    def _draw(self, n: int, device: torch.device, pool_size: int | None, replicas: int = 1) -> TTAParams:
        partners = draw_partners(self.draws, n, self.k, self.rng.get(device), pool_size, replicas=replicas)
        return TTAParams.from_partners(partners, self.weight, pool_size)

    def draw(self, batch: Batch, pool_size: int | None = None) -> TTAParams:
        """Partners for the ``N`` rows of ``batch``: from the batch itself (never a row of the row's own seed,
        ``Batch.replicas``), or from a pool of ``pool_size`` rows; on the batch's device, nothing read back."""
        return self._draw(batch.size, batch.device, pool_size, batch.replicas)

    def apply(self, batch: Batch, params: TTAParams) -> Batch:
        """The ``M * N`` mixed test inputs as a batch: row ``j * N + i`` is draw ``j`` of row ``i``.

        Each row is ``sum_g c_g x_{s_g}`` with ``c = (w, 1, ..., 1) / (w + k - 1)`` over the row itself
        and its partners, targets mixed alike, and ``mixing`` records the components (indices into
        ``batch``). Deterministic; :meth:`predict` runs the model on the same mixes without
        materialising them (equal up to float rounding: it divides the sum by ``w + k - 1`` once).

        Raises:
            ValueError: ``params`` index a reference pool (its rows are not in ``batch``), or were drawn for
                another number of rows.
        """
        if not isinstance(params, TTAParams):
            raise TypeError(f"TestTimeSumAugmentation.apply needs TTAParams, got {type(params).__name__}")
        if params.pool_size is not None:
            raise ValueError(f"these partners index a reference pool of {params.pool_size} rows, not the batch; "
                             "only partners drawn from the batch itself can be applied to it")
        if params.batch_size != batch.size:
            raise ValueError(f"these partners were drawn for {params.batch_size} rows, the batch has {batch.size}")
        self._check_weights(params)
        return mix_batch(batch, params)

    def _check_weights(self, params: TTAParams) -> None:
        """Replayed partners mix with this op's weights: refuse ones drawn with another ``weight``."""
        if params.column_weights != _tta_weights(self.weight, params.k):
            raise ValueError(f"these partners carry the weights {params.column_weights}, this op's are "
                             f"{_tta_weights(self.weight, params.k)} (weight={self.weight})")

    def predict(self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: TTAParams | None = None,
                *, pool: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, K)`` float32 averaged probabilities ``p(x_i) = mean_j softmax(model(x~_{j,i}))``.

        This is the op's output (predictions, not a batch, unlike other ops' ``__call__``).

        Args:
            model: maps ``(B, C, H, W)`` to logits ``(B, K)`` (put it in eval mode yourself).
            x: ``(N, C, H, W)`` float test inputs.
            params: partners to use (replay); ``None`` draws them from ``self.rng`` on ``x.device``.
            pool: ``(P, C, H, W)`` reference inputs the partners come from; ``None`` = ``x`` itself.

        Raises:
            ValueError: ``params`` drawn against a pool of another size (or without one while ``pool`` is given),
                or with another ``weight``.
        """
        pool_size = None if pool is None else pool.shape[0]
        if params is None:
            params = self._draw(x.shape[0], x.device, pool_size)
        elif params.pool_size != pool_size:
            raise ValueError(f"these partners were drawn for pool_size={params.pool_size}, got pool_size={pool_size}")
        else:
            self._check_weights(params)
        return test_time_sum_predict(model, x, params.partners, pool=pool, weight=self.weight,
                                     chunk_size=self.chunk_size)

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "draws": self.draws, "weight": self.weight, "chunk_size": self.chunk_size,
                **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the generator (and the settings, when the state has them: states written before the
        settings were saved hold the generator only)."""
        super().load_state_dict(state)
        self.k = int(state.get("k", self.k))
        self.draws = int(state.get("draws", self.draws))
        self.weight = float(state.get("weight", self.weight))
        self.chunk_size = int(state.get("chunk_size", self.chunk_size))
