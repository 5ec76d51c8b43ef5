"""Small ImageNet-layout JPEG folders of varied sizes for the loader tests (pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

#: (height, width) of the images, varied aspect and size (as ImageNet's)
SIZES = ((40, 56), (64, 48), (36, 36), (50, 70), (72, 40), (44, 60), (58, 58), (48, 80))
CLASSES = ("cat", "dog")


def smooth_image(height: int, width: int, phase: float) -> np.ndarray:
    """``(H, W, 3)`` uint8 smooth pattern (bilinear resampling and JPEG change it little)."""
    i = np.arange(height, dtype=np.float64)[:, None, None]
    j = np.arange(width, dtype=np.float64)[None, :, None]
    c = np.arange(3, dtype=np.float64)[None, None, :]
    v = 128 + 90 * np.sin(i / 7 + phase + c) * np.cos(j / 9 - phase + 0.5 * c) + 0.3 * (i - j)
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


def make_jpeg_folder(root: Path, sizes=SIZES, quality: int = 98) -> list[tuple[str, np.ndarray]]:
    """Write ``ROOT/CLASS/imgNN.jpg`` (4:4:4, high quality) and return ``(relative path, decoded image)`` sorted by
    path (the decode is pillow's of the written file)."""
    from PIL import Image

    written = []
    for n, (h, w) in enumerate(sizes):
        rel = f"{CLASSES[n % len(CLASSES)]}/img{n:02d}.jpg"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(smooth_image(h, w, phase=0.7 * n)).save(path, quality=quality, subsampling=0)
        written.append((rel, np.asarray(Image.open(path).convert("RGB"))))
    return sorted(written)


def sample_source(source: np.ndarray, theta: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``source`` ``(H, W, 3)`` uint8 through the normalised output -> source matrix ``theta`` ``(2, 3)`` at the
    output ``size`` (``affine_grid`` + bilinear ``grid_sample``, align_corners=False); also the mask of output
    pixels whose sample point lies at least one pixel inside the source. Returns ``(3, h, w)`` float in 0..255
    and ``(h, w)`` bool."""
    import torch.nn.functional as F

    src = torch.from_numpy(np.array(source)).permute(2, 0, 1).float()[None]
    grid = F.affine_grid(theta.double()[None].float(), [1, 3, *size], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", align_corners=False)[0]
    h, w = source.shape[:2]
    px = (grid[0, ..., 0] + 1) * w / 2 - 0.5
    py = (grid[0, ..., 1] + 1) * h / 2 - 0.5
    inside = (px >= 1) & (px <= w - 2) & (py >= 1) & (py <= h - 2)
    return out, inside
