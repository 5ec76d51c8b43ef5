"""The one data model that flows through a regpipe pipeline.

Every op takes a :class:`Batch` and returns a new :class:`Batch` (``dataclasses.replace``); nothing
is mutated in place, so a batch can be kept for later (the saliency loss compares a mixed batch with
the batch it came from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

# checks and patchup_plan import nothing from regpipe, so these imports inside the core layer cannot cycle.
from regpipe.core.checks import check_finite, check_same_device, check_soft_targets
from regpipe.core.patchup_plan import PatchUpPlan

__all__ = ["Batch", "BoxRecord", "MixRecord", "identity_affine", "labels_to_targets"]


def identity_affine(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Identity 2x3 affine matrices, shape ``(n, 2, 3)`` (the ``affine_grid`` convention: output -> input)."""
    eye = torch.zeros(n, 2, 3, device=device, dtype=dtype)
    eye[:, 0, 0] = 1.0
    eye[:, 1, 1] = 1.0
    return eye


def labels_to_targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer labels ``(N,)`` -> dense one-hot targets ``(N, num_classes)``.

    Raises:
        TypeError: labels are not an integer tensor.
        ValueError: labels are not 1-D or fall outside ``[0, num_classes)`` (the offending value is named).
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {type(labels).__name__} "
                        f"{getattr(labels, 'dtype', '')}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} is out of range for num_classes={num_classes}")
    # Written in place (zeros, then a 1 per row): F.one_hot builds an int64 table first and converts it, twice
    # the work on a loader's host path (0.21 against 0.10 ms for (128, 1000) on the 2-core VM).
    targets = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return targets.scatter_(1, labels.long().unsqueeze(1), 1.0)


@dataclass(frozen=True)
class MixRecord:
    """Which rows of the pre-mix batch make each output row, and with which weights.

    Output row ``i`` is ``sum_g weights[i, g] * parent_row[sources[i, g]]``.

    Attributes:
        sources: ``(N_out, k)`` int64, row indices into the batch *before* mixing.
        weights: ``(N_out, k)`` float, the mixing weights (rows sum to 1).
        source_ids: ``(N_out, k)`` int64, the dataset ids of those rows.
        parent_inputs: ``(N_in, C, H, W)`` the inputs before mixing, kept only when the mixing op was
            asked to (``keep_parent=True``: the saliency loss needs the components' own maps); else ``None``.
        parent_targets: ``(N_in, K)`` their targets, with ``parent_inputs``.
    """

    sources: torch.Tensor
    weights: torch.Tensor
    source_ids: torch.Tensor
    parent_inputs: torch.Tensor | None = None
    parent_targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.sources.dim() != 2:
            raise ValueError(f"MixRecord.sources must be (N_out, k), got {tuple(self.sources.shape)}")
        for name in ("weights", "source_ids"):
            value = getattr(self, name)
            if value.shape != self.sources.shape:
                raise ValueError(f"MixRecord.{name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.sources.shape)} like sources")
        if (self.parent_inputs is None) != (self.parent_targets is None):
            raise ValueError("MixRecord.parent_inputs and parent_targets come together (both or neither)")
        if self.parent_inputs is not None and self.parent_inputs.shape[0] != self.parent_targets.shape[0]:
            raise ValueError(f"MixRecord.parent_inputs has {self.parent_inputs.shape[0]} rows, parent_targets "
                             f"{self.parent_targets.shape[0]}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MixRecord":
        """Every tensor on ``device``."""
        return MixRecord(*(None if t is None else t.to(device, non_blocking=non_blocking)
                           for t in (self.sources, self.weights, self.source_ids, self.parent_inputs,
                                     self.parent_targets)))

    def rows(self, index: torch.Tensor) -> "MixRecord":
        """The record of output rows ``index`` (the parent rows they read are kept whole)."""
        return MixRecord(self.sources[index], self.weights[index], self.source_ids[index], self.parent_inputs,
                         self.parent_targets)


@dataclass(frozen=True)
class BoxRecord:
    """The rectangle a box op (CutMix, CutOut) replaced in each row, and what filled it.

    Row ``i`` is its own image (row ``batch.mixing.sources[i, 0]`` of the batch before the op) outside
    ``boxes[i]``; inside, the pixels of row ``partners[i]`` of that batch (CutMix), or a constant where
    ``partners[i] == -1`` (CutOut). The batch's ``mixing`` record keeps the rows before the op (and its
    weights are the kept/pasted area shares, the targets' weights).

    Attributes:
        boxes: ``(N, 4)`` int64 ``(y0, y1, x0, x1)``, half-open pixel ranges (empty: the row is whole).
        partners: ``(N,)`` int64 rows of the batch before the op, or ``-1``.
    """

    boxes: torch.Tensor
    partners: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.boxes, torch.Tensor) or self.boxes.dtype != torch.int64 or self.boxes.dim() != 2 \
                or self.boxes.shape[1] != 4:
            raise ValueError(f"BoxRecord.boxes must be (N, 4) int64, got {getattr(self.boxes, 'dtype', None)} "
                             f"{tuple(getattr(self.boxes, 'shape', ()))}")
        if not isinstance(self.partners, torch.Tensor) or self.partners.dtype != torch.int64 \
                or self.partners.shape != self.boxes.shape[:1]:
            raise ValueError(f"BoxRecord.partners must be ({self.boxes.shape[0]},) int64, got "
                             f"{getattr(self.partners, 'dtype', None)} {tuple(getattr(self.partners, 'shape', ()))}")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BoxRecord":
        return BoxRecord(self.boxes.to(device, non_blocking=non_blocking),
                         self.partners.to(device, non_blocking=non_blocking))

    def rows(self, index: torch.Tensor) -> "BoxRecord":
        """The record of output rows ``index`` (partners still index the batch before the op)."""
        return BoxRecord(self.boxes[index], self.partners[index])


