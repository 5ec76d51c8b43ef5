"""The feature function SIGN differentiates, taken from a model: its ``features()`` method or a named layer.

:func:`regpipe.functional.sign` is pure: it takes a callable ``x -> Phi(x)``, the activations of the
layer before the logits (Asgari Taghanaki, Abhishek & Hamarneh 2019, section 3: "the output of the
last layer (before the logits)"). This module builds that callable from a model:

* :func:`tapped_features` (a context manager) yields the callable for ``(model, layer)``. With a
  layer name the whole model runs and the output of that module is read through a
  :class:`~regpipe.hooks.tap.FeatureTap`; without one it is the model's ``features()`` method (the
  built-in PreAct-ResNets: the pooled vector before the classifier). On exit the tap's hook is
  removed and the model's buffers (BatchNorm running statistics and counters, which a model in
  training mode updates on every forward) are written back, so the model is left exactly as it was.
* :func:`check_features` raises the same errors up front (an op checks its teacher at construction,
  not at the first batch).

Example:
    >>> import torch
    >>> from regpipe.functional import sign
    >>> from regpipe.hooks.features import tapped_features
    >>> from regpipe.engine.models import preact_resnet_small
    >>> model = preact_resnet_small(num_classes=4).eval()
    >>> with tapped_features(model, "layer3") as phi:
    ...     out = sign(phi, torch.randn(2, 3, 32, 32), iters=3)
    >>> out.shape, model.layer3._forward_hooks == {}
    (torch.Size([2, 3, 32, 32]), True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from regpipe.functional.sign import FeatureFn
from regpipe.hooks.tap import FeatureTap, find_module, unwrap_model

__all__ = ["FeatureFn", "check_features", "kept_buffers", "tapped_features"]


def check_features(model: nn.Module, layer: str | None = None) -> None:
    """Raise now what :func:`tapped_features` would raise for ``(model, layer)``.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``layer`` names no module (the message lists names that exist), or no layer is named
            and the model has no ``features()`` method.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if layer:
        find_module(model, layer)
        return
    inner = unwrap_model(model)
    if not callable(getattr(inner, "features", None)):  # a missing setting (the layer): ValueError
        raise ValueError(f"model {type(inner).__name__} has no features() method: name the layer before the "
                         "logits (--sign-layer / --layer NAME)")


@contextmanager
def kept_buffers(module: nn.Module | None) -> Iterator[None]:
    """Save ``module``'s buffers on entry and write them back on exit (``None``: nothing to keep)."""
    buffers = [] if module is None else [b for b in module.buffers() if b is not None]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


@contextmanager
def tapped_features(model: nn.Module, layer: str | None = None, keep_buffers: bool = True) -> Iterator[FeatureFn]:
    """Yield ``x -> activations`` of ``layer`` of ``model`` (default: its ``features()`` method).

    Args:
        model: the model as it is called (DDP / ``torch.compile`` wrappers are fine). It runs in the
            mode it is in: pass a model in eval mode.
        layer: a name of ``named_modules()`` of the unwrapped model; its output is read through a
            forward hook while the whole model runs. ``None`` or ``""``: the model's ``features()``.
        keep_buffers: write the model's buffers back on exit (they change only in training mode).

    Yields:
        The feature function, for :func:`regpipe.functional.sign` (valid inside the ``with`` block).

    Raises:
        TypeError, ValueError: as :func:`check_features`.
    """
    check_features(model, layer)
    tap = FeatureTap(model, [layer]) if layer else None

    def tapped(x: torch.Tensor) -> torch.Tensor:
        tap.clear()
        model(x)
        return tap.outputs()[layer]

    fn: FeatureFn = tapped if tap is not None else unwrap_model(model).features
    try:
        with kept_buffers(model if keep_buffers else None):
            yield fn
    finally:
        if tap is not None:
            tap.close()
