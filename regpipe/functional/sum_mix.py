"""Sum Augmentation: the weighted sum of k inputs and of their targets.

Sum Augmentation, its cascading schedule and its gradual (GCC) variant come from the master's thesis
"Deep Learning Training Procedure Augmentations" (Simionescu, Alexandru Ioan Cuza University, 2020),
chapter 3. The formulas each function implements are written in its docstring.

Pure functions: every random choice (the permutations of the permutation mode) is passed in.

:func:`mix_rows` is the one torch implementation of the weighted row sum that every mixing op executes
(``out[i] = sum_g w[i, g] x[s[i, g]]``, a :class:`~regpipe.core.mix_plan.MixPlan`); the fused kernel of
``regpipe.kernels`` is tested against it (after ``normalize``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from regpipe.core.mix_plan import MixPlan
from regpipe.functional.partners import _check_perms, group_rows, mix_sources

__all__ = ["gcc_coefficients", "gcc_weights", "mix_rows", "sum_mix", "mix_sources", "check_weights", "group_rows"]

# Tolerance for "the weights sum to one": float32 rounding of k <= 64 terms stays far below it.
_WEIGHT_SUM_TOL = 1e-4


def gcc_weights(k0: int, t: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Gradually Cascading Coefficients (GCC) of Gradually Cascading Sum Augmentation.

    Simionescu (2020), section 3.5, eqs. 3.1-3.6 (the printed equations were lost from our copy of
    the thesis; this is our reconstruction from its prose and its figure 3.4). The weights move
    continuously from the uniform average of ``k0`` inputs (``t = 0``) to a single input (``t = 1``):
    one coefficient at a time fades to zero and hands its mass to the others. With
    ``s = t * (k0 - 1)``::

        e = min(floor(s), k0 - 2)          inputs already eliminated
        f = s - e                          progress through the current stage, in [0, 1]
        m = k0 - e                         active inputs, the fading one included
        c_j = (1 - f) / m                  for j = m - 1            (the fading coefficient)
        c_j = (1 - c_{m-1}) / (m - 1)      for j < m - 1            (the "main" coefficients)
        c_j = 0                            for j > m - 1

    and ``c = [1]`` when ``k0 = 1``. Then ``sum(c) = 1``, ``c >= 0``, ``t = 0`` gives ``1/k0``
    everywhere, ``t = 1`` gives ``[1, 0, ..., 0]``, and ``c`` is continuous in ``t``. The first
    coefficient only grows and the last only fades; a middle one rises with the others until its own
    stage, then fades to 0 (``k0 = 4``: ``c_1`` goes 0.25 -> 1/3 -> 1/2 -> 0). At a stage boundary
    (``f = 1``) the fading coefficient is 0 and the main ones are ``1 / (m - 1)``, which is where the
    next stage starts with ``f = 0``.

    Args:
        k0: number of inputs mixed at the start (>= 1).
        t: progress in ``[0, 1]``.
        dtype: dtype of the returned tensor.

    Returns:
        ``(k0,)`` tensor on the CPU, non-negative, summing to 1, non-increasing along the index.
    """
    return torch.tensor(gcc_coefficients(k0, t), dtype=torch.float64).to(dtype)


def gcc_coefficients(k0: int, t: float) -> list[float]:
    """:func:`gcc_weights` as host floats (what the ops use: no tensor is made, and none read back)."""
    if isinstance(k0, bool) or not isinstance(k0, int) or k0 < 1:
        raise ValueError(f"k0 must be an integer >= 1, got {k0!r}")
    t = float(t)
    if not (0.0 <= t <= 1.0):  # also rejects NaN
        raise ValueError(f"t must be in [0, 1], got {t}")
    if k0 == 1:
        return [1.0]
    s = t * (k0 - 1)
    eliminated = min(math.floor(s), k0 - 2)
    f = s - eliminated  # fraction of the current stage done
    m = k0 - eliminated  # active inputs, the fading one included
    fading = (1.0 - f) / m
    main = (1.0 - fading) / (m - 1)
    return [main] * (m - 1) + [fading] + [0.0] * (k0 - m)


def check_weights(weights: torch.Tensor | Sequence[float]) -> list[float]:
    """Validate mixing weights and return them as host floats.

    Raises:
        ValueError: not 1-D, empty, NaN/inf, negative, or not summing to 1 (the value is named).
    """
    if isinstance(weights, (list, tuple)) and all(type(v) in (float, int) for v in weights):
        w = [float(v) for v in weights]  # the usual case, checked in Python: no tensor round trip per batch
        shape: tuple[int, ...] = (len(w),)
    else:
        t = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        shape, w = tuple(t.shape), t.reshape(-1).tolist()
    if len(shape) != 1 or not w:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {shape}")
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"weights must be finite, got {w}")
    if any(v < 0 for v in w):
        raise ValueError(f"weights must be non-negative, got {w}")
    total = math.fsum(w)
    if abs(total - 1.0) > _WEIGHT_SUM_TOL:
        raise ValueError(f"weights must sum to 1, got sum {total:.6g} for {w}")
    return w


