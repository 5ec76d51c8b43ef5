"""Models for tests that need no BatchNorm (rows of a batch do not interact, so DDP equals one process)."""

from __future__ import annotations

from torch import nn


def pooled_linear(num_classes: int, in_channels: int) -> nn.Module:
    """Average-pool to 4x4, then one linear layer: ``(N, C, H, W) -> (N, num_classes)``."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, num_classes))
