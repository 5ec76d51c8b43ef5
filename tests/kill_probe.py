"""``regpipe train`` that kills its own process with SIGKILL (no cleanup, no ``finally``) right after its
``STEP``-th training step, as an out-of-memory killer or a lost node would: run by the resume tests.

Usage: python kill_probe.py STEP train [regpipe train options]
"""

from __future__ import annotations

import os
import signal
import sys

from regpipe.cli.command import build_parser
from regpipe.cli.options import build_config
from regpipe.engine.train import train


def main() -> None:
    after = int(sys.argv[1])
    args = build_parser().parse_args(sys.argv[2:])
    seen = {"steps": 0}

    def kill(epoch: int, batch: object) -> None:
        seen["steps"] += 1
        if seen["steps"] == after:
            os.kill(os.getpid(), signal.SIGKILL)

    train(build_config(args), observe=kill)


if __name__ == "__main__":
    main()
