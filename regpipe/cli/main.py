"""The ``regpipe`` command: ``train`` (the main job), ``compare``, ``show``, ``sign`` and ``bench``.

Each subcommand lives in its own module with a ``register(subparsers)`` and a ``run(args)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from regpipe.cli import bench, compare, show, sign, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe",
        description="Batch-level regularizers for fast image loaders. Trains on Fashion-MNIST "
                    "(Debian's dataset-fashion-mnist) unless told otherwise.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (train, compare, show, sign, bench):
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"regpipe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
