"""Data-augmentation invariance loss (SPEC 3.2, seed 003 eq. 3-4).

For one layer, with activations flattened to ``a_k`` (``D`` values) and ``S_i`` the rows made from
seed ``i``::

    L_inv = mean_i [ 1/|S_i|^2 sum_{k,k' in S_i} ||a_k - a_k'||^2 / D ] / [ 1/|B|^2 sum_{k,k' in B} ||a_k - a_k'||^2 / D ]

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
    """Within-seed over whole-batch activation variance for one layer.

    Args:
        acts: ``(N, ...)`` activations (any floating dtype; computed in at least float32).
        source_ids: ``(N,)`` integer seed id of each row (rows of one seed need not be contiguous).
        eps: added to the whole-batch variance per value, so a batch whose activations are all equal
            gives 0 instead of 0/0.

    Returns:
        0-d tensor in ``acts``' compute dtype, differentiable w.r.t. ``acts``.

    Raises:
        ValueError: ``acts`` has no rows or its row count differs from ``source_ids``; NaN/inf activations.
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
    n_groups = counts.shape[0]
    sums = torch.zeros(n_groups, d, dtype=a.dtype, device=a.device).index_add_(0, group, a)
    means = sums / counts.unsqueeze(1).to(a.dtype)
    row_dev = (a - means[group]).square().sum(1)                      # ||a_k - mean_S||^2, (N,)
    within = torch.zeros(n_groups, dtype=a.dtype, device=a.device).index_add_(0, group, row_dev)
    within = (within / counts.to(a.dtype)).mean() / d                 # mean over seeds of the seed's variance
    total = (a - a.mean(0, keepdim=True)).square().sum(1).mean() / d  # whole-batch variance
    if not torch.isfinite(total):
        raise ValueError("acts contain NaN or inf")
    return within / (total + eps)


def depth_weights(n_layers: int, alpha: float = 0.1, ratio: float = 10.0) -> list[float]:
    """Per-layer coefficients ``alpha_l`` growing exponentially with depth, summing to ``alpha``, with
    ``alpha_last / alpha_first = ratio`` (SPEC 3.2's reconstructed defaults: 0.1 and 10).

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
