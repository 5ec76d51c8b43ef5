"""Built-in models and the ``--model NAME|module:factory`` resolver."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet_small", "build_model", "MODELS"]


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


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A built-in model by name, or ``"package.module:factory"`` called as ``factory(num_classes=, in_channels=)``.

    A factory that does not take ``in_channels`` is called with ``num_classes`` only.
    """
    if name in MODELS:
        return MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if ":" not in name:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)} or 'package.module:factory'")
    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load model factory {name!r}: {err}") from err
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels)
    except TypeError:
        model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
