"""Data-augmentation invariance loss (Hernández-García, König & Kietzmann 2019, section 2.3, eqs. 1, 3-4).

The batch holds several augmented copies of each seed image. For one layer ``l``, with activations
flattened to ``a_k`` (``D`` values), the distance of two rows is their mean squared difference (eq. 1),
``sigma(k, k') = ||a_k - a_k'||^2 / D``, and with ``S_i`` the rows made from seed ``i`` and ``B`` the
whole batch the loss (eq. 3) is the mean distance within a seed relative to the mean distance in the
batch::

    L_inv = mean_i [ 1/|S_i|^2 sum_{k,k' in S_i} sigma(k, k') ] / [ 1/|B|^2 sum_{k,k' in B} sigma(k, k') ]

A mean pairwise squared distance (self-pairs included) is twice the mean squared deviation from the
set's mean, so the loss is (within-seed variance) / (whole-batch variance) and is computed from
per-seed means in ``O(N * D)``. Duplicating every row, or every seed's rows, leaves it unchanged:
it depends neither on the batch size nor on the number of copies ``m`` (as the paper states).

Example:
    >>> import torch
    >>> from regpipe.functional import invariance_loss
    >>> acts = torch.tensor([[0.0], [0.0], [2.0], [2.0]])   # two seeds, identical copies
    >>> float(invariance_loss(acts, torch.tensor([0, 0, 1, 1])))
    0.0
"""

from __future__ import annotations

import torch

__all__ = ["depth_weights", "invariance_loss"]


def invariance_loss(acts: torch.Tensor, source_ids: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Within-seed over whole-batch activation variance for one layer (Hernández-García et al. 2019, eq. 3).

    ``L_inv = mean_i var(S_i) / (var(B) + eps)``, with ``var(S) = 1/|S| sum_{k in S} ||a_k - mean_S a||^2 / D``
    (half the mean pairwise distance of eq. 3; the factor 2 cancels in the ratio).

    Args:
        acts: ``(N, ...)`` activations (any floating dtype; computed in at least float32).
        source_ids: ``(N,)`` integer seed id of each row (rows of one seed need not be contiguous).
        eps: added to the whole-batch variance per value, so a batch whose activations are all equal
            gives 0 instead of 0/0.

    Returns:
        0-d tensor in ``acts``' compute dtype, differentiable w.r.t. ``acts``.

    Raises:
        ValueError: ``acts`` has no rows or its row count differs from ``source_ids``; no two rows share a
            seed (nothing replicated: the loss would be 0 whatever the activations); NaN/inf activations.
        TypeError: non-float activations or non-integer ids.
    """
    if not isinstance(acts, torch.Tensor) or not acts.dtype.is_floating_point:
        raise TypeError(f"acts must be a floating point tensor, got {getattr(acts, 'dtype', type(acts).__name__)}")
    if not isinstance(source_ids, torch.Tensor) or source_ids.dtype.is_floating_point or source_ids.dtype == torch.bool:
        raise TypeError(f"source_ids must be an integer tensor, got {getattr(source_ids, 'dtype', type(source_ids))}")
    if acts.dim() < 1 or acts.shape[0] == 0:
        raise ValueError(f"acts must be (N, ...) with N >= 1, got shape {tuple(acts.shape)}")
    if source_ids.shape != (acts.shape[0],):
        raise ValueError(f"source_ids must be ({acts.shape[0]},) like the rows of acts, got {tuple(source_ids.shape)}")
    a = acts.reshape(acts.shape[0], -1)
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # sums of squares overflow/lose precision in half precision
    n, d = a.shape
    _, group, counts = torch.unique(source_ids.to(a.device), return_inverse=True, return_counts=True)
    n_groups = counts.shape[0]  # torch.unique has synchronised already: reading the size is free
    if n_groups == n:
        raise ValueError(f"invariance_loss needs rows that share a seed: all {n} source_ids are distinct, so "
                         "there is no within-seed variance to measure (the loss would be 0 whatever the "
                         "model does); replicate the batch first (regpipe.ops.augment.Replicate)")
    sums = torch.zeros(n_groups, d, dtype=a.dtype, device=a.device).index_add_(0, group, a)
    means = sums / counts.unsqueeze(1).to(a.dtype)
    # index_select, not means[group]: the backward of advanced indexing accumulates the repeated rows of
    # ``group`` with parallel atomic float adds on CPU (index_put_, accumulate=True, >1 thread), in an order
    # that changes from run to run; index_select's backward (index_add_) adds them in row order.
    row_dev = (a - means.index_select(0, group)).square().sum(1)      # ||a_k - mean_S||^2, (N,)
    within = torch.zeros(n_groups, dtype=a.dtype, device=a.device).index_add_(0, group, row_dev)
    within = (within / counts.to(a.dtype)).mean() / d                 # mean over seeds of the seed's variance
    total = (a - a.mean(0, keepdim=True)).square().sum(1).mean() / d  # whole-batch variance
    if not torch.isfinite(total):
        raise ValueError("acts contain NaN or inf")
    return within / (total + eps)


def depth_weights(n_layers: int, alpha: float = 0.1, ratio: float = 10.0) -> list[float]:
    """Per-layer coefficients ``alpha_l`` of the total loss, growing exponentially with depth.

    Hernández-García et al. (2019), eq. 4: ``L = (1 - alpha) L_task + sum_l alpha_l L_inv^l`` with
    ``alpha = sum_l alpha_l``, the ``alpha_l`` "distributed across the layers according to an
    exponential law" (deeper layers, like higher visual areas, more invariant). Here, for layers
    ``l = 0 .. n-1``::

        alpha_l = alpha * ratio^(l / (n - 1)) / sum_j ratio^(j / (n - 1))

    so ``sum_l alpha_l = alpha`` and ``alpha_last / alpha_first = ratio``. The paper's values were lost
    from our copy of it; the defaults ``alpha = 0.1``, ``ratio = 10`` are our reconstruction.

    Raises:
        ValueError: ``n_layers < 1``, ``alpha`` outside ``[0, 1]`` or ``ratio <= 0``.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an integer >= 1, got {n_layers!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the invariance share of the loss, in [0, 1], got {alpha}")
    if ratio <= 0:
        raise ValueError(f"ratio (alpha_last / alpha_first) must be > 0, got {ratio}")
    if n_layers == 1:
        return [float(alpha)]
    raw = [ratio ** (layer / (n_layers - 1)) for layer in range(n_layers)]
    return [alpha * r / sum(raw) for r in raw]
