"""``regpipe bench pipeline`` on a synthetic ImageNet-like folder (JPEGs of varied sizes, 300-500 px by default), for
the three loaders: the loader alone, with regpipe's device stage, and regpipe's replication against the same
replication written natively in that loader (``regpipe/cli/bench_pipeline.py`` has the rows). OpenMP settings as
the ``regpipe`` command has them (``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise).

    .venv/bin/python benchmarks/bench_pipeline.py [--images 256] [--steps 6] [--loaders dali ffcv torch]
        [--sides 300 500] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def synthetic_folder(root: Path, images: int, seed: int = 0, sides: tuple[int, int] = (300, 500)) -> Path:
    """``images`` photos-like JPEGs (smooth colour fields + noise, quality 90, 4:2:0) in 10 class folders, each
    side drawn uniformly from ``sides`` (``[low, high)`` pixels)."""
    from PIL import Image

    low, high = sides
    if not 1 <= low < high:
        raise ValueError(f"--sides must be two sizes 1 <= LOW < HIGH, got {sides!r}")
    rng = np.random.default_rng(seed)
    for n in range(images):
        h, w = int(rng.integers(low, high)), int(rng.integers(low, high))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(yy / rng.uniform(8, 40) + c) * np.cos(xx / rng.uniform(8, 40) - c) for c in range(3)], -1)
        pixels = np.clip(128 + 90 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = root / f"class{n % 10:02d}" / f"img{n:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--loaders", nargs="+", default=["dali", "ffcv", "torch"])
    parser.add_argument("--sides", type=int, nargs=2, default=[300, 500], metavar=("LOW", "HIGH"),
                        help="image sides drawn from [LOW, HIGH) pixels (default 300 500)")
    parser.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import os

    from regpipe.cli import OPENMP_DEFAULTS  # light: imports no torch

    for name, value in OPENMP_DEFAULTS:  # as the `regpipe` command does, before torch loads
        os.environ.setdefault(name, value)
    from regpipe.cli.bench_pipeline import run_pipeline

    rows = []
    with tempfile.TemporaryDirectory(prefix="regpipe-imagenet-") as tmp:
        root = synthetic_folder(Path(tmp), args.images, sides=tuple(args.sides))
        for loader in args.loaders:
            rows += run_pipeline(root, loader, batch=args.batch, copies=args.copies, size=args.size, steps=args.steps)
            for r in rows[-5:]:
                share = f"  share {100 * r['share']:.1f} %" if "share" in r else ""
                print(f"{r['loader']:<6} {r['name']:<12} {r['images_per_s']:>9.1f} images/s  ratio {r['ratio']:.3f}"
                      f"{'  vs ' + r['against'] if r['against'] else ''}{share}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
