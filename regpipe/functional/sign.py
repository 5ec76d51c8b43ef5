"""SIGN, Signed Input Regularization: iterative Jacobian input transform (SPEC 5; seed 000, Algorithm 1).

Given the activations ``Phi(x)`` of the layer before the logits of a trained model,

    p*_0 = p
    delta_k = grad_x sum_a Phi^a(x)        at x = p*_k (``at="current"``) or x = p (``at="input"``)
    p*_{k+1} = p*_k + eta * delta_k

One vector-Jacobian product per iteration (``torch.autograd.grad`` with respect to the input only):
the model's weights get no ``.grad``, weight gradients are not even computed, and the graph of an
iteration is freed before the next one. ``at="input"`` needs one product in all:
``p*_K = p + K * eta * delta(p)``.

The model runs in the mode it is in. Pass a model in eval mode (the usual case, a trained model's
inference function); in training mode BatchNorm normalises with batch statistics, so the rows of a
batch interact. Either way the model's buffers (BatchNorm running statistics and counters) are saved
before the first iteration and written back afterwards, so a call leaves the model exactly as it was.

Example:
    >>> import torch
    >>> from regpipe.functional import sign
    >>> lin = torch.nn.Linear(4, 3)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, -1.0]]))
    ...     _ = lin.bias.fill_(10.0)            # every unit active: delta = W^T 1 at every iterate
    >>> out = sign(lambda x: torch.relu(lin(x)), torch.zeros(2, 4), iters=100, snapshots=[50, 100])
    >>> out[50][0].tolist(), out[100][0].tolist()
    ([50.0, 50.0, 0.0, -50.0], [100.0, 100.0, 0.0, -100.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from regpipe.hooks.tap import FeatureTap, find_module, unwrap_model

__all__ = ["FeatureFn", "Features", "check_snapshots", "feature_fn", "resolve_features", "sign"]

#: ``x (N, ...) -> activations (N, ...)`` of the layer before the logits.
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
#: A feature function, or ``(model, module_name)``: the output of that module, read by a :class:`FeatureTap`.
Features = FeatureFn | tuple[nn.Module, str]
At = Literal["current", "input"]
Bound = float | torch.Tensor


def check_snapshots(iters: int, snapshots: Iterable[int] | None) -> list[int]:
    """The iteration counts to return, ascending and without repeats (``[iters]`` when ``snapshots`` is None).

    Raises:
        ValueError: ``iters < 1``, an empty list, or a snapshot outside ``[1, iters]``.
        TypeError: ``iters`` or a snapshot is not an int.
    """
    if isinstance(iters, bool) or not isinstance(iters, int):
        raise TypeError(f"iters must be an int, got {iters!r}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if snapshots is None:
        return [iters]
    steps = list(snapshots)
    if not steps:
        raise ValueError("snapshots must name at least one iteration count")
    for k in steps:
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"snapshots must be ints, got {k!r}")
        if not 1 <= k <= iters:
            raise ValueError(f"snapshot {k} is outside [1, iters={iters}]")
    return sorted(set(steps))


def feature_fn(model: nn.Module, layer: str | None = None) -> Features:
    """What SIGN differentiates for ``model``: ``(model, layer)`` when a layer is named, else the model's
    ``features`` method (the built-in PreAct-ResNets: the pooled vector before the classifier).

    Raises:
        ValueError: no layer named and the model has no ``features()`` method.
    """
    if layer:
        find_module(model, layer)  # ValueError naming the layer now, not at the first call
        return (model, layer)
    inner = unwrap_model(model)
    method = getattr(inner, "features", None)
    if not callable(method):  # a missing setting (the layer) rather than a wrong type: ValueError
        raise ValueError(f"model {type(inner).__name__} has no features() method: name the layer before the "  # noqa: TRY004
                         "logits (--sign-layer / --layer NAME)")
    return method


def resolve_features(features: Features) -> tuple[FeatureFn, Callable[[], None], nn.Module | None]:
    """``(feature_fn, close, module_whose_buffers_to_protect)`` for a callable or a ``(model, name)`` pair.

    Raises:
        ValueError: the named module does not exist (the message lists names that do).
        TypeError: ``features`` is neither a callable nor a ``(torch.nn.Module, str)`` pair.
    """
    if isinstance(features, tuple):
        if len(features) != 2 or not isinstance(features[0], nn.Module) or not isinstance(features[1], str):
            raise TypeError(f"features as a tuple must be (torch.nn.Module, layer_name), got {features!r}")
        model, name = features
        tap = FeatureTap(model, [name])  # ValueError naming the layer when it does not exist

        def tapped(x: torch.Tensor) -> torch.Tensor:
            tap.clear()
            model(x)
            return tap.outputs()[name]

        return tapped, tap.close, model
    if not callable(features):
        raise TypeError(f"features must be a callable or a (model, layer_name) pair, got {type(features).__name__}")
    owner = features if isinstance(features, nn.Module) else getattr(features, "__self__", None)
    return features, lambda: None, owner if isinstance(owner, nn.Module) else None


@contextmanager
def _buffers_kept(module: nn.Module | None) -> Iterator[None]:
    """Save ``module``'s buffers and write them back on exit (BatchNorm in training mode updates them)."""
    buffers = [] if module is None else [b for b in module.buffers() if b is not None]
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _bounds(clamp: tuple[Bound, Bound] | None, x: torch.Tensor) -> tuple[Bound, Bound] | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise TypeError(f"clamp must be a (low, high) pair of numbers or tensors, got {clamp!r}")
    lo, hi = (torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in clamp)
    for bound in (lo, hi):
        try:
            fits = torch.broadcast_shapes(bound.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"clamp bound of shape {tuple(bound.shape)} does not broadcast to inputs {tuple(x.shape)}")
    if bool((lo > hi).any()):
        raise ValueError(f"clamp low must not exceed high, got {clamp!r}")
    return lo, hi


