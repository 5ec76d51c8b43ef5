"""Saliency-map consistency and the combined ``alpha*class + beta*inv + gamma*sal`` objective.

Al-afandi, Magyar & Horváth (2022), section 4, eq. 8: ``L = alpha * L_class + beta * L_inv + gamma * L_sal``,
the class loss, the activation invariance loss (:mod:`regpipe.hooks.invariance`) and the saliency
consistency loss of eq. 7 (:func:`~regpipe.functional.saliency_consistency_loss`).

:class:`ConsistencyObjective` computes all three terms from **one** forward pass: the input is made
a leaf that requires grad, the class loss and the tapped activations come from that forward, and
the saliency maps are its input gradient taken with ``create_graph=True``; the final backward then
runs through the maps (double backward), which is where the extra cost is.

Example:
    >>> import torch
    >>> from regpipe import Batch
    >>> from regpipe.functional import soft_target_cross_entropy
    >>> from regpipe.hooks import ConsistencyObjective
    >>> from regpipe.engine.models import preact_resnet_small
    >>> from regpipe.ops.augment import Augment, RandomFlip, Replicate
    >>> model = preact_resnet_small(num_classes=4)
    >>> seeds = Batch.from_labels(torch.rand(4, 3, 32, 32), torch.arange(4), num_classes=4)
    >>> batch = Replicate(2, Augment([RandomFlip(horizontal=1.0)]))(seeds)
    >>> objective = ConsistencyObjective(model, inv_layers=["layer3"], alpha=1.0, beta=1.0, gamma=1.0)
    >>> loss = objective(model, batch, soft_target_cross_entropy)
    >>> loss.backward()
    >>> sorted(objective.last)
    ['class', 'invariance', 'saliency', 'total']
    >>> objective.close()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from regpipe.core.batch import Batch
from regpipe.functional.boxes import box_saliency_loss
from regpipe.functional.saliency import (
    mixed_saliency_loss,
    saliency,
    saliency_consistency_loss,
    saliency_from_logits,
)
from regpipe.hooks.invariance import InvarianceLoss

__all__ = ["ConsistencyObjective", "SaliencyLoss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SaliencyLoss:
    """The saliency-map consistency term of a batch.

    Unmixed batches (e.g. from :class:`~regpipe.ops.augment.Replicate`): every row's map is warped
    back with its recorded affine and compared with the map of its seed's first row
    (:func:`~regpipe.functional.saliency.saliency_consistency_loss`). Mixed batches (``batch.mixing``
    set, e.g. by :class:`~regpipe.ops.sum_mix.SumMix`): the expected map of each row is the same mix
    of the maps of ``parent`` (the batch before mixing), which are computed here as fixed targets.
    Box-augmented batches (``batch.boxes`` set by :class:`~regpipe.ops.cutmix.CutMix` or
    :class:`~regpipe.ops.cutmix.CutOut`): the expected map is the row's own parent map with the partner's
    map pasted into the box (CutMix) or with the hole zeroed (CutOut)
    (:func:`~regpipe.functional.boxes.box_saliency_loss`).

    Args:
        eps: normalisation guard of the max-normalised maps.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = eps

    def from_maps(self, maps: torch.Tensor, batch: Batch, model: nn.Module | None = None,
                  parent: Batch | None = None) -> torch.Tensor:
        """The loss given the batch rows' maps ``(N, H, W)`` (with their graph, to train through them).

        For a mixed batch the rows before mixing come from ``parent`` or, when the mixing op kept them
        (``keep_parent=True``), from ``batch.mixing.parent_inputs`` / ``parent_targets``.
        """
        mixing = batch.mixing
        if mixing is None:
            return saliency_consistency_loss(maps, batch.affine, batch.source_ids, self.eps)
        if parent is not None:
            parent_inputs, parent_targets = parent.inputs, parent.targets
        else:
            parent_inputs, parent_targets = mixing.parent_inputs, mixing.parent_targets
        if parent_inputs is None or model is None:
            raise ValueError("the batch was mixed: pass the batch before mixing as parent= (or mix with "
                             "keep_parent=True) and the model; its maps are the expected maps' ingredients")
        parent_maps = saliency(model, parent_inputs, parent_targets).detach()
        if batch.boxes is not None:
            return box_saliency_loss(maps, parent_maps, batch.mixing.sources[:, 0], batch.boxes.boxes,
                                     batch.boxes.partners, self.eps)
        return mixed_saliency_loss(maps, parent_maps, batch.mixing.sources, batch.mixing.weights, self.eps)

    def __call__(self, model: nn.Module, batch: Batch, parent: Batch | None = None) -> torch.Tensor:
        """Compute the maps of ``batch`` with ``create_graph=True`` and return the consistency loss."""
        maps = saliency(model, batch.inputs, batch.targets, create_graph=True)
        return self.from_maps(maps, batch, model, parent)


class ConsistencyObjective:
    """``alpha * L_class + beta * L_inv + gamma * L_sal`` from one forward pass (Al-afandi et al. 2022, eq. 8).

    Args:
        model: the model (as called; wrappers are fine).
        inv_layers: layers of the invariance term (required when ``beta > 0``), shallow to deep.
        alpha, beta, gamma: weights of the class, invariance and saliency terms (the ImageNet runs of
            the paper use uniform weights); a zero weight skips that term's computation.
        inv_ratio: ``alpha_last / alpha_first`` across ``inv_layers``; the layer weights sum to 1 here,
            ``beta`` scales them.
        eps: normalisation guard of the saliency maps.

    Attributes:
        last: detached terms of the last call: ``class``, ``invariance``, ``saliency``, ``total``.
    """

    def __init__(self, model: nn.Module, inv_layers: Sequence[str] = (), alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0, inv_ratio: float = 10.0, eps: float = 1e-6) -> None:
        for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if beta > 0 and not inv_layers:
            raise ValueError("beta > 0 needs inv_layers (module names whose activations should be invariant)")
        self.model = model
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.invariance = InvarianceLoss(model, inv_layers, alpha=1.0, ratio=inv_ratio) if beta > 0 else None
        self.saliency = SaliencyLoss(eps)
        self.last: dict[str, torch.Tensor] = {}

    def __call__(self, model: nn.Module, batch: Batch, loss_fn: LossFn, parent: Batch | None = None) -> torch.Tensor:
        """The objective on ``batch`` (a recipe's ``compute_loss``; ``parent`` for mixed batches)."""
        x = batch.inputs.detach().requires_grad_(self.gamma > 0)
        logits = model(x)
        class_loss = loss_fn(logits, batch.targets)
        total = self.alpha * class_loss
        self.last = {"class": class_loss.detach()}
        if self.invariance is not None:
            inv = self.invariance.invariance(batch.replicas)
            total = total + self.beta * inv
            self.last["invariance"] = inv.detach()
        if self.gamma > 0:
            maps = saliency_from_logits(logits, x, batch.targets, create_graph=True)
            sal = self.saliency.from_maps(maps, batch, model, parent)
            total = total + self.gamma * sal
            self.last["saliency"] = sal.detach()
        self.last["total"] = total.detach()
        return total

    def close(self) -> None:
        if self.invariance is not None:
            self.invariance.close()

    def __enter__(self) -> ConsistencyObjective:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
