"""SIGN, Signed Input Regularization: an iterative input transform along the Jacobian of a trained model.

Asgari Taghanaki, Abhishek & Hamarneh (2019), "Signed Input Regularization". Section 2.1 models the
layer before the logits of a trained model as a smooth map ``Phi: R^n -> R^m`` and its push-forward
at an input ``p`` by the Jacobian ``[Phi_{*,p}]^a_i = dPhi^a / dx^i |_p`` (eqs. 5-6). Summing the
Jacobian over the output units ``a`` gives one input-space vector per sample,

    delta(x) = sum_a grad_x Phi^a(x)        (an (n,)-vector: the column sums of the Jacobian),

whose sign says which input variables raise the layer's activations; variables pushed negative are
the ones the next ReLU discards. Algorithm 1 (section 2.2, "Iterative SIGN") adds it ``K`` times::

    p*_0 = p
    p*_{k+1} = p*_k + eta * delta(x_k),      k = 0 .. K-1
    return p*_K

The paper prints ``delta`` at ``p`` (``x_k = p``, ``at="input"``), which makes the iteration the
rescaling ``p*_K = p + K * eta * delta(p)``; :func:`sign` evaluates it at the current iterate by
default (``x_k = p*_k``, ``at="current"``), the reading under which the iteration is more than a
rescaling. The paper's step is ``eta = 1``, ``K`` is 50 and 100 (section 3), and the iterates are not
clamped (their point is that values leave the input range); ``eta`` and an optional clamp are ours.

``delta`` is one vector-Jacobian product with a vector of ones (``torch.autograd.grad`` with respect
to the input only): weights get no ``.grad``, weight gradients are not even computed, and the graph
of an iteration is freed before the next one. ``at="input"`` needs one product in all.

This module is pure: it takes the feature function ``x -> Phi(x)`` and never touches a model. To
differentiate a named layer of a model (through a forward hook), or to leave a model's BatchNorm
buffers exactly as they were, use :func:`regpipe.hooks.features.tapped_features`. Run the model in
eval mode (the usual case, a trained model's inference function): in training mode BatchNorm
normalises with batch statistics, so the rows of a batch interact.

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
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

__all__ = ["At", "FeatureFn", "check_snapshots", "sign"]

#: ``x (N, ...) -> activations (N, ...)`` of the layer before the logits (``Phi`` of the paper).
FeatureFn = Callable[[torch.Tensor], torch.Tensor]
#: Where ``delta`` is evaluated: at the current iterate, or at the input ``p`` (Algorithm 1 as printed).
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
    """``delta(x) = grad_x sum_a Phi^a(x)`` (Asgari Taghanaki et al. 2019, Algorithm 1 line 3), every row at
    once: one forward and one input-only backward."""
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


def sign(features: FeatureFn, x: torch.Tensor, iters: int, eta: float = 1.0, at: At = "current",
         snapshots: Sequence[int] | None = None,
         clamp: tuple[Bound, Bound] | None = None) -> torch.Tensor | dict[int, torch.Tensor]:
    """Transform a batch with iterative SIGN (Asgari Taghanaki, Abhishek & Hamarneh 2019, Algorithm 1).

    With ``Phi = features`` and ``delta(x) = grad_x sum_a Phi^a(x)``::

        p*_0 = x
        p*_k = P(p*_{k-1} + eta * delta(p*_{k-1}))       at="current" (default)
        p*_k = P(x + k * eta * delta(x))                 at="input" (the paper's delta at p)

    where ``P`` is the projection onto ``[low, high]`` when ``clamp`` is given, else the identity.

    Args:
        features: ``x -> (N, D)`` (or ``(N, ...)``) activations of the layer before the logits, e.g. a
            trained model's ``features`` method; rows must not interact (a model in eval mode). For a
            named layer of a model use :func:`regpipe.hooks.features.tapped_features`, which also
            restores the model's buffers.
        x: ``(N, ...)`` float32 (or float64) model inputs (normalised as the model expects). For mixed
            precision call under ``torch.autocast``: the forward runs in half precision, the iterate
            stays float32.
        iters: ``K >= 1``, the number of iterations.
        eta: the step size (the paper's is 1).
        at: ``"current"``: ``delta`` at the current iterate; ``"input"``: ``delta`` at ``x`` every
            time (Algorithm 1 as printed), which gives ``x + k * eta * delta(x)`` with one product.
        snapshots: iteration counts in ``[1, iters]`` to return from the one pass, e.g. ``[50, 100]``.
        clamp: ``(low, high)``, numbers or tensors broadcastable to one input (per-channel bounds as
            ``(C, 1, 1)``): every iterate is projected onto ``[low, high]`` (for ``at="input"`` the
            closed form is clamped, the same when ``x`` lies within the bounds). ``None``: no bounds,
            the paper's (its point is that values leave the input range).

    Returns:
        ``p*_K``, ``(N, ...)`` like ``x``; with ``snapshots``: ``{k: p*_k}`` in ascending ``k``.

    Raises:
        TypeError: ``features`` is not callable, ``x`` is not a float32/float64 tensor, or a bad
            ``clamp`` type.
        ValueError: bad ``iters``/``snapshots``/``eta``/``at``/``clamp``, or features that are not
            ``(N, ...)``.
        RuntimeError: called under ``torch.inference_mode`` (no autograd there).
    """
    steps = check_snapshots(iters, snapshots)
    if not callable(features):
        raise TypeError(f"features must be a callable x -> activations, got {type(features).__name__}; "
                        "for a named layer of a model use regpipe.hooks.features.tapped_features(model, layer)")
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
    wanted, out = set(steps), {}
    with torch.enable_grad():
        p = x.detach()
        if at == "input":
            delta = _delta(features, p)
            for k in steps:
                xk = torch.add(p, delta, alpha=k * float(eta))
                out[k] = xk if bounds is None else torch.clamp(xk, *bounds)
        else:
            xk = p
            for k in range(1, steps[-1] + 1):
                xk = torch.add(xk, _delta(features, xk), alpha=float(eta))
                if bounds is not None:
                    xk = torch.clamp(xk, *bounds)
                if k in wanted:
                    out[k] = xk
    return out if snapshots is not None else out[steps[-1]]
