"""Vanilla-gradient saliency and the saliency-map consistency loss (Al-afandi, Magyar & Horváth 2022).

Saliency (their section 2, eqs. 1-2, after Simonyan et al. 2014): the gradient of the ground-truth
class score ``f_y`` with respect to the input pixels, reduced over the colour channels by the largest
absolute value::

    S(x)[h, w] = max_c | d f_y(x) / d x[c, h, w] |          (N, C, H, W) -> (N, H, W)

For soft targets ``y`` (a mixed row) the score differentiated is ``sum_k y_k f_k(x)``, which is ``f_y``
for a one-hot row.

Consistency (section 4, eq. 7): the batch holds originals and augmented copies ``T(x)``; the map of an
augmented copy, warped back with the inverse transform, should match the original's map::

    L_sal = d( S(x), T^-1(S(T(x))) )

The paper normalises every map individually and takes the mean squared distance. Ours: each map is
divided by its maximum plus ``eps`` (over the pixels that are valid in both maps), pixels that fall
outside the frame after the inverse warp are ignored, and every row's map is compared with the map
of its seed's reference row (both warped back). For mixing augmentations (MixUp, Sum Augmentation)
the expected map is the same mix of the parents' maps (section 4: "blended together with the same
opacity"), compared in the mixed row's own frame.

Example:
    >>> import torch
    >>> from regpipe.functional import saliency
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    >>> saliency(model, torch.rand(5, 3, 4, 4), torch.tensor([0, 1, 0, 1, 1])).shape
    torch.Size([5, 4, 4])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from regpipe.core.mix_plan import MixPlan
from regpipe.functional.augment import inverse_warp, valid_mask
from regpipe.functional.sum_mix import mix_rows

__all__ = [
    "mixed_saliency_loss",
    "normalize_maps",
    "reference_rows",
    "saliency",
    "saliency_consistency_loss",
    "saliency_from_logits",
]


def _score_weights(y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Integer labels ``(N,)`` or soft targets ``(N, K)`` -> ``(N, K)`` weights of the class scores."""
    n, k = logits.shape
    if y.dim() == 1 and not y.dtype.is_floating_point:
        if y.shape[0] != n:
            raise ValueError(f"{y.shape[0]} labels for {n} rows")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise ValueError(f"label {bad} is out of range for {k} classes")
        return torch.nn.functional.one_hot(y.long(), k).to(logits.dtype)
    if y.shape != (n, k) or not y.dtype.is_floating_point:
        raise ValueError(f"y must be labels ({n},) or soft targets ({n}, {k}), got {tuple(y.shape)} {y.dtype}")
    return y.to(logits.dtype)


def saliency_from_logits(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         create_graph: bool = False) -> torch.Tensor:
    """Saliency maps ``S(x) = max_c |d score / d x_c|`` from logits already computed on ``x``
    (``x.requires_grad`` must be True); ``score = sum_i sum_k y_ik logits_ik`` (per row ``f_{y_i}``).

    Args:
        logits: ``(N, K)`` model output on ``x``.
        x: ``(N, C, H, W)`` float input the logits were computed from.
        y: ``(N,)`` labels or ``(N, K)`` soft targets.
        create_graph: keep the graph of the gradient (training through the maps: double backward).

    Returns:
        ``(N, H, W)`` in ``x.dtype``, >= 0.
    """
    if not x.requires_grad:
        raise ValueError("x must require grad (x.requires_grad_()) before the forward that produced the logits")
    score = (logits * _score_weights(y, logits)).sum()
    (grad,) = torch.autograd.grad(score, x, create_graph=create_graph)
    return grad.abs().amax(dim=1)


def saliency(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             create_graph: bool = False) -> torch.Tensor:
    """Vanilla-gradient saliency ``S(x) = max_c |d f_y / d x_c|`` of ``model`` at ``x``.

    Al-afandi, Magyar & Horváth (2022), eqs. 1-2 (the gradient map of Simonyan et al. 2014, its
    channels reduced by the largest absolute value).

    Args:
        model: ``(N, C, H, W) -> (N, K)`` logits (its mode is left as it is).
        x: ``(N, C, H, W)`` floating point inputs (not modified; a leaf copy is differentiated).
        y: ``(N,)`` integer labels or ``(N, K)`` soft targets.
        create_graph: keep the graph so a loss on the maps trains the model.

    Returns:
        ``(N, H, W)`` maps.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating point (N, C, H, W) tensor, got "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(leaf)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"model must return (N, K) logits, got shape {tuple(logits.shape)}")
        return saliency_from_logits(logits, leaf, y, create_graph=create_graph)


def normalize_maps(maps: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Each ``(H, W)`` map divided by its maximum over ``mask`` (``(N, H, W)`` bool) plus ``eps``;
    masked-out pixels are set to 0: ``S~ = S * mask / (max(S * mask) + eps)``.

    The paper (Al-afandi et al. 2022, section 4) normalises every map individually without saying how;
    division by the maximum is ours (the maps are ``>= 0``, so ``S~`` lies in ``[0, 1)``)."""
    if mask is not None:
        maps = maps * mask.to(maps.dtype)
    peak = maps.flatten(1).amax(dim=1).view(-1, 1, 1)
    return maps / (peak + eps)


