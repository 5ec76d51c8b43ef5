"""Feature tap: record the activations of named modules through forward hooks.

The invariance loss (:mod:`regpipe.hooks.invariance`) reads hidden activations, SIGN differentiates
the layer before the logits (:mod:`regpipe.hooks.features`); both need the outputs of modules the
user names. The tap resolves names on the unwrapped model (so a
model wrapped by ``DistributedDataParallel`` or ``torch.compile`` works, with or without the
wrapper's ``module.`` prefix), registers one forward hook per module and keeps the latest output of
each. Hooks are removed on :meth:`close` or when the ``with`` block exits.

Example:
    >>> import torch
    >>> from regpipe.hooks import FeatureTap
    >>> from regpipe.engine.models import preact_resnet_small
    >>> model = preact_resnet_small(num_classes=4)
    >>> with FeatureTap(model, ["layer1", "layer3"]) as tap:
    ...     logits = model(torch.rand(2, 3, 32, 32))
    ...     [tuple(a.shape) for a in tap.outputs().values()]
    [(2, 16, 32, 32), (2, 64, 8, 8)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["FeatureTap", "find_module", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DataParallel/DistributedDataParallel (``.module``) or ``torch.compile``
    (``._orig_mod``) wrappers, unwrapped repeatedly."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``named_modules()`` of the unwrapped ``model`` (a wrapper's
    ``module.`` / ``_orig_mod.`` prefix is accepted too).

    Raises:
        ValueError: no module has that name; the message lists a few names that exist.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = dict(unwrap_model(model).named_modules())
    module = inner.get(name) if name else None
    if module is None and name:
        module = dict(model.named_modules()).get(name)
    if module is None:
        known = [n for n in inner if n][:12]
        raise ValueError(f"model has no module named {name!r}; some valid names: {known}")
    return module


class FeatureTap:
    """Keep the latest output of each named module of ``model``.

    Args:
        model: the model as it is called (possibly wrapped by DDP or ``torch.compile``).
        names: module names of ``named_modules()`` of the unwrapped model.
        detach: store detached outputs (for logging); default keeps the graph (for losses).

    Raises:
        ValueError: an empty list, a repeated name, or a name no module has.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], detach: bool = False) -> None:
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("names must name at least one module")
        if len(set(names)) != len(names):
            raise ValueError(f"module names repeat: {names}")
        self.names = names
        self.detach = detach
        self._outputs: dict[str, torch.Tensor] = {}
        modules = [find_module(model, name) for name in names]  # every name checked before any hook
        self._handles = [module.register_forward_hook(self._recorder(name)) for name, module in zip(names, modules)]

    def _recorder(self, name: str):
        def record(module: nn.Module, args: object, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module {name!r} returned {type(output).__name__}; the tap records tensors only")
            self._outputs[name] = output.detach() if self.detach else output
        return record

    def outputs(self) -> dict[str, torch.Tensor]:
        """``{name: latest output}`` in the order the names were given.

        Raises:
            RuntimeError: a module has not run since the tap was attached or last cleared.
        """
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(f"no output recorded yet for {missing}: run a forward pass first")
        return {n: self._outputs[n] for n in self.names}

    def clear(self) -> None:
        """Forget the recorded outputs (frees their graphs)."""
        self._outputs.clear()

    def close(self) -> None:
        """Remove the hooks and forget the outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
