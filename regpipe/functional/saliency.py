"""Vanilla-gradient saliency and the saliency-map consistency loss (SPEC 4, seed 004).

``S(x) = max_c |d f_y(x) / d x_c|`` per pixel, ``(N, H, W)``. For soft targets ``y`` (a mixed row)
the score differentiated is ``sum_k y_k f_k(x)``, which is ``f_y`` for a one-hot row.

Consistency (SPEC 4): each row's map is warped back to the loader's frame with the inverse of its
recorded affine, pixels that left the frame are masked out, every map is divided by its (masked)
maximum plus ``eps``, and the masked mean squared difference to the map of the seed's reference row
is averaged over the rows. For rows produced by mixing, the expected map is the same mix of the
parents' maps, compared in the mixed row's own frame.

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

from regpipe.functional.augment import inverse_warp, valid_mask

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
    """Saliency maps from logits already computed on ``x`` (``x.requires_grad`` must be True).

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
    """Vanilla-gradient saliency ``max_c |d f_y / d x_c|`` of ``model`` at ``x`` (SPEC 4).

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
    masked-out pixels are set to 0 (SPEC 4, ours: max normalisation)."""
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
    """Mean over rows of the masked MSE between ``T^-1(S(T(x)))`` and the seed reference's map (SPEC 4).

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
    pred = normalize_maps(back[rows], mask, eps)
    target = normalize_maps(back[ref[rows]], mask, eps)
    per_row = ((pred - target).square() * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return per_row.mean()


def mixed_saliency_loss(maps: torch.Tensor, parent_maps: torch.Tensor, sources: torch.Tensor,
                        weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Saliency consistency for mixed rows: the expected map of row ``i`` is
    ``sum_g weights[i, g] * parent_maps[sources[i, g]]`` (the same mix as the inputs, SPEC 4).

    Args:
        maps: ``(N_out, H, W)`` maps of the mixed rows.
        parent_maps: ``(N, H, W)`` maps of the batch before mixing.
        sources, weights: ``(N_out, k)`` the :class:`~regpipe.batch.MixRecord`'s rows and weights.

    Returns:
        0-d tensor: mean squared difference of the max-normalised maps.
    """
    if sources.shape != weights.shape or sources.shape[0] != maps.shape[0]:
        raise ValueError(f"sources {tuple(sources.shape)} and weights {tuple(weights.shape)} must be "
                         f"(N_out, k) with N_out = {maps.shape[0]}")
    expected = torch.einsum("ng,nghw->nhw", weights.to(parent_maps.dtype), parent_maps[sources])
    return (normalize_maps(maps, eps=eps) - normalize_maps(expected, eps=eps)).square().mean()
