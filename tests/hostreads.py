"""A counter of host reads of tensor values, for tests that prove a device stage never synchronises.

On an accelerator, reading a tensor's values on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``,
``torch.unique``, ``nonzero``...) waits for every queued kernel: one device synchronisation per read. The CPU
tests cannot see a synchronisation, so they count the reads instead, on CPU tensors that stand in for device
ones: :class:`HostReads` counts

* the dispatcher ops that hand values to the host or size an output by its values (``_local_scalar_dense``,
  the op behind ``item()`` and ``bool()``; ``nonzero``; every ``unique`` variant; ``masked_select``; indexing
  with a boolean mask, ``x[mask]`` and ``x[mask] = v``), through a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode`;
* the Python-side reads ``Tensor.item/tolist/cpu/numpy/__bool__/__int__/__float__/__index__`` (patched for the
  duration; a read counted there is not counted again by the ops it runs);

and makes :func:`regpipe.core.checks.is_host` answer "not on the host" (in every loaded module that imported
it), so the value checks that skip device tensors skip here too, as they do on a GPU.

Example::

    with HostReads() as reads:
        op(batch)
    assert reads.total == 0, reads.counts
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import regpipe.core.checks as checks

__all__ = ["HostReads", "count_reads"]

#: dispatcher ops whose result depends on reading values on the host
_READ_OPS = ("_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "unique_dim_consecutive")
#: indexing ops that read their index on the host when it is a boolean mask
_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")
#: Tensor methods that hand values to Python (or copy them to host memory)
_READ_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class _OpCounter(TorchDispatchMode):
    def __init__(self, owner: HostReads) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if self.owner.depth == 0 and (name in _READ_OPS or (name in _INDEX_OPS and _masked(args))):
            self.owner.counts[name if name in _READ_OPS else f"{name}(bool mask)"] += 1
        return func(*args, **(kwargs or {}))


def _masked(args: tuple) -> bool:
    """Whether an ``index``/``index_put`` call indexes with a boolean mask (its output size is the mask's count)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostReads:
    """Context manager counting host reads of tensor values (see the module docstring).

    Attributes:
        counts: reads by kind (op or method name).
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.depth = 0  # > 0 inside a patched method: its own ops are not counted twice
        self._saved: dict[str, Any] = {}
        self._is_host: list[tuple[Any, Any]] = []
        self._mode = _OpCounter(self)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _wrap(self, name: str, original: Any) -> Any:
        owner = self

        def counted(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if owner.depth == 0:
                owner.counts[name] += 1
            owner.depth += 1
            try:
                return original(t, *args, **kwargs)
            finally:
                owner.depth -= 1
        return counted

    def __enter__(self) -> HostReads:
        for name in _READ_METHODS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, self._saved[name]))
        original = checks.is_host
        for module in list(sys.modules.values()):
            if getattr(module, "is_host", None) is original:
                self._is_host.append((module, original))
                module.is_host = lambda t: False
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        for module, original in self._is_host:
            module.is_host = original
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def count_reads(fn: Any, *args: Any, warmup: int = 1, **kwargs: Any) -> Counter[str]:
    """The host reads of one call ``fn(*args, **kwargs)`` after ``warmup`` uncounted calls (lazy generators,
    caches and compilation happen there)."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    with HostReads() as reads:
        fn(*args, **kwargs)
    return reads.counts
