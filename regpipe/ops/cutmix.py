"""CutMix, CutOut and MixUp as batch ops: draw the boxes (or weights), then call the pure functions.

* :class:`CutMix` (Yun et al. 2019): a box of a partner row pasted into each row, targets mixed by area.
* :class:`CutOut` (DeVries & Taylor 2017): a square hole in each row, targets unchanged.
* :class:`MixUp` (Zhang et al. 2018): Sum Augmentation with ``k = 2`` in permutation mode and weights
  ``(lam, 1 - lam)``, ``lam ~ Beta(alpha, alpha)`` (one ``lam`` per batch, as the authors' code).

CutMix and CutOut record their boxes in ``batch.boxes`` (:class:`~regpipe.core.batch.BoxRecord`) and the
rows they read in ``batch.mixing`` (with the rows themselves when ``keep_parent``), so the saliency loss
can build each row's expected map (:func:`~regpipe.functional.boxes.box_expected_maps`). CutMix's pairing and
MixUp's mix are :class:`~regpipe.core.mix_plan.MixPlan` s drawn like Sum Augmentation's
(:func:`~regpipe.functional.partners.draw_mix_sources`): on a replicated batch each row is paired with a copy
of another seed, drawn on the device.

Randomness: per-row partners come from the op's device generator; the numbers the host must know to launch
the op (MixUp's ``lam``, CutMix's coin, ``lam`` and box, CutOut's holes) from its
:class:`~regpipe.core.rng.HostGenerator` (numpy: torch has no seeded Beta sampler), never read back from the
device. Both generators' states are in ``state_dict``, so a resumed run draws the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from regpipe.core.batch import Batch, BoxRecord, MixRecord
from regpipe.core.checks import check_finite_number
from regpipe.core.mix_plan import MixPlan
from regpipe.core.op import BatchOp
from regpipe.core.rng import HostGenerator, rank_seed
from regpipe.functional.boxes import box_area_fraction, center_boxes, check_boxes, cutmix, cutout
from regpipe.functional.partners import draw_mix_sources
from regpipe.functional.sum_mix import mix_rows
from regpipe.ops.sum_mix import RowMixOp

__all__ = ["CutMix", "CutMixParams", "CutOut", "CutOutParams", "MixUp"]


class _HostDraws:
    """What an op with a :class:`HostGenerator` adds to :class:`BatchOp`: the generator (``self.host_rng``),
    reseeded with the device generator and saved beside it."""

    host_rng: HostGenerator

    def _init_host(self, seed: int) -> None:
        self.host_rng = HostGenerator(seed)

    def reseed(self, seed: int, rank: int = 0) -> None:
        super().reseed(seed, rank)  # type: ignore[misc]
        self.host_rng.reseed(rank_seed(seed, rank))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "host_rng": self.host_rng.state_dict()}  # type: ignore[misc]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "host_rng" not in state:
            raise KeyError(f"{type(self).__name__} state has no 'host_rng' entry (keys: {sorted(state)})")
        super().load_state_dict(state)  # type: ignore[misc]
        self.host_rng.load_state_dict(state["host_rng"])


def _refuse(batch: Batch, name: str) -> None:
    if batch.patchup is not None or batch.mixing is not None:
        raise ValueError(f"{name} takes unmixed batches without a PatchUp plan: apply it after replication and "
                         "before PatchUp, and not after another mixing op")


def _check_probability(name: str, value: float) -> float:
    return check_finite_number(name, value, 0.0, 1.0)


@dataclass(frozen=True)
class CutMixParams:
    """One CutMix draw.

    Attributes:
        boxes: ``(N, 4)`` int64 boxes ``(y0, y1, x0, x1)``, or ``None``: the batch passes unmixed (``prob``).
        plan: the pairing, a :class:`MixPlan` of ``k = 2`` columns ``[row, partner]`` whose weights are the kept
            and pasted shares of each row's pixels (the targets' weights), or ``None`` with ``boxes``.
    """

    boxes: torch.Tensor | None
    plan: MixPlan | None

    def __post_init__(self) -> None:
        if (self.boxes is None) != (self.plan is None):
            raise ValueError("CutMixParams.boxes and plan come together (both or neither)")
        if self.boxes is not None and (not isinstance(self.plan, MixPlan) or self.plan.k != 2
                                       or self.plan.rows_out != self.boxes.shape[0]):
            raise ValueError(f"CutMixParams.plan must be a MixPlan of ({self.boxes.shape[0]}, 2) [row, partner], got "
                             f"{type(self.plan).__name__}")

    @property
    def partners(self) -> torch.Tensor | None:
        """``(N,)`` int64 row pasted into each row's box."""
        return None if self.plan is None else self.plan.sources[:, 1]


