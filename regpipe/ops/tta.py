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

from regpipe.core.batch import Batch, MixRecord
from regpipe.core.checks import check_finite_number
from regpipe.core.op import BatchOp
from regpipe.functional.sum_mix import sum_mix
from regpipe.functional.tta import test_time_sum_predict

__all__ = ["TTAParams", "TestTimeSumAugmentation", "draw_partners"]


def draw_partners(draws: int, n: int, k: int, generator: torch.Generator, pool_size: int | None = None) -> torch.Tensor:
    """``(draws, n, k - 1)`` int64 random partner indices, on ``generator``'s device.

    From the test batch itself (``pool_size=None``) a row never draws itself: indices are drawn
    uniformly from the ``n - 1`` other rows. From a reference pool any of its ``pool_size`` rows may be drawn.

    Raises:
        ValueError: fewer than 2 rows without a pool, or an empty pool.
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


@dataclass(frozen=True)
class TTAParams:
    """The random choices of one test-time sum augmentation call.

    Attributes:
        partners: ``(M, N, k - 1)`` int64, ``partners[j, i, r]`` = the ``r``-th partner of row ``i`` in draw ``j``.
        pool_size: ``None`` when the partners index the test batch itself, else the size of the
            reference pool they index.

    Raises:
        ValueError: ``partners`` is not a 3-D int64 tensor with at least one draw and one partner, or
            ``pool_size`` is not ``None`` or a positive integer.
    """

    partners: torch.Tensor
    pool_size: int | None = None

    def __post_init__(self) -> None:
        p = self.partners
        if not isinstance(p, torch.Tensor) or p.dtype != torch.int64 or p.dim() != 3 or 0 in (p.shape[0], p.shape[2]):
            raise ValueError(f"TTAParams.partners must be an (M, N, k - 1) int64 tensor with M, k - 1 >= 1, got "
                             f"{getattr(p, 'dtype', type(p).__name__)} of shape {tuple(getattr(p, 'shape', ()))}")
        if self.pool_size is not None and (isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int)
                                           or self.pool_size < 1):
            raise ValueError(f"TTAParams.pool_size must be None or an integer >= 1, got {self.pool_size!r}")

    @property
    def draws(self) -> int:
        """``M``, the number of mixes per input."""
        return self.partners.shape[0]

    @property
    def batch_size(self) -> int:
        """``N``, the number of test inputs the partners were drawn for."""
        return self.partners.shape[1]

    @property
    def k(self) -> int:
        """Inputs per mix: the row itself and ``k - 1`` partners."""
        return self.partners.shape[2] + 1


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

    def _draw(self, n: int, device: torch.device, pool_size: int | None) -> TTAParams:
        partners = draw_partners(self.draws, n, self.k, self.rng.get(device), pool_size)
        return TTAParams(partners, pool_size)

    def draw(self, batch: Batch, pool_size: int | None = None) -> TTAParams:
        """Partners for the ``N`` rows of ``batch``: from the batch itself, or from a pool of ``pool_size`` rows."""
        return self._draw(batch.size, batch.device, pool_size)

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
        denom = self.weight + params.k - 1
        weights = [self.weight / denom] + [1.0 / denom] * (params.k - 1)
        n, device = batch.size, batch.device
        inputs, targets, sources = [], [], []
        for j in range(params.draws):
            # Partner indices are not permutations (drawn with replacement): sum_mix only gathers rows by them.
            perms = params.partners[j].t().contiguous().to(device)
            x, y = sum_mix(batch.inputs, batch.targets, weights, perms=perms, partners=True)
            inputs.append(x)
            targets.append(y)
            sources.append(torch.cat([torch.arange(n, device=device).unsqueeze(1), perms.t()], dim=1))
        src = torch.cat(sources)
        first = src[:, 0]
        record = MixRecord(sources=src, source_ids=batch.source_ids[src],
                           weights=torch.tensor(weights, dtype=torch.float32, device=device).expand(src.shape))
        return Batch(inputs=torch.cat(inputs), targets=torch.cat(targets), source_ids=batch.source_ids[first],
                     affine=batch.affine[first], mixing=record,
                     photometric=None if batch.photometric is None else batch.photometric[first])

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
            ValueError: ``params`` drawn against a pool of another size (or without one while ``pool`` is given).
        """
        pool_size = None if pool is None else pool.shape[0]
        if params is None:
            params = self._draw(x.shape[0], x.device, pool_size)
        elif params.pool_size != pool_size:
            raise ValueError(f"these partners were drawn for pool_size={params.pool_size}, got pool_size={pool_size}")
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
