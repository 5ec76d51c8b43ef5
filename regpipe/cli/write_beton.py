"""``regpipe write-beton ROOT OUT``: an ImageNet-layout folder -> an FFCV ``.beton`` (``image`` + ``label``)."""

from __future__ import annotations

import argparse
import sys

from regpipe.engine.validate import check_output_path

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    """``regpipe write-beton``: FFCV ``DatasetWriter`` with an ``RGBImageField`` and an ``IntField``."""
    p = sub.add_parser("write-beton", help="write an ImageNet-layout image folder to an FFCV .beton",
                       description="Write ROOT/CLASS/IMAGE to OUT (.beton) with FFCV's DatasetWriter: fields image "
                                   "(RGBImageField) and label (IntField, the sorted class folders), samples class by "
                                   "class, each class's files sorted by path (the ids regpipe's DALI sample_ids and "
                                   "--data imagefolder: give the same files). Needs the ffcv extra.")
    p.add_argument("root", help="image folder (ROOT/CLASS/IMAGE)")
    p.add_argument("out", help="the .beton to write")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="longest side kept; larger images are shrunk (ffcv-imagenet: 256-512). Default: full size")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs, 1..100 (default 90)")
    p.add_argument("--write-mode", default="jpg", choices=["raw", "jpg", "smart", "proportion"],
                   help="FFCV's RGBImageField mode (default jpg)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share stored as JPEG in proportion mode (default 0.5)")
    p.add_argument("--workers", type=int, default=1, help="writer processes (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from regpipe.loaders.ffcv import write_image_folder  # FFCV is the optional `ffcv` extra

    check_output_path("OUT", args.out, "file")  # a folder or an unwritable place: refused before any image is read
    path, index = write_image_folder(args.root, args.out, max_resolution=args.max_resolution,
                                     jpeg_quality=args.jpeg_quality, write_mode=args.write_mode,
                                     compress_probability=args.compress_probability, num_workers=args.workers)
    print(f"wrote {len(index)} images of {len(index.classes)} classes to {path}", file=sys.stderr)
    return 0