class CutMix(_HostDraws, BatchOp[CutMixParams]):
    """CutMix (Yun et al. 2019, section 3.1, Algorithm A1).

    With probability ``prob`` a batch is mixed: ``lam ~ Beta(alpha, alpha)``, a box of sides
    ``H sqrt(1 - lam)`` x ``W sqrt(1 - lam)`` centred uniformly (clipped to the image,
    :func:`~regpipe.functional.patchup.cutmix_box`), each row gets that box of its partner (a random
    permutation of the batch; a copy of another seed on a replicated batch) and the targets
    ``lam' y_i + (1 - lam') y_partner``, ``lam'`` the kept area. One box for the whole batch, as
    Algorithm A1; ``per_row=True`` draws a ``lam`` and a box per row (per seed with ``keep_groups``).

    Args:
        alpha: Beta parameter (paper: 1, i.e. ``lam`` uniform).
        prob: chance a batch is mixed (1: Algorithm A1 as printed; the authors' CIFAR command uses 0.5).
        per_row: one ``lam`` and box per row instead of per batch.
        seed: seed of the op's generators.
        keep_parent: keep the rows before mixing in ``batch.mixing`` (the saliency loss needs them).
        keep_groups: on a replicated batch, pair the copies of a seed with copies of the same partner seed
            (and, with ``per_row``, the same box), keeping ``Batch.replicas`` for a consistency loss.

    Example:
        >>> import torch
        >>> from regpipe import Batch
        >>> from regpipe.ops.cutmix import CutMix
        >>> batch = Batch.from_labels(torch.rand(4, 3, 8, 8), torch.arange(4), num_classes=4)
        >>> out = CutMix(seed=0)(batch)
        >>> out.boxes.boxes.shape, bool(torch.allclose(out.targets.sum(1), torch.ones(4)))
        (torch.Size([4, 4]), True)
    """

    def __init__(self, alpha: float = 1.0, prob: float = 1.0, per_row: bool = False, seed: int = 0,
                 keep_parent: bool = False, keep_groups: bool = False) -> None:
        super().__init__(seed)
        self._init_host(seed)
        self.alpha = check_finite_number("alpha", alpha, 0.0, low_open=True)
        self.prob = _check_probability("prob", prob)
        self.per_row, self.keep_parent, self.keep_groups = bool(per_row), bool(keep_parent), bool(keep_groups)

    def draw(self, batch: Batch) -> CutMixParams:
        """The coin, ``lam`` and box centre(s) from the host generator, the partners from ``self.rng``."""
        _refuse(batch, "CutMix")
        n, height, width = batch.size, *batch.inputs.shape[-2:]
        rng = self.host_rng.numpy
        if rng.random() >= self.prob:
            return CutMixParams(None, None)
        m = batch.replicas
        shared = self.keep_groups and m > 1
        sources = draw_mix_sources(n, 2, "permute", self.rng.get(batch.device), replicas=m, shared=shared)
        draws = (n // m if shared else n) if self.per_row else 1
        lam = rng.beta(self.alpha, self.alpha, size=draws)
        cy, cx = rng.integers(0, height, draws), rng.integers(0, width, draws)
        cut = np.sqrt(1.0 - lam)
        boxes = center_boxes(height, width, torch.from_numpy(cy), torch.from_numpy(cx),
                             torch.from_numpy(np.floor(height * cut).astype(np.int64) // 2),
                             torch.from_numpy(np.floor(width * cut).astype(np.int64) // 2))
        boxes = boxes.to(batch.device, non_blocking=True)  # host-made: no ordering with the device's queue needed
        boxes = boxes.expand(n, 4) if draws == 1 else boxes.repeat_interleave(m if shared else 1, dim=0)
        # the targets' weights, the kept and pasted shares of each (clipped) box, computed where the boxes are
        pasted = box_area_fraction(boxes, height, width)
        plan = MixPlan(sources=sources, weights=torch.stack([1.0 - pasted, pasted], dim=1),
                       groups=m if shared else 1)
        return CutMixParams(boxes, plan)

    def apply(self, batch: Batch, params: CutMixParams) -> Batch:
        """Paste the boxes (:func:`~regpipe.functional.boxes.cutmix`) and mix the targets by area
        (:func:`~regpipe.functional.sum_mix.mix_rows` of the pairing)."""
        if not isinstance(params, CutMixParams):
            raise TypeError(f"CutMix.apply needs CutMixParams, got {type(params).__name__}")
        if params.boxes is None:
            return batch
        _refuse(batch, "CutMix")
        n, height, width = batch.size, *batch.inputs.shape[-2:]
        check_boxes(params.boxes, n, height, width)
        plan = params.plan
        if plan.rows_out != n:
            raise ValueError(f"these partners were drawn for {plan.rows_out} rows, the batch has {n}")
        plan.check_rows(n)
        record = MixRecord(sources=plan.sources, weights=plan.weights, source_ids=batch.source_ids[plan.sources],
                           parent_inputs=batch.inputs if self.keep_parent else None,
                           parent_targets=batch.targets if self.keep_parent else None)
        return batch.replace(inputs=cutmix(batch.inputs, params.boxes, params.partners),
                             targets=mix_rows(batch.targets, plan), mixing=record,
                             boxes=BoxRecord(params.boxes, params.partners), replicas=plan.groups)

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "prob": self.prob, "per_row": self.per_row, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha, self.prob, self.per_row = float(state["alpha"]), float(state["prob"]), bool(state["per_row"])


@dataclass(frozen=True)
class CutOutParams:
    """One CutOut draw: ``boxes`` ``(N, 4)`` int64 holes (empty for rows left whole)."""

    boxes: torch.Tensor


class CutOut(_HostDraws, BatchOp[CutOutParams]):
    """CutOut (DeVries & Taylor 2017, section 3): each row, with probability ``prob``, gets a square hole of
    side ``length`` centred at a uniform pixel (so part of it may fall outside the image), filled with
    ``fill`` (0: the mean pixel of normalised inputs, as the authors cut after normalising). Targets
    are unchanged.

    Args:
        length: side of the hole in pixels (paper: 16 on CIFAR-10, 8 on CIFAR-100, 20 on SVHN).
        prob: chance a row is cut (paper: 1).
        fill: value of the hole.
        seed: seed of the op's generators (the holes are host draws).
        keep_parent: keep the rows before the cut in ``batch.mixing`` (the saliency loss needs them).
    """

    def __init__(self, length: int = 16, prob: float = 1.0, fill: float = 0.0, seed: int = 0,
                 keep_parent: bool = False) -> None:
        super().__init__(seed)
        self._init_host(seed)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an integer >= 1, got {length!r}")
        self.length = length
        self.prob = _check_probability("prob", prob)
        self.fill = check_finite_number("fill", fill)
        self.keep_parent = bool(keep_parent)

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse a hole as large as the image: with ``length >= min(height, width)`` the hole centred at a
        uniform pixel blanks most of every image (all of it once ``length // 2 >= side``), so training runs
        at chance instead of regularising. The engine calls this before a run; :meth:`draw` on every batch.

        Raises:
            ValueError: ``length`` and the image size are named.
        """
        side = min(int(height), int(width))
        if self.length >= side:
            raise ValueError(f"CutOut length={self.length} is not smaller than the {height}x{width} images: the hole "
                             f"would blank (nearly) every image; use a length < {side} (the paper's: about half "
                             "the side, 16 on 32 x 32 CIFAR-10)")

    def draw(self, batch: Batch) -> CutOutParams:
        """A centre per row and whether the row is cut, from the host generator.

        Raises:
            ValueError: the hole is as large as the images (:meth:`check_image_size`).
        """
        _refuse(batch, "CutOut")
        n, height, width = batch.size, *batch.inputs.shape[-2:]
        self.check_image_size(height, width)
        rng = self.host_rng.numpy
        cy, cx = torch.from_numpy(rng.integers(0, height, n)), torch.from_numpy(rng.integers(0, width, n))
        cut = torch.from_numpy(rng.random(n) < self.prob).long()
        boxes = center_boxes(height, width, cy, cx, cut * (self.length // 2), cut * (self.length // 2))
        return CutOutParams(boxes.to(batch.device, non_blocking=True))  # host-made: no ordering with the device

    def apply(self, batch: Batch, params: CutOutParams) -> Batch:
        """Cut the holes (:func:`~regpipe.functional.boxes.cutout`); targets unchanged."""
        if not isinstance(params, CutOutParams):
            raise TypeError(f"CutOut.apply needs CutOutParams, got {type(params).__name__}")
        _refuse(batch, "CutOut")
        n, device = batch.size, batch.device
        rows = torch.arange(n, device=device).unsqueeze(1)
        record = MixRecord(sources=rows, weights=torch.ones(n, 1, device=device), source_ids=batch.source_ids[rows],
                           parent_inputs=batch.inputs if self.keep_parent else None,
                           parent_targets=batch.targets if self.keep_parent else None)
        return batch.replace(inputs=cutout(batch.inputs, params.boxes, self.fill), mixing=record,
                             boxes=BoxRecord(params.boxes, torch.full((n,), -1, dtype=torch.int64, device=device)))

    def state_dict(self) -> dict[str, Any]:
        return {"length": self.length, "prob": self.prob, "fill": self.fill, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.length, self.prob, self.fill = int(state["length"]), float(state["prob"]), float(state["fill"])


class MixUp(_HostDraws, RowMixOp):
    """MixUp (Zhang et al. 2018, section 2): ``x~ = lam x_i + (1 - lam) x_j``, ``y~ = lam y_i + (1 - lam) y_j``,
    ``lam ~ Beta(alpha, alpha)`` drawn once per batch and ``j`` a random permutation of the batch (the
    authors' code) — Sum Augmentation's permutation mode with ``k = 2`` and weights ``(lam, 1 - lam)``
    (a :class:`~regpipe.core.mix_plan.MixPlan` executed by :func:`~regpipe.ops.sum_mix.mix_batch`), so the
    loaders' fused mixing stage runs it too. On a replicated batch ``j`` is a copy of another seed.

    Args:
        alpha: Beta parameter (paper: 0.2-0.4 on ImageNet, 1 on CIFAR-10).
        seed: seed of the op's generators (``lam`` is a host draw, the partners a device draw).
        keep_parent: keep the unmixed rows in ``batch.mixing``.
        keep_groups: keep a replicated batch's groups (see :class:`~regpipe.ops.sum_mix.RowMixOp`).
    """

    def __init__(self, alpha: float = 1.0, seed: int = 0, keep_parent: bool = False,
                 keep_groups: bool = False) -> None:
        super().__init__("permute", seed, drop_remainder=False, keep_parent=keep_parent, keep_groups=keep_groups)
        self._init_host(seed)
        self.alpha = check_finite_number("alpha", alpha, 0.0, low_open=True)

    def draw(self, batch: Batch) -> MixPlan:
        """``lam`` from the host generator, then the partners from ``self.rng`` as :class:`~regpipe.ops.SumMix`'s
        permutation mode."""
        lam = float(self.host_rng.numpy.beta(self.alpha, self.alpha))
        return self._plan(batch, [lam, 1.0 - lam])

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.alpha = float(state["alpha"])
