"""White-box L-infinity adversarial attacks in the model's (normalised) input space.

Every attack here perturbs a batch ``x`` (already normalised, as the model sees it) to raise the loss
``L(f(x'), y)`` of the true labels, under two box constraints applied to every iterate:

* the eps-ball ``|x' - x| <= eps`` (per element; ``eps`` may differ per channel, e.g. a pixel budget
  ``8/255`` divided by the channel's ``std``: :func:`pixel_eps`);
* the valid range ``lower <= x' <= upper``: the normalised images of pixels in ``[0, 1]``
  (:func:`valid_range`), so an adversarial image is still an image.

Both sets are axis-aligned boxes that contain ``x``, so the Euclidean projection onto their
intersection is clamping to the ball and then to the range (:func:`project`).

The attacks (:func:`fgsm`, :func:`bim`, :func:`mim`, :func:`pgd`) are one iteration,
:func:`iterative_attack`, with different settings. ``model`` is any callable ``(N, C, H, W) ->
(N, K)`` logits, so an ensemble (test-time augmentation with fresh random draws at every call, i.e.
expectation over transformation, Athalye et al. 2018) is attacked with the same functions. Put the
model in the mode you want (eval) yourself; its parameters receive no gradient.

Example:
    >>> import torch
    >>> from regpipe.functional.attacks import fgsm, valid_range, pixel_eps
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    >>> lower, upper = valid_range(mean, std)
    >>> x = torch.zeros(2, 3, 2, 2)  # the mean image, normalised
    >>> adv = fgsm(model, x, torch.tensor([0, 2]), pixel_eps(8 / 255, std), lower=lower, upper=upper)
    >>> bool(((adv - x).abs() <= 4 * 8 / 255 + 1e-6).all())
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ATTACKS",
    "bim",
    "default_step_size",
    "fgsm",
    "input_gradient",
    "iterative_attack",
    "mim",
    "pgd",
    "pixel_eps",
    "project",
    "valid_range",
]

Model = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Bound = float | torch.Tensor

#: The attacks by name, in the order ``regpipe eval`` reports them.
ATTACKS = ("fgsm", "bim", "mim", "pgd")


def _sum_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch: each row's input gradient is its own loss's gradient."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


def valid_range(mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised images of the pixel values 0 and 1: ``lower = -mean / std``, ``upper = (1 - mean) / std``.

    Args:
        mean, std: ``(C,)`` per-channel normalisation in the 0..1 scale (``std > 0``).

    Returns:
        ``(lower, upper)``, each ``(1, C, 1, 1)``.

    Raises:
        ValueError: ``mean``/``std`` of different lengths, or a ``std`` that is not positive and finite.
    """
    m = torch.as_tensor(mean, dtype=torch.float64).flatten()
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    if m.shape != s.shape or m.numel() == 0:
        raise ValueError(f"mean and std must have one value per channel, got {m.numel()} and {s.numel()}")
    if not bool(torch.isfinite(s).all() & (s > 0).all()) or not bool(torch.isfinite(m).all()):
        raise ValueError(f"std must be positive and finite and mean finite, got mean={m.tolist()} std={s.tolist()}")
    c = m.numel()
    lower = (-m / s).view(1, c, 1, 1).to(device=device, dtype=dtype)
    upper = ((1.0 - m) / s).view(1, c, 1, 1).to(device=device, dtype=dtype)
    return lower, upper


