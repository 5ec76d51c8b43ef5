"""Interleaved wall-clock timing shared by ``regpipe bench`` and the scripts in ``benchmarks/``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["median_ms"]


def median_ms(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int,
              warmup: int = 3) -> dict[str, float]:
    """Median wall time (ms) of each case. The cases are interleaved round-robin, so drift and noise on
    a shared machine hit all of them alike: the ratios between cases are what the benchmarks report.

    Args:
        cases: name -> zero-argument callable (one call = one timed sample).
        device: CUDA devices are synchronised around every sample.
        repeats: rounds (samples per case, >= 1).
        warmup: untimed calls of each case first (compilation, caches, allocator).

    Returns:
        name -> median milliseconds, in the order of ``cases``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
