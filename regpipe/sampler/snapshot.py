"""Exact, allocation-free save/restore of a training state (the loss-delta orderer's rollback after each trial).

The loss-delta orderer takes one trial optimizer step per candidate batch and must undo it bitwise:
parameters, module buffers (BatchNorm running statistics and ``num_batches_tracked``) and the
optimizer state (momentum buffers, Adam moments, step counters that may be tensors or Python
numbers). :class:`StateSnapshot` keeps one preallocated copy of all of that and moves it with
in-place ``copy_`` -- no ``copy.deepcopy`` per candidate (the naive proof of concept in the thesis did
that; ``benchmarks/bench_sampler.py`` measures the difference).

Optimizer state is created lazily by most optimizers on their first step, so the *structure* of
``optimizer.state`` is part of the snapshot: restoring a snapshot taken before the first step removes
the entries a trial step created, and restoring a snapshot taken after it recreates them.

:func:`frozen_running_stats` runs a forward pass in the model's current mode without touching
BatchNorm running statistics (used for the score losses, which must not change the committed state).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["StateSnapshot", "frozen_running_stats", "tracked_parameters"]


def tracked_parameters(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The model's parameters followed by any optimizer parameter the model does not own (deduplicated)."""
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    groups = optimizer.param_groups if optimizer is not None else []
    for p in [*model.parameters(), *(q for g in groups for q in g["params"])]:
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and a.stride() == b.stride()


