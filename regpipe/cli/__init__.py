"""Layer 5: the ``regpipe`` command (one module per subcommand, the pictures and the reports).

:func:`main` is the command's entry point (the console script and ``python -m regpipe``). It sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it, before anything loads torch: with OpenMP's default
policy, torch's threads keep spinning after each parallel op and take the cores from DALI's and FFCV's
decoding threads, which share the process (measured on 2 cores: ``FfcvLoader.to_batch`` took 127 ms per batch
with the default policy, 1.4 ms with one torch thread). This package therefore imports nothing heavy until
:func:`main` runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["OPENMP_DEFAULTS", "build_parser", "main"]

#: OpenMP settings ``(name, value)`` the command gives its process when the environment does not (read when
#: torch loads)
OPENMP_DEFAULTS = (("OMP_WAIT_POLICY", "PASSIVE"),)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``regpipe`` command (:func:`regpipe.cli.command.main`) with :data:`OPENMP_DEFAULTS` set where the
    environment leaves them unset (they take effect only if torch has not been loaded yet)."""
    for name, value in OPENMP_DEFAULTS:
        os.environ.setdefault(name, value)
    from regpipe.cli import command

    return command.main(argv)


def build_parser() -> Any:
    """The command's ``argparse`` parser (:func:`regpipe.cli.command.build_parser`)."""
    from regpipe.cli import command

    return command.build_parser()
