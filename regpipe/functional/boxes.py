"""CutMix and CutOut on image batches, and the saliency maps expected of their rows.

Boxes are int64 ``(y0, y1, x0, x1)``, half-open pixel ranges in the batch's frame (the convention of
:func:`~regpipe.functional.patchup.cutmix_box`); an empty box (``y0 == y1`` or ``x0 == x1``) leaves
its row untouched. Every function takes its boxes and partners as arguments (no randomness here).

Example:
    >>> import torch
    >>> from regpipe.functional.boxes import center_boxes, cutout
    >>> boxes = center_boxes(4, 4, torch.tensor([1]), torch.tensor([1]), half_h=1, half_w=1)
    >>> boxes.tolist()
    [[0, 2, 0, 2]]
    >>> cutout(torch.ones(1, 1, 4, 4), boxes)[0, 0]
    tensor([[0., 0., 1., 1.],
            [0., 0., 1., 1.],
            [1., 1., 1., 1.],
            [1., 1., 1., 1.]])
"""

from __future__ import annotations

import torch

from regpipe.core.checks import is_host
from regpipe.core.mix_plan import MixPlan
from regpipe.functional.patchup import box_holes
from regpipe.functional.saliency import normalize_maps
from regpipe.functional.sum_mix import mix_rows

__all__ = [
    "box_area_fraction",
    "box_expected_maps",
    "box_saliency_loss",
    "center_boxes",
    "check_boxes",
    "cutmix",
    "cutmix_targets",
    "cutout",
]


def check_boxes(boxes: torch.Tensor, n: int, height: int, width: int) -> None:
    """Raise ``ValueError`` unless ``boxes`` is ``(n, 4)`` int64 with ``0 <= y0 <= y1 <= H``, ``0 <= x0 <= x1 <= W``
    (values are read only for CPU tensors, so the check costs no device synchronisation)."""
    if not isinstance(boxes, torch.Tensor) or boxes.dtype != torch.int64 or boxes.shape != (n, 4):
        raise ValueError(f"boxes must be an ({n}, 4) int64 tensor (y0, y1, x0, x1), got "
                         f"{getattr(boxes, 'dtype', type(boxes).__name__)} {tuple(getattr(boxes, 'shape', ()))}")
    if is_host(boxes) and n:
        y0, y1, x0, x1 = boxes.unbind(1)
        bad = ~((0 <= y0) & (y0 <= y1) & (y1 <= height) & (0 <= x0) & (x0 <= x1) & (x1 <= width))
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"box {boxes[row].tolist()} of row {row} is not inside the {height}x{width} frame "
                             "as (y0, y1, x0, x1) with y0 <= y1, x0 <= x1")