def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for all ``i``, batched into one foreach call where torch has it."""
    if not dst:
        return
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(dst, src)
        else:  # pragma: no cover - older torch
            for d, s in zip(dst, src):
                d.copy_(s)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, forward passes leave BatchNorm running statistics untouched.

    Each BatchNorm module (``_BatchNorm`` subclasses, ``SyncBatchNorm`` included) that tracks running
    statistics gets ``track_running_stats = False`` for the duration. In train mode it then normalises
    with the batch statistics exactly as in a training forward, but neither reads nor updates
    ``running_mean`` / ``running_var`` / ``num_batches_tracked``; in eval mode it keeps using the running
    statistics (``_BatchNorm.forward`` passes them whenever ``not self.training``). The model's
    modes are not changed. Other stateful modules are not covered (none in regpipe's models).
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in norms:
            m.track_running_stats = False
        yield model
    finally:
        for m in norms:
            m.track_running_stats = True


class StateSnapshot:
    """One preallocated copy of a training state, saved and restored in place.

    Args:
        model: the module whose parameters (and buffers, when ``buffers``) are captured; a DDP wrapper
            works (its ``parameters()`` / ``buffers()`` are the wrapped module's).
        optimizer: its state (``optimizer.state``: every tensor value, including tensor step counters,
            and the Python values beside them) is captured when given. ``param_groups`` are not: an
            optimizer step does not change them (a learning-rate scheduler does, between steps).
        params: capture parameter values.
        buffers: capture module buffers (BatchNorm ``running_mean``/``running_var`` float,
            ``num_batches_tracked`` int64).
        grads: capture ``.grad`` of the parameters (``None`` grads are restored as ``None``).
        scaler: an fp16 loss scaler (``torch.amp.GradScaler``) whose scale and growth tracker are captured
            too (its ``state_dict``), so a rolled-back step also undoes the scale change that step made.

    Buffers are allocated on the first :meth:`save` (``torch.empty_like``: same shape, dtype, device
    and strides) and reused afterwards; later saves allocate only when the optimizer created new state.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 params: bool = True, buffers: bool = True, grads: bool = False,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self._scaler_saved: dict[str, Any] = {}
        self._params = tracked_parameters(model, optimizer)
        self._live: list[torch.Tensor] = []
        if params:
            self._live += self._params
        if buffers:
            self._live += [b for b in model.buffers() if b is not None]
        self._saved: list[torch.Tensor] = []
        self._grads = grads
        self._grad_saved: list[torch.Tensor | None] = []
        self._grad_pool: list[torch.Tensor | None] = [None] * len(self._params)
        # Optimizer state: layout {state key: {name: tensor buffer or plain value}} of the last save,
        # and a pool of every buffer ever allocated, keyed by (id(key), name), so that state that
        # disappears and reappears (lazy creation, rolled back) reuses its buffer.
        self._opt_layout: dict[Any, dict[str, Any]] = {}
        self._opt_pool: dict[tuple[int, str], torch.Tensor] = {}
        self.saved = False

    def save(self) -> None:
        """Copy the live state into the snapshot (in place after the first call)."""
        if not self._saved:
            self._saved = [torch.empty_like(t, memory_format=torch.preserve_format) for t in self._live]
        _copy_all(self._saved, [t.detach() for t in self._live])
        if self._grads:
            self._save_grads()
        if self.optimizer is not None:
            self._save_optimizer()
        if self.scaler is not None:
            self._scaler_saved = self.scaler.state_dict()
        self.saved = True

    def restore(self) -> None:
        """Copy the snapshot back into the live tensors (in place); optimizer state entries that did not
        exist at :meth:`save` time are removed, missing ones are recreated.

        Raises:
            RuntimeError: nothing was saved yet.
        """
        if not self.saved:
            raise RuntimeError("StateSnapshot.restore() called before save()")
        _copy_all([t.detach() for t in self._live], self._saved)
        if self._grads:
            self._restore_grads()
        if self.optimizer is not None:
            self._restore_optimizer()
        if self.scaler is not None:
            self.scaler.load_state_dict(self._scaler_saved)

    # -- gradients ---------------------------------------------------------------------------------
    def _save_grads(self) -> None:
        saved: list[torch.Tensor | None] = []
        dst, src = [], []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                saved.append(None)
                continue
            buf = self._grad_pool[i]
            if buf is None or not _same_layout(buf, g):
                buf = self._grad_pool[i] = torch.empty_like(g, memory_format=torch.preserve_format)
            saved.append(buf)
            dst.append(buf)
            src.append(g.detach())
        _copy_all(dst, src)
        self._grad_saved = saved

    def _restore_grads(self) -> None:
        dst, src = [], []
        for p, buf in zip(self._params, self._grad_saved):
            if buf is None:
                p.grad = None
            elif p.grad is None or not _same_layout(p.grad, buf):
                p.grad = buf.clone()
            else:
                dst.append(p.grad)
                src.append(buf)
        _copy_all(dst, src)

    # -- optimizer state ---------------------------------------------------------------------------
    def _save_optimizer(self) -> None:
        assert self.optimizer is not None
        layout: dict[Any, dict[str, Any]] = {}
        dst, src = [], []
        for key, entry in self.optimizer.state.items():
            saved_entry: dict[str, Any] = {}
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    buf = self._opt_pool.get((id(key), name))
                    if buf is None or not _same_layout(buf, value):
                        buf = torch.empty_like(value, memory_format=torch.preserve_format)
                        self._opt_pool[(id(key), name)] = buf
                    dst.append(buf)
                    src.append(value.detach())
                    saved_entry[name] = buf
                else:  # Python step counters, flags: small values
                    saved_entry[name] = copy.deepcopy(value)
            layout[key] = saved_entry
        _copy_all(dst, src)
        self._opt_layout = layout

    def _restore_optimizer(self) -> None:
        assert self.optimizer is not None
        state = self.optimizer.state
        for key in [k for k in state if k not in self._opt_layout]:
            del state[key]  # state a trial created lazily ("no state" is restored as no entry)
        dst, src = [], []
        for key, saved_entry in self._opt_layout.items():
            live = state[key] if key in state else None  # no defaultdict insertion on a plain lookup
            if live is None:
                live = state[key] = {}
            for name in [n for n in live if n not in saved_entry]:
                del live[name]
            for name, value in saved_entry.items():
                if isinstance(value, torch.Tensor):
                    current = live.get(name)
                    if isinstance(current, torch.Tensor) and _same_layout(current, value):
                        dst.append(current)
                        src.append(value)
                    else:  # never alias the snapshot buffer into the live state
                        live[name] = value.clone(memory_format=torch.preserve_format)
                else:
                    live[name] = copy.deepcopy(value)
        _copy_all(dst, src)