def pixel_eps(eps: float, std: Sequence[float], device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A budget in pixel units (0..1 scale, e.g. ``8/255``) as the per-channel budget of the normalised
    space, ``eps / std`` (``(1, C, 1, 1)``): the same set of images as ``|p' - p| <= eps`` in pixels."""
    _check_eps(eps)
    s = torch.as_tensor(std, dtype=torch.float64).flatten()
    if s.numel() == 0 or not bool((s > 0).all() & torch.isfinite(s).all()):
        raise ValueError(f"std must be positive and finite, got {s.tolist()}")
    return (float(eps) / s).view(1, -1, 1, 1).to(device=device, dtype=dtype)


def default_step_size(attack: str, eps: float, steps: int) -> float:
    """The step ``a`` when none is given: ``eps / steps`` for BIM and MIM (the whole budget is reachable in
    ``steps`` steps; Dong et al. 2018 use ``eps / T``), ``2.5 * eps / steps`` for PGD (a random start
    needs room to move across the ball), ``eps`` for FGSM (its one step)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    if attack == "fgsm":
        return float(eps)
    return (2.5 if attack == "pgd" else 1.0) * float(eps) / steps


def _check_eps(eps: Bound, name: str = "eps") -> None:
    if isinstance(eps, torch.Tensor):
        if not eps.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float tensor, got {eps.dtype}")
        if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError(f"{name} must be finite and >= 0, got values in [{float(eps.min())}, {float(eps.max())}]")
        return
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(eps).__name__} {eps!r}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {eps!r}")


def _check_inputs(x: torch.Tensor, y: torch.Tensor, lower: Bound, upper: Bound) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating point (N, C, H, W) tensor, got "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.dtype.is_floating_point:
        raise ValueError(f"y must be ({x.shape[0]},) integer labels, got {tuple(getattr(y, 'shape', ()))} "
                         f"{getattr(y, 'dtype', type(y).__name__)}")
    low = torch.as_tensor(lower, dtype=x.dtype, device=x.device)
    high = torch.as_tensor(upper, dtype=x.dtype, device=x.device)
    if bool((low >= high).any()):
        raise ValueError("lower must be < upper in every channel (the valid range is empty)")


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: Bound, lower: Bound, upper: Bound) -> torch.Tensor:
    """Clamp ``x_adv`` to the eps-ball around ``x`` and then to ``[lower, upper]``.

    ``x' = clip_[lower, upper](clip_[x - eps, x + eps](x_adv))``. Both are boxes containing ``x`` (``x``
    is a valid image), so the result lies in both and is the closest such point to ``x_adv``.
    """
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    out = torch.minimum(torch.maximum(x_adv, x - eps_t), x + eps_t)
    return torch.minimum(torch.maximum(out, torch.as_tensor(lower, dtype=x.dtype, device=x.device)),
                         torch.as_tensor(upper, dtype=x.dtype, device=x.device))


def input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = _sum_cross_entropy) -> torch.Tensor:
    """``grad_x L(model(x), y)`` (``(N, C, H, W)``, detached); the model's parameters get no gradient."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(leaf), y)
        (grad,) = torch.autograd.grad(loss, leaf)
    return grad


def iterative_attack(model: Model, x: torch.Tensor, y: torch.Tensor, eps: Bound, steps: int, step_size: Bound, *,
                     lower: Bound, upper: Bound, momentum: float | None = None, random_start: bool = False,
                     generator: torch.Generator | None = None, loss_fn: LossFn = _sum_cross_entropy) -> torch.Tensor:
    """Signed-gradient ascent on the loss, projected after every step; the attacks below are settings of it.

    With ``P`` = :func:`project` onto the eps-ball around ``x`` and the valid range, ``g = grad_x L``::

        x_0     = x                                  (or P(x + U(-eps, eps)) with random_start)
        m_t     = mu * m_{t-1} + g_t / ||g_t||_1     (with momentum mu; else m_t = g_t)
        x_{t+1} = P(x_t + a * sign(m_t)),            t = 0 .. steps - 1

    ``||g||_1`` is per example (over C, H, W).

    Args:
        model: ``(N, C, H, W) -> (N, K)`` logits (eval mode is the caller's choice).
        x: ``(N, C, H, W)`` float inputs inside ``[lower, upper]`` (normalised images).
        y: ``(N,)`` int64 true labels.
        eps: budget, a number or a tensor broadcastable to ``x`` (per channel: ``(1, C, 1, 1)``), ``>= 0``.
        steps: iterations, ``>= 1``.
        step_size: ``a``, a number or a tensor like ``eps``, ``> 0``.
        lower, upper: the valid range, numbers or tensors broadcastable to ``x`` (:func:`valid_range`).
        momentum: ``mu >= 0`` (MIM), or ``None`` for plain signed gradients.
        random_start: start from a uniform point of the eps-ball (PGD), drawn from ``generator``.
        generator: the ``torch.Generator`` of the random start (required with ``random_start``).
        loss_fn: ``(logits, y) -> scalar`` (default: cross-entropy summed over the batch).

    Returns:
        ``(N, C, H, W)`` adversarial inputs, detached, every element within ``eps`` of ``x`` and within the
        valid range.

    Raises:
        ValueError / TypeError: a bad argument, named with its value, before any forward pass.
    """
    _check_inputs(x, y, lower, upper)
    _check_eps(eps)
    _check_eps(step_size, "step_size")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not math.isfinite(momentum) or momentum < 0):
        raise ValueError(f"momentum must be a finite number >= 0 or None, got {momentum!r}")
    if random_start and not isinstance(generator, torch.Generator):
        raise ValueError("random_start needs a torch.Generator (generator=...) so the start can be replayed")
    x = x.detach()
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    step_t = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    adv = x
    if random_start:
        u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        adv = project(x + (2.0 * u - 1.0) * eps_t, x, eps_t, lower, upper)
    velocity = torch.zeros_like(x) if momentum is not None else None
    for _ in range(steps):
        grad = input_gradient(model, adv, y, loss_fn)
        if velocity is not None:
            norm = grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            velocity = momentum * velocity + grad / norm
            grad = velocity
        adv = project(adv + step_t * grad.sign(), x, eps_t, lower, upper)
    return adv.detach()


def fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: Bound, *, lower: Bound, upper: Bound,
         loss_fn: LossFn = _sum_cross_entropy) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy 2015, section 4):
    ``x' = clip_[lower, upper](x + eps * sign(grad_x L(f(x), y)))``.

    One step of size ``eps`` (:func:`iterative_attack` with ``steps=1, step_size=eps``). Args as there.
    """
    return iterative_attack(model, x, y, eps, 1, eps, lower=lower, upper=upper, loss_fn=loss_fn)


def bim(model: Model, x: torch.Tensor, y: torch.Tensor, eps: Bound, steps: int, step_size: Bound, *, lower: Bound,
        upper: Bound, loss_fn: LossFn = _sum_cross_entropy) -> torch.Tensor:
    """Basic Iterative Method, iterative FGSM (Kurakin, Goodfellow & Bengio 2017, section 2.1):
    ``x_{t+1} = Clip_{x, eps}(x_t + a * sign(grad_x L(f(x_t), y)))`` from ``x_0 = x``, ``steps`` times,
    clipped to the eps-ball and the valid range after each step. Args as :func:`iterative_attack`."""
    return iterative_attack(model, x, y, eps, steps, step_size, lower=lower, upper=upper, loss_fn=loss_fn)


def mim(model: Model, x: torch.Tensor, y: torch.Tensor, eps: Bound, steps: int, step_size: Bound, *, lower: Bound,
        upper: Bound, momentum: float = 1.0, loss_fn: LossFn = _sum_cross_entropy) -> torch.Tensor:
    """Momentum Iterative Method (Dong et al. 2018, Algorithm 1): BIM whose step follows an accumulated,
    L1-normalised gradient, ``g_{t+1} = mu * g_t + grad / ||grad||_1``, ``x_{t+1} = Clip(x_t + a *
    sign(g_{t+1}))`` (the paper: ``mu = 1``, ``a = eps / T``). Args as :func:`iterative_attack`."""
    return iterative_attack(model, x, y, eps, steps, step_size, lower=lower, upper=upper, momentum=momentum,
                            loss_fn=loss_fn)


def pgd(model: Model, x: torch.Tensor, y: torch.Tensor, eps: Bound, steps: int, step_size: Bound, *, lower: Bound,
        upper: Bound, generator: torch.Generator, loss_fn: LossFn = _sum_cross_entropy) -> torch.Tensor:
    """Projected Gradient Descent on the negative loss (Madry et al. 2018, section 2.1): BIM started from a
    uniform random point of the eps-ball, ``x_0 = P(x + U(-eps, eps))``, the start drawn from ``generator``.
    Args as :func:`iterative_attack`."""
    return iterative_attack(model, x, y, eps, steps, step_size, lower=lower, upper=upper, random_start=True,
                            generator=generator, loss_fn=loss_fn)
