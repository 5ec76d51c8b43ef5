"""Fused kernels (installed as ``regpipe.kernels``): one kernel per module, its torch reference beside it.

Each kernel module holds a Triton kernel (CUDA; CPU tensors under ``TRITON_INTERPRET=1`` for tests),
a numba kernel (CPU, parallel), the torch reference (the eager composite the kernels are tested
against, and the fallback), the input checks and the dispatch: the ``backend`` argument
(``"triton"``, ``"numba"``, ``"torch"``), else ``$REGPIPE_KERNEL_BACKEND``, else by device (CUDA:
triton when installed, CPU: numba, otherwise torch).

Kernels:
    :class:`FusedMix` / :func:`fused_mix` (:mod:`regpipe.kernels.row_mix`): uint8 (or 0..1 float)
    ``(N, C, H, W)`` batch -> per-channel normalisation -> a :class:`~regpipe.core.mix_plan.MixPlan` (the rows
    and weights every mixing op draws: Sum / Gradually Cascading Sum Augmentation, Simionescu 2020, sections
    3.3 and 3.5, in group or permutation mode, MixUp, partners across seeds after replication; the formula is
    in the module docstring) -> float32/float16/bfloat16, NCHW or channels_last, in one pass; zero-weight
    columns are not read. Its reference is ``mix_rows(normalize(x))`` (:meth:`FusedMix.reference`, the torch
    backend): the device stage of every loader adapter.

PatchUp's block mask and mix have no kernel: they are under 2 % of a PatchUp step on CPU
(``benchmarks/RESULTS.md``).
"""

from regpipe.kernels._backend import BACKEND_ENV, BACKENDS, available_backends, resolve_backend
from regpipe.kernels.row_mix import OUT_DTYPES, FusedMix, default_numba_threads, fused_mix

__all__ = [
    "BACKENDS",
    "BACKEND_ENV",
    "OUT_DTYPES",
    "FusedMix",
    "available_backends",
    "default_numba_threads",
    "fused_mix",
    "resolve_backend",
]
