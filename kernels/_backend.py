"""Backend choice shared by the fused kernels: device default, ``backend=`` argument, environment override.

Order of precedence: the ``backend`` argument of the call, then the environment variable
``REGPIPE_KERNEL_BACKEND``, then the device default (CUDA: ``triton`` when Triton is installed,
CPU: ``numba``; ``torch``, the eager reference, when neither is installed).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from regpipe.core.optional import installed

__all__ = ["BACKENDS", "BACKEND_ENV", "Backend", "available_backends", "resolve_backend", "triton_interpreting"]

Backend = Literal["triton", "numba", "torch"]
BACKENDS: tuple[str, ...] = ("triton", "numba", "torch")
BACKEND_ENV = "REGPIPE_KERNEL_BACKEND"


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors through the interpreter.

    Triton reads the variable when a kernel is decorated, so it must be set before the kernel module
    is first imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` here: ``torch`` always; ``numba`` on CPU when numba is installed;
    ``triton`` on CUDA (or on CPU under ``TRITON_INTERPRET=1``) when Triton is installed."""
    device = torch.device(device)
    found = []
    if installed("triton") and (device.type == "cuda" or (device.type == "cpu" and triton_interpreting())):
        found.append("triton")
    if device.type == "cpu" and installed("numba"):
        found.append("numba")
    found.append("torch")
    return found


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend a kernel call uses on ``device``.

    Args:
        device: the device of the input tensor.
        backend: ``"triton"``, ``"numba"``, ``"torch"`` or ``None`` (then ``$REGPIPE_KERNEL_BACKEND``, then
            the device default).

    Returns:
        One of :data:`BACKENDS`.

    Raises:
        ValueError: an unknown backend name (argument or environment variable), or a backend that cannot
            run on ``device`` here (e.g. ``numba`` with a CUDA tensor, ``triton`` with a CPU tensor outside
            the interpreter, or a backend whose package is not installed).
    """
    device = torch.device(device)
    source = "backend"
    if backend is None:
        env = os.environ.get(BACKEND_ENV, "").strip().lower()
        if env:
            backend, source = env, f"${BACKEND_ENV}"
    if backend is None:
        usable = available_backends(device)
        # The device default: never the interpreter (it is for tests, and slow).
        if device.type == "cuda" and "triton" in usable:
            return "triton"
        if device.type == "cpu" and "numba" in usable:
            return "numba"
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend not in available_backends(device):
        why = {"triton": "needs Triton installed and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)",
               "numba": "needs numba installed and a CPU tensor"}[backend]
        raise ValueError(f"{source}={backend!r} cannot run on device {device}: it {why}")
    return backend