def _delta(fn: FeatureFn, x: torch.Tensor) -> torch.Tensor:
    """``grad_x sum_a Phi^a(x)``: one forward and one input-only backward."""
    leaf = x.detach().requires_grad_(True)
    out = fn(leaf)
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"features must return (N, ...) activations with N={x.shape[0]}, got {got}")
    if not out.requires_grad:
        raise ValueError("the features do not depend on the input through autograd (detached output?)")
    # The sum over rows is the per-row sum: rows do not interact (in eval mode), so one VJP with a
    # vector of ones gives every row's delta at once.
    (grad,) = torch.autograd.grad(out.sum(), inputs=leaf)
    return grad


def sign(features: Features, x: torch.Tensor, iters: int, eta: float = 1.0, at: At = "current",
         snapshots: Sequence[int] | None = None,
         clamp: tuple[Bound, Bound] | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
    """Transform a batch with iterative SIGN (SPEC 5).

    Args:
        features: ``x -> (N, D)`` (or ``(N, ...)``) activations of the layer before the logits, e.g. a
            model's ``features`` method; or ``(model, layer_name)``: the output of that module, read
            through a :class:`~regpipe.hooks.FeatureTap` (the rest of the forward runs too).
        x: ``(N, ...)`` float32 (or float64) model inputs (normalised as the model expects). For mixed
            precision call under ``torch.autocast``: the forward runs in half precision, the iterate
            stays float32.
        iters: ``K >= 1``, the number of iterations.
        eta: the step size (the paper's is 1).
        at: ``"current"`` (default, SPEC 5): delta at the current iterate; ``"input"``: delta at ``p``
            every time (Algorithm 1 as printed), which gives ``p + k * eta * delta(p)``.
        snapshots: iteration counts in ``[1, iters]`` to return from the one pass, e.g. ``[50, 100]``.
        clamp: ``(low, high)``, numbers or tensors broadcastable to one input (per-channel bounds as
            ``(C, 1, 1)``): every iterate is projected onto ``[low, high]`` (for ``at="input"`` the
            closed form is clamped, the same when ``p`` lies within the bounds). ``None``: no bounds,
            the paper's (its point is that values leave the input range).

    Returns:
        ``p*_K``, ``(N, ...)`` like ``x``; with ``snapshots``: ``{k: p*_k}`` in ascending ``k``.

    Raises:
        TypeError: ``x`` is not a float32/float64 tensor, or bad ``features``/``clamp`` types.
        ValueError: bad ``iters``/``snapshots``/``eta``/``at``/``clamp``, a missing feature layer, or
            features that are not ``(N, ...)``.
        RuntimeError: called under ``torch.inference_mode`` (no autograd there).
    """
    steps = check_snapshots(iters, snapshots)
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be a float32 or float64 tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta!r}")
    if at not in ("current", "input"):
        raise ValueError(f"at must be 'current' or 'input', got {at!r}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("sign needs autograd: call it outside torch.inference_mode()")
    bounds = _bounds(clamp, x)
    fn, close, owner = resolve_features(features)
    wanted, out = set(steps), {}
    try:
        with _buffers_kept(owner), torch.enable_grad():
            p = x.detach()
            if at == "input":
                delta = _delta(fn, p)
                for k in steps:
                    xk = torch.add(p, delta, alpha=k * float(eta))
                    out[k] = xk if bounds is None else torch.clamp(xk, *bounds)
            else:
                xk = p
                for k in range(1, steps[-1] + 1):
                    xk = torch.add(xk, _delta(fn, xk), alpha=float(eta))
                    if bounds is not None:
                        xk = torch.clamp(xk, *bounds)
                    if k in wanted:
                        out[k] = xk
    finally:
        close()
    return out if snapshots is not None else out[steps[-1]]
