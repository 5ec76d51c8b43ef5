"""Test-Time Sum Augmentation (Simionescu, "Deep Learning Training Procedure Augmentations", 2020, section 3.6)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["test_time_sum_predict"]


@torch.no_grad()
def test_time_sum_predict(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, partners: torch.Tensor,
                          *, pool: torch.Tensor | None = None, weight: float = 1.0,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Average the softmax over ``M`` mixes of every input with ``k - 1`` partners.

    Test-Time Sum Augmentation (Simionescu 2020, section 3.6, a generalised Mixup Inference): the
    input ``x`` to predict is summed ``M`` times with ``k - 1`` random other inputs ``x_{rho_{j,r}}``,
    its own weight ``w`` trading robustness for clean accuracy, and the predictions are averaged::

        x~_j = (w * x + sum_{r<k-1} x_{rho_{j,r}}) / (w + k - 1),      j = 1 .. M
        p(x) = (1/M) sum_j softmax(f(x~_j)),          class = argmax_c p(x)_c

    The thesis uses ``k = 2``, ``w = 1`` (the plain average of two inputs) and draws the partners from
    the train or test set; here they index ``pool`` (default: the test batch itself). All ``M * N``
    mixed inputs go through the model in batched forward passes of at most ``chunk_size`` rows.

    Args:
        model: maps ``(B, C, H, W)`` to logits ``(B, K)`` (put it in eval mode yourself).
        x: ``(N, C, H, W)`` float test inputs.
        partners: ``(M, N, k - 1)`` int64 indices into ``pool`` (default: into ``x`` itself).
        pool: ``(P, C, H, W)`` reference inputs the partners come from; ``None`` = the test batch.
        weight: ``w``, the weight of the input being predicted (paper: 1).
        chunk_size: rows per forward pass.

    Returns:
        ``(N, K)`` float32 averaged probabilities (rows sum to 1).
    """
    pool = x if pool is None else pool
    if partners.dim() != 3 or partners.shape[1] != x.shape[0]:
        raise ValueError(f"partners must be (M, N, k - 1) with N={x.shape[0]}, got {tuple(partners.shape)}")
    if partners.dtype != torch.int64:
        raise TypeError(f"partners must be int64, got {partners.dtype}")
    if not weight > 0:
        raise ValueError(f"weight must be > 0, got {weight}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if partners.numel() and (int(partners.min()) < 0 or int(partners.max()) >= pool.shape[0]):
        raise ValueError(f"partner indices must lie in [0, {pool.shape[0]}), got range "
                         f"[{int(partners.min())}, {int(partners.max())}]")
    draws, n, k_minus_1 = partners.shape
    if draws < 1 or k_minus_1 < 1:
        raise ValueError(f"need at least one draw and one partner (k >= 2), got partners of shape {tuple(partners.shape)}")
    partners = partners.to(pool.device)
    denom = weight + k_minus_1
    # Row r of the flattened (M * N) mixes is draw r // N of input r % N.
    flat_partners = partners.reshape(draws * n, k_minus_1)
    own = torch.arange(n, device=x.device).repeat(draws)
    probs = None
    for start in range(0, draws * n, chunk_size):
        stop = min(start + chunk_size, draws * n)
        mixed = x[own[start:stop]] * weight
        for r in range(k_minus_1):
            mixed += pool[flat_partners[start:stop, r]]
        mixed /= denom
        p = torch.softmax(model(mixed).float(), dim=1)
        if probs is None:
            probs = torch.zeros(n, p.shape[1], device=p.device)
        probs.index_add_(0, own[start:stop], p)
    return probs / draws