@dataclass(frozen=True)
class Batch:
    """A batch as regpipe ops see it.

    Attributes:
        inputs: ``(N, C, H, W)`` images, float (or uint8 straight from a loader).
        targets: ``(N, K)`` dense soft targets, floating point, rows sum to 1.
        source_ids: ``(N,)`` int64, dataset index of each row's seed sample (for a mixed row: of its
            first component; ``mixing.source_ids`` has all of them).
        affine: ``(N, 2, 3)`` float, output -> input coordinates of the geometric ops applied so far
            (identity when none ran). Filled with identities when omitted.
        mixing: the :class:`MixRecord` of the last mixing op, or ``None``.
        patchup: the :class:`~regpipe.core.patchup_plan.PatchUpPlan` drawn for this batch (for its
            ``N`` rows, in this order), or ``None``.
        photometric: ``(N, 2)`` float, the brightness and contrast factors applied to each row
            (``None``: none applied, i.e. all ones).
        boxes: the :class:`BoxRecord` of a CutMix/CutOut op (with ``mixing``, the rows before it), or ``None``.
        replicas: the rows come in contiguous groups of ``replicas`` views of one seed (in-batch replication,
            in the loader or on the device, or a mix that kept those groups): rows ``s * replicas ..
            (s + 1) * replicas - 1`` are views of seed ``s``. ``1``: every row is its own. Declared by whoever
            made the copies, never guessed from ``source_ids`` (which would read them on the host).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    source_ids: torch.Tensor
    affine: torch.Tensor | None = None
    mixing: MixRecord | None = None
    patchup: PatchUpPlan | None = None
    photometric: torch.Tensor | None = None
    boxes: BoxRecord | None = None
    replicas: int = 1

    def __post_init__(self) -> None:
        # Shape, dtype and device checks cost no device synchronisation. Target values (finite, >= 0, rows
        # summing to 1) are checked when they are on the host (a CPU batch; ops keep them valid); on an
        # accelerator they were checked where they entered (`labels_to_targets`, the loaders), and
        # `check_values()` checks them there on request.
        for name in ("inputs", "targets", "source_ids"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"Batch.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        x, y, ids = self.inputs, self.targets, self.source_ids
        if x.dim() != 4:
            raise ValueError(f"Batch.inputs must be (N, C, H, W), got shape {tuple(x.shape)}")
        n = x.shape[0]
        if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
            raise TypeError(f"Batch.inputs must be floating point or uint8, got {x.dtype}")
        if y.dim() != 2 or y.shape[0] != n:
            raise ValueError(f"Batch.targets must be (N, K) with N={n}, got shape {tuple(y.shape)}")
        if not y.dtype.is_floating_point:
            raise TypeError(f"Batch.targets must be dense soft targets (floating point), got {y.dtype}; "
                            "use labels_to_targets() for integer labels")
        if ids.shape != (n,):
            raise ValueError(f"Batch.source_ids must be (N,) with N={n}, got shape {tuple(ids.shape)}")
        if ids.dtype != torch.int64:
            raise TypeError(f"Batch.source_ids must be int64, got {ids.dtype}")
        check_same_device("Batch", inputs=x, targets=y, source_ids=ids, affine=self.affine,
                          photometric=self.photometric)
        check_soft_targets("Batch.targets", y)
        if self.affine is None:
            object.__setattr__(self, "affine", identity_affine(n, device=x.device))
        elif self.affine.shape != (n, 2, 3):
            raise ValueError(f"Batch.affine must be (N, 2, 3) with N={n}, got shape {tuple(self.affine.shape)}")
        if self.photometric is not None and self.photometric.shape != (n, 2):
            raise ValueError(f"Batch.photometric must be (N, 2) with N={n}, got shape {tuple(self.photometric.shape)}")
        if self.mixing is not None and self.mixing.sources.shape[0] != n:
            raise ValueError(f"Batch.mixing describes {self.mixing.sources.shape[0]} rows, the batch has {n}")
        if self.patchup is not None:
            if not isinstance(self.patchup, PatchUpPlan):
                raise TypeError(f"Batch.patchup must be a PatchUpPlan or None, got {type(self.patchup).__name__}")
            self.patchup.check_rows(n)  # a plan pairs the rows it was drawn for
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1 \
                or n % self.replicas:
            raise ValueError(f"Batch.replicas must be a positive integer dividing the {n} rows, got {self.replicas!r}")
        if self.boxes is not None:
            if not isinstance(self.boxes, BoxRecord):
                raise TypeError(f"Batch.boxes must be a BoxRecord or None, got {type(self.boxes).__name__}")
            if self.boxes.boxes.shape[0] != n:
                raise ValueError(f"Batch.boxes describes {self.boxes.boxes.shape[0]} rows, the batch has {n}")
            if self.mixing is None:
                raise ValueError("Batch.boxes needs Batch.mixing: a box op records the rows it read there")

    def check_values(self) -> "Batch":
        """Check the values wherever they are (synchronises on an accelerator): finite inputs, and soft
        targets that are finite, non-negative and sum to 1 per row. Returns ``self``.

        Raises:
            ValueError: the field and the first offending value are named.
        """
        check_finite("Batch.inputs", self.inputs, sync=True)
        check_soft_targets("Batch.targets", self.targets, sync=True)
        return self

    @classmethod
    def from_labels(cls, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    source_ids: torch.Tensor | None = None) -> "Batch":
        """Build a batch from integer labels (one-hot targets); ``source_ids`` default to ``arange(N)``."""
        if source_ids is None:
            source_ids = torch.arange(inputs.shape[0], device=inputs.device)
        targets = labels_to_targets(labels, num_classes).to(inputs.device)
        return cls(inputs=inputs, targets=targets, source_ids=source_ids.to(inputs.device, torch.int64))

    @property
    def size(self) -> int:
        """Number of rows ``N``."""
        return self.inputs.shape[0]

    @property
    def num_classes(self) -> int:
        return self.targets.shape[1]

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    def replace(self, **changes: Any) -> "Batch":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def rows(self, index: torch.Tensor) -> "Batch":
        """The rows ``index`` (``(M,)`` int64, repeats allowed) of every per-row field, mixing record included.
        The selection is arbitrary, so the result declares no replica groups (``replicas=1``).

        Raises:
            ValueError: the batch carries a PatchUp plan (it pairs rows of the whole batch; draw it after
                selecting).
        """
        if self.patchup is not None:
            raise ValueError("cannot select rows of a batch that carries a PatchUp plan: apply PatchUp after selecting")
        index = index.to(self.device)
        mixing = None if self.mixing is None else self.mixing.rows(index)
        return Batch(inputs=self.inputs[index], targets=self.targets[index], source_ids=self.source_ids[index],
                     affine=self.affine[index], mixing=mixing,
                     photometric=None if self.photometric is None else self.photometric[index],
                     boxes=None if self.boxes is None else self.boxes.rows(index))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """Move every tensor to ``device``, those of the mixing record and of the PatchUp plan included."""
        mixing = None if self.mixing is None else self.mixing.to(device, non_blocking=non_blocking)
        return dataclasses.replace(
            self,
            inputs=self.inputs.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
            source_ids=self.source_ids.to(device, non_blocking=non_blocking),
            affine=self.affine.to(device, non_blocking=non_blocking),
            mixing=mixing,
            patchup=None if self.patchup is None else self.patchup.to(device, non_blocking=non_blocking),
            photometric=None if self.photometric is None else self.photometric.to(device, non_blocking=non_blocking),
            boxes=None if self.boxes is None else self.boxes.to(device, non_blocking=non_blocking),
        )
