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
    >>> float(invariance_loss(acts, torch.tensor([0, 0, 1, 1])))   # seed ids
    0.0
    >>> float(invariance_loss(acts, 2))                             # contiguous groups of 2 (Batch.replicas)
    0.0
"""

from __future__ import annotations

import warnings

import torch

from regpipe.core.checks import is_host

__all__ = ["depth_weights", "invariance_loss"]


def invariance_loss(acts: torch.Tensor, groups: torch.Tensor | int, eps: float = 1e-8) -> torch.Tensor:
    """Within-seed over whole-batch activation variance for one layer (Hernández-García et al. 2019, eq. 3).

    ``L_inv = mean_i var(S_i) / (var(B) + eps)``, with ``var(S) = 1/|S| sum_{k in S} ||a_k - mean_S a||^2 / D``
    (half the mean pairwise distance of eq. 3; the factor 2 cancels in the ratio).

    Args:
        acts: ``(N, ...)`` activations (any floating dtype; computed in at least float32).
        groups: which rows are views of one seed: an int ``m`` for contiguous groups of ``m`` rows (a batch's
            declared ``Batch.replicas``: nothing is read on the host), or an ``(N,)`` integer tensor of seed ids
            (rows of one seed need not be contiguous; grouping them reads the ids on the host, ``torch.unique``).
        eps: added to the whole-batch variance per value, so a batch whose activations are all equal
            gives 0 instead of 0/0.

    Returns:
        0-d tensor in ``acts``' compute dtype, differentiable w.r.t. ``acts``.

    Raises:
        ValueError: ``acts`` has no rows, ``groups`` does not fit its rows; no two rows share a seed (nothing
            replicated: the loss would be 0 whatever the activations); NaN/inf activations (host tensors).
        TypeError: non-float activations, or ``groups`` neither an int nor an integer tensor.
    """
    if not isinstance(acts, torch.Tensor) or not acts.dtype.is_floating_point:
        raise TypeError(f"acts must be a floating point tensor, got {getattr(acts, 'dtype', type(acts).__name__)}")
    if acts.dim() < 1 or acts.shape[0] == 0:
        raise ValueError(f"acts must be (N, ...) with N >= 1, got shape {tuple(acts.shape)}")
    a = acts.reshape(acts.shape[0], -1)
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # sums of squares overflow/lose precision in half precision
    n, d = a.shape
    group, counts = _group_index(groups, n, a.device)
    n_groups = counts.shape[0]
    if n_groups == n:
        raise ValueError(f"invariance_loss needs rows that share a seed: all {n} rows are their own seed, so "
                         "there is no within-seed variance to measure (the loss would be 0 whatever the "
                         "model does); replicate the batch first (regpipe.ops.augment.Replicate)")
    if n_groups == 1:  # said, not refused: a tiny batch (e.g. 4 seeds mixed 4 at a time) is a legal setting
        warnings.warn(f"invariance_loss: all {n} rows form one group, so the within-group variance is the whole "
                      "batch's and the loss is 1 whatever the model does; a batch needs 2 groups or more (after "
                      "group-mode mixing of k rows per mixture: at least 2k seeds per batch)", RuntimeWarning,
                      stacklevel=2)
    sums = torch.zeros(n_groups, d, dtype=a.dtype, device=a.device).index_add_(0, group, a)
    means = sums / counts.unsqueeze(1).to(a.dtype)
    # index_select, not means[group]: the backward of advanced indexing accumulates the repeated rows of
    # ``group`` with parallel atomic float adds on CPU (index_put_, accumulate=True, >1 thread), in an order
    # that changes from run to run; index_select's backward (index_add_) adds them in row order.
    row_dev = (a - means.index_select(0, group)).square().sum(1)      # ||a_k - mean_S||^2, (N,)
    within = torch.zeros(n_groups, dtype=a.dtype, device=a.device).index_add_(0, group, row_dev)
    within = (within / counts.to(a.dtype)).mean() / d                 # mean over seeds of the seed's variance
    total = (a - a.mean(0, keepdim=True)).square().sum(1).mean() / d  # whole-batch variance
    if is_host(total) and not torch.isfinite(total):  # on an accelerator: no synchronisation per step
        raise ValueError("acts contain NaN or inf")
    return within / (total + eps)


def _group_index(groups: torch.Tensor | int, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N,)`` int64 group of each row and ``(G,)`` rows per group, from a group size or seed ids."""
    if isinstance(groups, torch.Tensor):
        if groups.dtype.is_floating_point or groups.dtype == torch.bool:
            raise TypeError(f"source ids must be an integer tensor, got {groups.dtype}")
        if groups.shape != (n,):
            raise ValueError(f"source ids must be ({n},) like the rows of acts, got {tuple(groups.shape)}")
        _, group, counts = torch.unique(groups.to(device), return_inverse=True, return_counts=True)
        return group, counts
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be a group size (int) or a tensor of seed ids, got {type(groups).__name__}")
    if groups < 1 or n % groups:
        raise ValueError(f"groups={groups} must be a positive integer dividing the {n} rows")
    group = torch.arange(n, device=device) // groups
    return group, torch.full((n // groups,), groups, dtype=torch.int64, device=device)


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
