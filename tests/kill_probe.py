"""``regpipe train`` that kills its own process with SIGKILL (no cleanup, no ``finally``) right after its
``STEP``-th training step, as an out-of-memory killer or a lost node would: run by the resume tests.

Usage: python kill_probe.py STEP train [regpipe train options]
"""

from __future__ import annotations

import os
import signal
import sys

from regpipe.cli.train import parse_train
from regpipe.engine.train import train


def main() -> None:
    after = int(sys.argv[1])
    if sys.argv[2] != "train":
        raise SystemExit(f"usage: {__doc__}")
    cfg = parse_train(sys.argv[3:])
    seen = {"steps": 0}

    def kill(epoch: int, batch: object) -> None:
        seen["steps"] += 1
        if seen["steps"] == after:
            os.kill(os.getpid(), signal.SIGKILL)

    train(cfg, observe=kill)


if __name__ == "__main__":
    main()
