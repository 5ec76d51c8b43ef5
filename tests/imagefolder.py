"""A small ImageNet-layout JPEG folder (ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg) of varied sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("n01_red", "n02_green", "n03_blue", "n04_grey")
_COLOURS = np.array([[200, 40, 40], [40, 190, 60], [50, 60, 210], [128, 128, 128]], dtype=np.float64)


def write_image_folder(root: Path, train_per_class: int, val_per_class: int, seed: int = 0,
                       classes: tuple[str, ...] = CLASSES) -> Path:
    """JPEGs of 64-128 px per side (random width and height), one colour per class plus noise and a
    bright square, so that a small model can tell the classes apart. Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(64, 129, size=2))
                pixels = _COLOURS[c % len(_COLOURS)] + rng.normal(0, 25, size=(h, w, 3))
                top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
                pixels[top:top + h // 3, left:left + w // 3] = 255
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:04d}.JPEG", quality=90)
    return root
