"""Shared timing and reporting for the benchmark scripts (run them as ``python benchmarks/bench_*.py``).

The timer lives in :mod:`regpipe.engine.timing` so that the installed ``regpipe bench`` uses the same
interleaved timer; this module re-exports it for the scripts' ``from timing import median_ms`` and adds
the scripts' shared command-line plumbing.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from regpipe.engine.timing import median_ms

__all__ = ["machine_line", "median_ms", "pick_devices", "write_json"]


def pick_devices(choice: str) -> list[torch.device]:
    """``"all"`` -> CPU plus CUDA when available; otherwise the one device named."""
    if choice == "all":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def machine_line() -> str:
    """``# host cpu, torch version, threads, load average, date`` -- the header every result table carries."""
    return (f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d')}")


def write_json(rows: list[dict], path: str | None) -> None:
    """Write the rows to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=2)
