"""Built-in models and the ``--model`` resolver: built-in names, ``torchvision:ARCH``, ``timm:ARCH``, ``module:factory``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from regpipe.core.optional import install_hint, require

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet_small", "build_model", "check_model_name", "MODELS"]


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): BN-ReLU-conv3x3, BN-ReLU-conv3x3, identity or 1x1 shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """A PreAct-ResNet for small images: stem conv, stages of :class:`PreActBlock`, BN-ReLU, global pool, linear.

    Input ``(N, in_channels, H, W)`` float; output logits ``(N, num_classes)``. Named stages
    (``conv1``, ``layer1``, ...) are the hook points later ops use.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128),
                 blocks_per_stage: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        channels = widths[0]
        for i, width in enumerate(widths):
            blocks = [PreActBlock(channels if b == 0 else width, width, stride=(1 if i == 0 or b else 2))
                      for b in range(blocks_per_stage)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            channels = width
        self.num_stages = len(widths)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier, ``(N, widths[-1])``."""
        out = self.conv1(x)
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = torch.relu(self.bn(out))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def preact_resnet_small(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """The default model: widths 16-32-64, one block per stage (~0.18 M parameters, ~12 M multiply-adds
    per 32x32 image), so that a run on 2 CPU cores takes minutes."""
    return PreActResNet(num_classes, in_channels, widths=(16, 32, 64), blocks_per_stage=1)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """PreAct-ResNet-18 layout (widths 64-128-256-512, two blocks per stage) for GPU runs."""
    return PreActResNet(num_classes, in_channels, widths=(64, 128, 256, 512), blocks_per_stage=2)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact-small": preact_resnet_small,
    "preact-resnet18": preact_resnet18,
}


def _import(module: str, what: str) -> Any:
    """``module`` for ``--model what``, or an ImportError that says whether it is missing or broken here."""
    hint = f"{install_hint(module)}, or use a built-in model ({', '.join(sorted(MODELS))})"
    return require(module, needed_by=f"--model {what}", install=hint)


def _torchvision(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """``torchvision.models.<arch>(num_classes=...)``, randomly initialised (no weights are downloaded)."""
    models = _import("torchvision.models", f"torchvision:{arch}")
    factory = getattr(models, arch, None)
    if arch.startswith("_") or not callable(factory):
        known = models.list_models() if hasattr(models, "list_models") else \
            sorted(n for n in dir(models) if n.islower() and not n.startswith("_"))
        raise ValueError(f"torchvision has no model {arch!r}; e.g. {', '.join(list(known)[:8])}")
    if in_channels != 3:
        raise ValueError(f"torchvision:{arch} takes 3-channel images, the data has {in_channels} "
                         "(use --shape cifar for Fashion-MNIST, or a module:factory model)")
    return factory(num_classes=num_classes)


def _timm(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., in_chans=...)``."""
    timm = _import("timm", f"timm:{arch}")
    if not timm.is_model(arch):
        raise ValueError(f"timm has no model {arch!r}; e.g. {', '.join(timm.list_models()[:8])} "
                         "(timm.list_models('resnet*') lists a family)")
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def _factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {name!r}: use 'package.module:factory'")
    module = require(module_name, needed_by=f"model factory {name!r}",
                     install="install its package or put its folder on PYTHONPATH")
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"cannot load model factory {name!r}: {module_name!r} has no callable {attr!r}")
    return factory


def _accepts(factory: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or C extension: try the keyword
        return True
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_model_name(name: str) -> None:
    """Check that ``name`` can be built (its package, architecture or factory exists) without building it,
    so that a bad ``--model`` is reported before any data is read.

    Raises:
        ValueError, ImportError: as :func:`build_model`.
    """
    if name in MODELS:
        return
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)}, torchvision:ARCH, timm:ARCH or "
                         "'package.module:factory'")
    kind, _, arch = name.partition(":")
    if kind == "torchvision":
        models = _import("torchvision.models", name)
        if arch.startswith("_") or not callable(getattr(models, arch, None)):
            raise ValueError(f"torchvision has no model {arch!r} (torchvision.models.list_models() lists them)")
    elif kind == "timm":
        if not _import("timm", name).is_model(arch):
            raise ValueError(f"timm has no model {arch!r} (timm.list_models('resnet*') lists a family)")
    else:
        _factory(name)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A model by name, randomly initialised, with a ``num_classes``-way classifier.

    Names: a built-in (:data:`MODELS`); ``torchvision:ARCH`` (``torchvision.models.ARCH(num_classes=)``, 3-channel
    inputs); ``timm:ARCH`` (``timm.create_model(ARCH, num_classes=, in_chans=)``); ``package.module:factory``
    called as ``factory(num_classes=, in_channels=)``, or ``factory(num_classes=)`` when it takes no
    ``in_channels``.

    Raises:
        ValueError: an unknown built-in, architecture or factory (named), or inputs the model cannot take.
        ImportError: ``torchvision``/``timm``/the factory's module is not installed (says what to install),
            or is installed but fails to import (the error is in the message).
        TypeError: the factory did not return a ``torch.nn.Module``.
    """
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)}, torchvision:ARCH, timm:ARCH or "
                         "'package.module:factory'")
    kind, _, arch = name.partition(":")
    if kind in ("torchvision", "timm"):
        if not arch:
            raise ValueError(f"model {name!r} names no architecture, e.g. {kind}:resnet50")
        model = (_torchvision if kind == "torchvision" else _timm)(arch, num_classes, in_channels)
    else:
        factory = _factory(name)
        kwargs: dict[str, int] = {"num_classes": num_classes}
        if _accepts(factory, "in_channels"):
            kwargs["in_channels"] = in_channels
        model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
