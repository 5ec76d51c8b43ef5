"""The ``regpipe`` command: ``train``, ``compare``, ``demo`` (the main job, ``make demo``), ``eval``, ``show``,
``sign``, ``bench`` and ``write-beton``.

Each subcommand lives in its own module with a ``register(subparsers)`` and a ``run(args)``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import version

from regpipe.cli import bench, compare, demo, show, sign, train, write_beton
from regpipe.cli import eval as eval_command
from regpipe.engine.loop import Preempted

__all__ = ["build_parser", "main", "user_message"]

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
    for command in (train, compare, demo, eval_command, show, sign, bench, write_beton):
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # `train` and `compare` parse their own arguments (generated from the config dataclasses by tyro): their
    # subparsers take none, so every argument after the command's name is left over and handed to them.
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "settings_command", False):
        args.settings_argv = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except Preempted as err:  # SIGTERM: the state is written, --resume continues (128 + SIGTERM, as a kill)
        print(f"regpipe {args.command}: {err}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        # compare and sign keep every finished run / shard (written atomically) and skip them on a rerun.
        hint = "rerun the same command to resume" if args.command in RESUMABLE else "nothing was written"
        print(f"regpipe {args.command}: interrupted; {hint}", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if os.environ.get("REGPIPE_DEBUG"):
            raise  # the traceback, for developers
        print(f"regpipe {args.command}: error: {user_message(err)}", file=sys.stderr)
        return 2


def user_message(err: BaseException) -> str:
    """The message of a user error as printed: a ``KeyError``'s key without quotes, and for an error re-raised
    from a torch DataLoader worker ("Caught ValueError in DataLoader worker process 0. Original Traceback
    ...") the original error's own message, without the worker's traceback."""
    message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    # The wrapped text is the worker's formatted traceback; its last "Name: message" line (the type possibly
    # module-qualified) starts the original message.
    lines = message.rstrip("\n").split("\n")
    head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ")
    for start in range(len(lines) - 1, 0, -1):
        if head.match(lines[start]):
            return head.sub("", " ".join(line.strip() for line in lines[start:]), count=1)
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