def reference_rows(source_ids: torch.Tensor) -> torch.Tensor:
    """``(N,)`` index of the first row of each row's seed (the untouched original when the batch comes from
    ``Replicate(..., include_original=True)``)."""
    _, group = torch.unique(source_ids, return_inverse=True)
    n = source_ids.shape[0]
    first = torch.full((int(group.max()) + 1 if n else 0,), n, dtype=torch.long, device=source_ids.device)
    first.scatter_reduce_(0, group, torch.arange(n, device=source_ids.device), reduce="amin")
    return first[group]


def saliency_consistency_loss(maps: torch.Tensor, affine: torch.Tensor, source_ids: torch.Tensor,
                              eps: float = 1e-6) -> torch.Tensor:
    """Mean over rows of the masked MSE between ``T^-1(S(T(x)))`` and the seed reference's map.

    Al-afandi, Magyar & Horváth (2022), eq. 7 with the squared distance of normalised maps: for every
    row ``i`` that is not its seed's reference row ``r``, with ``B_j = T_j^-1(S_j)`` the row's map
    warped back and ``m`` the pixels valid in both ``B_i`` and ``B_r``::

        L_sal = mean_i  sum_m (S~(B_i) - S~(B_r))^2 / |m|        S~ = :func:`normalize_maps` over m

    Every row's map is warped back to the loader's frame with the inverse of its ``affine`` (the
    reference row's too, so the reference need not be the untouched original), pixels outside the
    frame of either are masked, both maps are max-normalised over the shared valid pixels, and the
    squared difference is averaged over those pixels. Reference rows themselves contribute nothing;
    a batch where no seed has two rows gives 0.

    Args:
        maps: ``(N, H, W)`` saliency maps of the batch rows (keep their graph to train through them).
        affine: ``(N, 2, 3)`` recorded output -> input matrices (``Batch.affine``).
        source_ids: ``(N,)`` seed ids (``Batch.source_ids``).
        eps: normalisation guard.

    Returns:
        0-d tensor.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got shape {tuple(maps.shape)}")
    n, h, w = maps.shape
    if affine.shape != (n, 2, 3) or source_ids.shape != (n,):
        raise ValueError(f"affine must be ({n}, 2, 3) and source_ids ({n},), got {tuple(affine.shape)} "
                         f"and {tuple(source_ids.shape)}")
    ref = reference_rows(source_ids)
    rows = (ref != torch.arange(n, device=ref.device)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return maps.sum() * 0.0
    theta = affine.to(maps.dtype)
    back = inverse_warp(maps.unsqueeze(1), theta).squeeze(1)
    valid = valid_mask(theta, h, w).squeeze(1)
    mask = valid[rows] & valid[ref[rows]]
    pred = normalize_maps(back.index_select(0, rows), mask, eps)
    # index_select, not back[ref[rows]]: a reference row repeats once per copy of its seed, and the backward
    # of advanced indexing sums repeats with parallel atomic float adds on CPU (index_put_, accumulate=True),
    # in an order that changes from run to run; index_select's backward (index_add_) sums them in row order.
    target = normalize_maps(back.index_select(0, ref[rows]), mask, eps)
    per_row = ((pred - target).square() * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return per_row.mean()


def mixed_saliency_loss(maps: torch.Tensor, parent_maps: torch.Tensor, sources: torch.Tensor,
                        weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Saliency consistency for mixed rows: the expected map of row ``i`` is the same mix of its parents' maps,

        E_i = sum_g weights[i, g] * parent_maps[sources[i, g]]
        L   = mean_{i, h, w} (S~(maps_i) - S~(E_i))^2            S~ = :func:`normalize_maps`

    (Al-afandi, Magyar & Horváth 2022, section 4: for MixUp-like augmentations the individual maps
    are "blended together with the same opacity").

    Args:
        maps: ``(N_out, H, W)`` maps of the mixed rows.
        parent_maps: ``(N, H, W)`` maps of the batch before mixing.
        sources, weights: ``(N_out, k)`` the :class:`~regpipe.core.batch.MixRecord`'s rows and weights.

    Returns:
        0-d tensor: mean squared difference of the max-normalised maps.
    """
    if sources.shape != weights.shape or sources.shape[0] != maps.shape[0]:
        raise ValueError(f"sources {tuple(sources.shape)} and weights {tuple(weights.shape)} must be "
                         f"(N_out, k) with N_out = {maps.shape[0]}")
    expected = mix_rows(parent_maps, MixPlan(sources=sources, weights=weights.to(parent_maps.dtype)))
    return (normalize_maps(maps, eps=eps) - normalize_maps(expected, eps=eps)).square().mean()