def center_boxes(height: int, width: int, cy: torch.Tensor, cx: torch.Tensor, half_h: int | torch.Tensor,
                 half_w: int | torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` boxes ``[cy - half_h, cy + half_h) x [cx - half_w, cx + half_w)`` clipped to the frame.

    CutOut (DeVries & Taylor 2017, section 3) centres a square of side ``L`` (``half = L // 2``) anywhere in
    the image, so part of it may fall outside; CutMix (Yun et al. 2019, eq. 2) does the same with
    ``half = floor(side * sqrt(1 - lam)) // 2``.
    """
    cy, cx = torch.as_tensor(cy, dtype=torch.int64), torch.as_tensor(cx, dtype=torch.int64)
    half_h = torch.as_tensor(half_h, dtype=torch.int64, device=cy.device)
    half_w = torch.as_tensor(half_w, dtype=torch.int64, device=cy.device)
    return torch.stack(torch.broadcast_tensors((cy - half_h).clamp(0, height), (cy + half_h).clamp(0, height),
                                               (cx - half_w).clamp(0, width), (cx + half_w).clamp(0, width)), dim=-1)


def box_area_fraction(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N,)`` float32 share of the frame each box covers, ``(y1 - y0)(x1 - x0) / (H W)``."""
    return ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).float() / (height * width)


def _mask(boxes: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``(N, 1, H, W)`` 1 inside each row's box."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, 1, height, width, dtype=dtype, device=boxes.device)
    return box_holes(boxes, height, width, dtype)


def cutmix(x: torch.Tensor, boxes: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """CutMix (Yun et al. 2019, section 3.1, eq. 1): ``x~_i = (1 - M_i) * x_i + M_i * x_{partner_i}``.

    ``M_i`` is 1 inside row ``i``'s box. Pixels are copied, not blended, so any dtype (uint8 included) is
    kept exactly.

    Args:
        x: ``(N, C, H, W)``.
        boxes: ``(N, 4)`` int64 ``(y0, y1, x0, x1)``.
        partners: ``(N,)`` int64 rows of ``x`` pasted into the boxes.

    Returns:
        ``(N, C, H, W)``, same dtype as ``x``.
    """
    n, _, height, width = x.shape
    check_boxes(boxes, n, height, width)
    if partners.shape != (n,) or partners.dtype != torch.int64:
        raise ValueError(f"partners must be ({n},) int64, got {partners.dtype} {tuple(partners.shape)}")
    inside = _mask(boxes, height, width, torch.bool)
    return torch.where(inside, x[partners], x)


def cutmix_targets(y: torch.Tensor, boxes: torch.Tensor, partners: torch.Tensor, height: int,
                   width: int) -> torch.Tensor:
    """CutMix targets (Yun et al. 2019, eq. 1): ``y~_i = lam_i y_i + (1 - lam_i) y_{partner_i}`` with ``lam_i`` the
    share of row ``i``'s pixels kept, ``1 - area(box_i) / (H W)`` (their lam corrected to the clipped box)."""
    pasted = box_area_fraction(boxes, height, width)
    rows = torch.arange(y.shape[0], device=y.device)
    plan = MixPlan(sources=torch.stack([rows, partners.to(y.device)], dim=1),
                   weights=torch.stack([1.0 - pasted, pasted], dim=1).to(y.device))
    return mix_rows(y, plan)


def cutout(x: torch.Tensor, boxes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """CutOut (DeVries & Taylor 2017, section 3): ``x~_i = (1 - M_i) * x_i + M_i * fill``.

    The authors cut after normalisation, so ``fill = 0`` is the dataset mean pixel on normalised inputs.

    Args:
        x: ``(N, C, H, W)`` any dtype (``fill`` is cast to it).
        boxes: ``(N, 4)`` int64 holes (empty: the row is kept whole).
        fill: value of the hole.
    """
    n, _, height, width = x.shape
    check_boxes(boxes, n, height, width)
    inside = _mask(boxes, height, width, torch.bool)
    return x.masked_fill(inside, fill)


def box_expected_maps(parent_maps: torch.Tensor, first: torch.Tensor, boxes: torch.Tensor,
                      partners: torch.Tensor) -> torch.Tensor:
    """The saliency maps expected of box-augmented rows: the same operation applied to the maps.

    Al-afandi, Magyar & Horváth (2022), section 4: the expected map of an augmented image is the
    original's map under the same augmentation. For CutMix the box of the partner's map is pasted into
    the row's own map; for CutOut (``partners[i] = -1``) the hole is zeroed::

        E_i = (1 - M_i) * S(x_{first_i}) + M_i * S(x_{partner_i})     (partner_i >= 0, CutMix)
        E_i = (1 - M_i) * S(x_{first_i})                               (partner_i = -1, CutOut)

    Args:
        parent_maps: ``(N_in, H, W)`` maps of the rows before the op.
        first: ``(N,)`` int64 row of each output row's own image in the parent batch.
        boxes: ``(N, 4)`` int64 boxes.
        partners: ``(N,)`` int64 parent rows pasted in, or ``-1`` for a hole.

    Returns:
        ``(N, H, W)`` expected maps.
    """
    _, height, width = parent_maps.shape
    n = first.shape[0]
    check_boxes(boxes, n, height, width)
    if partners.shape != (n,):
        raise ValueError(f"partners must be ({n},), got {tuple(partners.shape)}")
    inside = _mask(boxes, height, width, parent_maps.dtype).squeeze(1)
    pasted = parent_maps[partners.clamp_min(0)] * (partners >= 0).to(parent_maps.dtype).view(-1, 1, 1)
    return (1.0 - inside) * parent_maps[first] + inside * pasted


def box_saliency_loss(maps: torch.Tensor, parent_maps: torch.Tensor, first: torch.Tensor, boxes: torch.Tensor,
                      partners: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Saliency consistency of box-augmented rows, ``mean_{i,h,w} (S~(maps_i) - S~(E_i))^2`` with ``E`` from
    :func:`box_expected_maps` and ``S~`` the max-normalised map (:func:`~regpipe.functional.saliency.normalize_maps`),
    as for mixed rows (:func:`~regpipe.functional.saliency.mixed_saliency_loss`).

    Returns:
        0-d tensor (with the graph of ``maps``).
    """
    if maps.shape[0] != first.shape[0]:
        raise ValueError(f"maps has {maps.shape[0]} rows, first {first.shape[0]}")
    expected = box_expected_maps(parent_maps, first, boxes, partners)
    return (normalize_maps(maps, eps=eps) - normalize_maps(expected, eps=eps)).square().mean()