def mix_rows(x: torch.Tensor, plan: MixPlan, *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weighted row sum of a mixing plan: ``out[i] = sum_g w[i, g] * x[s[i, g]]``.

    The single torch implementation of the mix of Sum Augmentation (Simionescu 2020, sections 3.3 and 3.5),
    MixUp (Zhang et al. 2018), CutMix's targets (Yun et al. 2019) and test-time sum augmentation, for inputs
    and targets alike (``s = plan.sources``, ``w = plan.weights``). Columns whose host weight
    (``plan.column_weights``) is zero are not read; with per-row weights every column is. Nothing is read
    on the host: the plan's host weights scale whole columns, per-row weights multiply on the device.

    Args:
        x: ``(N, ...)`` rows, float or uint8 (uint8 is summed in its 0..255 values, in ``out_dtype``).
        plan: the mix, on ``x``'s device.
        out_dtype: dtype of the sum; default ``x.dtype`` for float input, float32 for uint8.

    Returns:
        ``(N_out, ...)`` in ``out_dtype``; a channels_last 4-D input gives a channels_last output.

    Raises:
        TypeError: ``x`` is not a float or uint8 tensor, or ``plan`` not a :class:`MixPlan`.
        ValueError: ``x`` has no row axis, or the plan is on another device.
    """
    if not isinstance(plan, MixPlan):
        raise TypeError(f"plan must be a MixPlan, got {type(plan).__name__}")
    if not isinstance(x, torch.Tensor) or not (x.dtype.is_floating_point or x.dtype == torch.uint8):
        raise TypeError(f"x must be a float or uint8 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("x must have a row axis (N, ...)")
    if plan.device != x.device:
        raise ValueError(f"the plan is on {plan.device}, x on {x.device}")
    dtype = out_dtype or (x.dtype if x.dtype.is_floating_point else torch.float32)
    out = None
    for g in plan.active_columns():
        # Advanced indexing, not index_select: on CPU index_select copies 64x3x224x224 float32 rows in 1.2 s
        # against 74 ms here (torch 2.13). Its backward adds repeated rows in a thread-dependent order; the
        # mixes run on data, without gradients.
        part = x[plan.sources[:, g]].to(dtype)  # a fresh tensor: scaled in place below
        if plan.column_weights is not None:
            weight = plan.column_weights[g]
            out = part.mul_(weight) if out is None else out.add_(part, alpha=weight)
        else:
            weight = plan.weights[:, g].to(dtype).view(-1, *([1] * (x.dim() - 1)))
            out = part.mul_(weight) if out is None else out.addcmul_(part, weight)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def sum_mix(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | Sequence[float], *,
            perms: torch.Tensor | None = None, drop_remainder: bool = False,
            out_dtype: torch.dtype | None = None, partners: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of k inputs and of their soft targets (Sum Augmentation).

    Group mode (``perms=None``; Simionescu 2020, section 3.3): the batch is split into
    ``k = len(weights)`` sum groups of ``n = N / k`` rows and row ``i`` of the output is::

        x~_i = sum_{g<k} c_g * x_{g*n + i}          y~_i = sum_{g<k} c_g * y_{g*n + i}

    with ``c_g = weights[g]``: ``1/k`` for plain Sum Augmentation (the thesis averages the sum
    group), the GCC coefficients of :func:`gcc_weights` for the gradual variant (section 3.5). The
    output has ``n`` rows. Permutation mode (ours, mixup-style pairing generalised to ``k`` inputs)::

        x~_i = c_0 * x_i + sum_{g>=1} c_g * x_{perms[g-1, i]}

    keeps ``N`` rows. Targets are mixed alike, by *adding* weights per class, so partners of the same
    class give that class the full weight (the thesis's target: the number of summed samples with
    each label, divided by ``k``). Groups whose weight is zero are not read. The sums are
    :func:`mix_rows` of the table :func:`~regpipe.functional.partners.mix_sources`.

    Args:
        x: ``(N, ...)`` inputs, float or uint8 (uint8 is mixed in ``out_dtype``, float32 by default).
        y: ``(N, K)`` soft targets, floating point.
        weights: ``(k,)`` non-negative weights summing to 1.
        perms: ``(k - 1, N)`` int64 permutations of ``range(N)`` for permutation mode (checked when on the
            host: a repeated index would weight some rows twice and never read others).
        drop_remainder: group mode only: drop the last ``N % k`` rows instead of raising.
        out_dtype: dtype of the mixed inputs; default: ``x.dtype`` for float input, float32 for uint8.
        partners: ``perms`` rows are any partner indices in ``[0, N)``, repeats allowed (test-time sum
            augmentation draws partners with replacement); only their range is checked.

    Returns:
        ``(x_mixed, y_mixed)``: ``(N_out, ...)`` and ``(N_out, K)``; memory format (channels_last) is kept.
    """
    w = check_weights(weights)
    k = len(w)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() < 1 or y.dim() != 2:
        raise ValueError(f"expected x (N, ...) and y (N, K), got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    if not y.dtype.is_floating_point:
        raise TypeError(f"y must be soft targets (floating point, (N, K)), got {y.dtype}")
    if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
        raise TypeError(f"x must be floating point or uint8, got {x.dtype}")
    n_rows = x.shape[0]
    if perms is None:
        sources = mix_sources(n_rows, k, drop_remainder=drop_remainder, device=x.device)
    else:
        _check_perms(perms, n_rows, k, distinct=not partners)
        sources = torch.cat([torch.arange(n_rows, device=x.device).unsqueeze(1), perms.to(x.device).t()], dim=1)
    plan = MixPlan.uniform(sources, tuple(w))
    return mix_rows(x, plan, out_dtype=out_dtype), mix_rows(y.to(x.device), plan)
