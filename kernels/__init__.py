"""Fused kernels (installed as ``regpipe.kernels``): one kernel per module, its torch reference beside it.

Each kernel module holds a Triton kernel (CUDA; CPU tensors under ``TRITON_INTERPRET=1`` for tests),
a numba kernel (CPU, parallel), the torch reference (the eager composite the kernels are tested
against, and the fallback), the input checks and the dispatch: the ``backend`` argument
(``"triton"``, ``"numba"``, ``"torch"``), else ``$REGPIPE_KERNEL_BACKEND``, else by device (CUDA:
triton when installed, CPU: numba, otherwise torch).

Kernels:
    :func:`fused_group_mix` (:mod:`regpipe.kernels.group_mix`): uint8 (or 0..1 float) ``(N, C, H, W)``
    batch -> per-channel normalisation -> the k-group weighted sum of Sum / Gradually Cascading Sum
    Augmentation (Simionescu 2020, sections 3.3 and 3.5; the formula is in the module docstring),
    ``(N/k, C, H, W)`` float32/float16/bfloat16, NCHW or channels_last, in one pass; zero-weight
    groups are not read. :func:`group_mix_reference` is its reference. :func:`fused_mix` is the same pass
    over any ``(N_out, k)`` row table (group, permutation, partners across seeds after replication), with
    :func:`mix_reference`: the device stage of every loader adapter.

PatchUp's block mask and mix have no kernel: they are under 2 % of a PatchUp step on CPU
(``benchmarks/RESULTS.md``).
"""

from regpipe.kernels._backend import BACKEND_ENV, BACKENDS, available_backends, resolve_backend
from regpipe.kernels.group_mix import (
    CALLS,
    OUT_DTYPES,
    default_numba_threads,
    fused_group_mix,
    fused_mix,
    group_mix_reference,
    mix_reference,
)

__all__ = [
    "CALLS",
    "BACKENDS",
    "BACKEND_ENV",
    "OUT_DTYPES",
    "available_backends",
    "default_numba_threads",
    "fused_group_mix",
    "fused_mix",
    "mix_reference",
    "group_mix_reference",
    "resolve_backend",
]
