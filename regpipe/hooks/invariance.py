"""Data-augmentation invariance, model side: ``(1 - alpha) * L_task + sum_l alpha_l * L_inv^l``.

The total objective of Hernández-García, König & Kietzmann (2019), eq. 4: the task loss plus the
invariance loss ``L_inv^l`` of eq. 3 (:func:`~regpipe.functional.invariance_loss`) at several layers,
weighted by ``alpha_l`` that grow exponentially with depth and sum to ``alpha``
(:func:`~regpipe.functional.depth_weights`).

The hook taps the named layers through forward hooks (:class:`~regpipe.hooks.tap.FeatureTap`), so
the loss costs one forward pass plus an ``O(N * D)`` reduction per layer; the batch must hold
several copies of each seed in contiguous groups, as declared by ``Batch.replicas``
(:class:`~regpipe.ops.augment.Replicate`, a loader's copies, or a mix that kept the groups).

Example:
    >>> import torch
    >>> from regpipe import Batch
    >>> from regpipe.functional import soft_target_cross_entropy
    >>> from regpipe.hooks import InvarianceLoss
    >>> from regpipe.engine.models import preact_resnet_small
    >>> model = preact_resnet_small(num_classes=4)
    >>> batch = Batch.from_labels(torch.rand(8, 3, 32, 32), torch.arange(8) // 2, num_classes=4,
    ...                           source_ids=torch.arange(8) // 2).replace(replicas=2)
    >>> with InvarianceLoss(model, ["layer1", "layer2", "layer3"]) as objective:
    ...     loss = objective(model, batch, soft_target_cross_entropy)
    >>> [round(w, 4) for w in objective.weights]
    [0.0071, 0.0223, 0.0706]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from regpipe.core.batch import Batch
from regpipe.functional.invariance import depth_weights, invariance_loss
from regpipe.hooks.tap import FeatureTap

__all__ = ["InvarianceLoss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class InvarianceLoss:
    """``(1 - alpha) * L_task + sum_l alpha_l * L_inv^l`` over several layers (Hernández-García et al. 2019, eq. 4).

    Args:
        model: the model (DDP / ``torch.compile`` wrappers are fine).
        layers: module names, shallow to deep; ``alpha_l`` grows exponentially along this order.
        alpha: the invariance share of the objective (``sum_l alpha_l``); default 0.1.
        ratio: ``alpha_last / alpha_first``; default 10.
        eps: see :func:`~regpipe.functional.invariance_loss`.

    Attributes:
        weights: the per-layer ``alpha_l``.
        last: detached parts of the last objective: ``task``, ``invariance`` and ``inv/<layer>``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], alpha: float = 0.1, ratio: float = 10.0,
                 eps: float = 1e-8) -> None:
        self.weights = depth_weights(len(list(layers)) if not isinstance(layers, str) else 1, alpha, ratio)
        self.alpha = float(alpha)
        self.eps = eps
        self.tap = FeatureTap(model, layers)
        self.last: dict[str, torch.Tensor] = {}

    def layer_losses(self, groups: int | torch.Tensor) -> dict[str, torch.Tensor]:
        """``L_inv^l`` of every tapped layer for the last forward pass (``groups``: as
        :func:`~regpipe.functional.invariance_loss`, usually the batch's ``replicas``)."""
        return {name: invariance_loss(acts, groups, self.eps) for name, acts in self.tap.outputs().items()}

    def invariance(self, groups: int | torch.Tensor) -> torch.Tensor:
        """``sum_l alpha_l * L_inv^l`` for the last forward pass (records the parts in :attr:`last`).

        Args:
            groups: ``Batch.replicas`` of the batch the model saw (contiguous groups of that many views of one
                seed; read on no device), or ``(N,)`` seed ids (grouped with ``torch.unique``).
        """
        per_layer = self.layer_losses(groups)
        self.tap.clear()
        total = sum(w * loss for w, loss in zip(self.weights, per_layer.values()))
        self.last = {f"inv/{name}": loss.detach() for name, loss in per_layer.items()}
        self.last["invariance"] = total.detach()
        return total

    def __call__(self, model: nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        """``(1 - alpha) * loss_fn(model(x), targets) + sum_l alpha_l * L_inv^l`` (a recipe's ``compute_loss``)."""
        task = loss_fn(model(batch.inputs), batch.targets)
        total = (1.0 - self.alpha) * task + self.invariance(batch.replicas)
        self.last["task"] = task.detach()
        return total

    def close(self) -> None:
        self.tap.close()

    def __enter__(self) -> InvarianceLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
