"""Fused device kernels (installed as ``regpipe.kernels``).

Empty in this release: the eager torch paths in :mod:`regpipe.functional` are what runs. Kernels
(Triton on CUDA, numba on CPU) arrive with their benchmarks and land here, each beside its torch
reference.
"""

__all__: list[str] = []
