"""Loader adapters (installed as ``regpipe.loaders``): turn a loader's output into regpipe ``Batch`` es."""

from regpipe.loaders.torch import TorchLoader, normalize

__all__ = ["TorchLoader", "normalize"]
