"""Losses on dense soft targets ``(N, K)`` (rows sum to 1), as every mixing op in regpipe produces them.

Targets are built by adding the weights of each class, so two mixed partners of the same class give
that class the full weight (a target that overwrites instead loses mass on same-class pairs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_target_cross_entropy", "multi_hot_bce", "interpolated_loss"]


def _check_logits_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be (N, K) of the same shape, "
                         f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if not targets.dtype.is_floating_point:
        raise TypeError(f"targets must be dense soft targets (floating point), got {targets.dtype}")


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over rows.

    ``mean_i( -sum_c targets[i, c] * log_softmax(logits)[i, c] )``; equals ``F.cross_entropy`` for one-hot
    targets. Args: logits ``(N, K)``, targets ``(N, K)`` (rows sum to 1). Returns a scalar.
    """
    _check_logits_targets(logits, targets)
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def multi_hot_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The Sum Augmentation loss: sigmoid binary cross-entropy against the soft multi-hot target.

    Simionescu (2020), section 3.3: the target of a sum of ``k`` inputs is ``Y~_c = n_c / k``, ``n_c``
    the number of summed samples with label ``c`` (the multi-hot vector divided by ``k``), and the loss
    is binary cross-entropy, so each class is an independent "is this class in the mix" output::

        L = -(1 / (N K)) sum_{i,c} [ Y~_ic log sigmoid(z_ic) + (1 - Y~_ic) log(1 - sigmoid(z_ic)) ]

    with logits ``z``. (The thesis computes "the binary cross entropy and [divides] it by k"; we read
    the division as the target's ``1/k``, the same linear combination as the inputs' applied to the
    one-hot labels; a constant factor on the loss would only rescale the learning rate.) Mean over
    ``N x K``. Args: logits ``(N, K)``, targets ``(N, K)``. Returns a scalar.
    """
    _check_logits_targets(logits, targets)
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def interpolated_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` with integer labels (the mixup / kornia / FFCV form)."""
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
