"""The ``regpipe`` command: ``train`` (the main job), ``compare``, ``show``, ``sign`` and ``bench``.

Each subcommand lives in its own module with a ``register(subparsers)`` and a ``run(args)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import version

from regpipe.cli import bench, compare, show, sign, train, write_beton
from regpipe.cli import eval as eval_command

__all__ = ["build_parser", "main"]

#: Errors a bad setting, path or input file raises: printed as one line (exit 2). ``REGPIPE_DEBUG=1``
#: shows their traceback instead. OSError covers unwritable or missing paths (the path is in the message).
USER_ERRORS = (ValueError, TypeError, KeyError, OSError, ImportError)

#: Subcommands that skip finished work on a rerun (so an interrupted run resumes).
RESUMABLE = frozenset({"compare", "sign"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe",
        description="Batch-level regularizers for fast image loaders. Trains on Fashion-MNIST "
                    "(Debian's dataset-fashion-mnist) unless told otherwise.")
    # the installed distribution's version, so it names what is installed, never a second copy of the number
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('regpipe')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (train, compare, eval_command, show, sign, bench, write_beton):
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
    except KeyboardInterrupt:
        # compare and sign keep every finished run / shard (written atomically) and skip them on a rerun.
        hint = "rerun the same command to resume" if args.command in RESUMABLE else "nothing was written"
        print(f"regpipe {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("REGPIPE_DEBUG"):
            raise  # the traceback, for developers
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"regpipe {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
