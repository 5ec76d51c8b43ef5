"""Streaming an ImageNet-layout JPEG folder: training images per second of each loader (decode, random-resized
crop, flip, normalise; no model), as ``regpipe train --data imagefolder:ROOT`` reads them.

The folder is made here (``tests/imagefolder.py``: JPEGs of 64-128 px, 4 classes) unless ``--root`` names one.
Each loader reads one warm-up epoch (FFCV compiles its pipeline, DALI builds its graph), then ``--epochs``
timed epochs; images/s is the median over them.

Usage: ``python benchmarks/bench_imagefolder.py [--root ROOT] [--per-class 400] [--size 224] [--batch 64]
[--workers 2] [--loaders torch,dali,ffcv] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from regpipe.engine.loading import train_loader  # noqa: E402
from regpipe.engine.splits import folder_splits, parse_data_spec  # noqa: E402


def measure(kind: str, root: Path, size: int, batch: int, workers: int, epochs: int, cache: Path) -> float:
    splits = folder_splits(parse_data_spec(f"imagefolder:{root}"), size, max(size, round(size * 8 / 7)), 0, None,
                           workers=workers)
    order = BatchSampler(RandomSampler(range(len(splits.train)), generator=torch.Generator().manual_seed(0)), batch,
                         drop_last=True)
    batches = train_loader(kind, splits, order, seed=0, device=torch.device("cpu"), ops=[], channels_last=False,
                           workers=workers, cache_dir=str(cache))
    rates = []
    for epoch in range(epochs + 1):
        splits.train.set_epoch(epoch)
        start, images = time.perf_counter(), 0
        for b in batches:
            images += b.size
        if epoch:  # epoch 0 warms up
            rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="an image folder (default: one made here)")
    parser.add_argument("--per-class", type=int, default=400, help="training images per class of the made folder")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--loaders", default="torch,dali,ffcv")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            from imagefolder import write_image_folder

            root = write_image_folder(Path(tmp) / "data", train_per_class=args.per_class, val_per_class=4)
        rows = []
        for kind in [k for k in args.loaders.split(",") if k]:
            try:
                rate = measure(kind, root, args.size, args.batch, args.workers, args.epochs, Path(tmp) / "cache")
            except ImportError as err:
                print(f"{kind}: skipped ({err})")
                continue
            rows.append({"loader": kind, "images_per_s": rate, "size": args.size, "batch": args.batch,
                         "workers": args.workers, "threads": torch.get_num_threads()})
            print(f"| {kind} | {args.size} | {args.batch} | {args.workers} | {rate:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
