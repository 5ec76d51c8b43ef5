"""Per-channel normalisation of loader pixels: ``(x / 255 - mean) / std``."""

from __future__ import annotations

import torch

__all__ = ["normalize"]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` in 0..255 (or float in 0..1) -> ``(x / 255 - mean) / std`` in ``dtype``.

    ``mean``/``std`` are ``(C,)`` in the 0..1 scale. The memory format of ``images`` is kept.
    """
    if images.dtype == torch.uint8:
        x = images.to(dtype).div_(255.0)
    else:
        x = images.to(dtype, copy=True)  # the in-place ops below must not touch the caller's tensor
    c = x.shape[1]
    if mean.numel() != c or std.numel() != c:
        raise ValueError(f"mean/std have {mean.numel()}/{std.numel()} values for {c} channels")
    return x.sub_(mean.to(x.device, dtype).view(1, c, 1, 1)).div_(std.to(x.device, dtype).view(1, c, 1, 1))
