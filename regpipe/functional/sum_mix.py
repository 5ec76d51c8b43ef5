"""Sum Augmentation: the weighted sum of k inputs and of their targets.

Sum Augmentation, its cascading schedule and its gradual (GCC) variant come from the master's thesis
"Deep Learning Training Procedure Augmentations" (Simionescu, Alexandru Ioan Cuza University, 2020),
chapter 3. The formulas each function implements are written in its docstring.

Pure functions: every random choice (the permutations of the permutation mode) is passed in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from regpipe.core.checks import check_permutations

__all__ = ["gcc_weights", "sum_mix", "mix_sources", "check_weights", "group_rows"]

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
    if isinstance(k0, bool) or not isinstance(k0, int) or k0 < 1:
        raise ValueError(f"k0 must be an integer >= 1, got {k0!r}")
    t = float(t)
    if not (0.0 <= t <= 1.0):  # also rejects NaN
        raise ValueError(f"t must be in [0, 1], got {t}")
    if k0 == 1:
        return torch.ones(1, dtype=dtype)
    s = t * (k0 - 1)
    eliminated = min(math.floor(s), k0 - 2)
    f = s - eliminated  # fraction of the current stage done
    m = k0 - eliminated  # active inputs, the fading one included
    fading = (1.0 - f) / m
    main = (1.0 - fading) / (m - 1)
    weights = [main] * (m - 1) + [fading] + [0.0] * (k0 - m)
    return torch.tensor(weights, dtype=torch.float64).to(dtype)


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


def mix_sources(n_rows: int, k: int, perms: torch.Tensor | None = None, drop_remainder: bool = False) -> torch.Tensor:
    """Row indices that :func:`sum_mix` combines: output row ``i`` mixes rows ``sources[i, :]``.

    Group mode (``perms is None``): ``sources[i, g] = g * n + i`` with ``n = group_rows(n_rows, k)``.
    Permutation mode: ``sources[:, 0] = arange(n_rows)`` and ``sources[:, g] = perms[g - 1]``.

    Returns:
        ``(N_out, k)`` int64 tensor (on ``perms``' device in permutation mode, else the CPU).
    """
    if perms is None:
        n = group_rows(n_rows, k, drop_remainder)
        return torch.arange(k * n).view(k, n).t().contiguous()
    _check_perms(perms, n_rows, k)
    first = torch.arange(n_rows, device=perms.device).unsqueeze(0)
    return torch.cat([first, perms.long()], dim=0).t().contiguous()


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
    each label, divided by ``k``). Groups whose weight is zero are not read.

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
    dtype = out_dtype or (x.dtype if x.dtype.is_floating_point else torch.float32)
    n_rows = x.shape[0]

    if perms is None:
        n = group_rows(n_rows, k, drop_remainder)
        parts_x = [x[g * n:(g + 1) * n] for g in range(k)]
        parts_y = [y[g * n:(g + 1) * n] for g in range(k)]
    else:
        _check_perms(perms, n_rows, k, distinct=not partners)
        perms = perms.to(x.device)
        parts_x = [x] + [x.index_select(0, perms[g]) for g in range(k - 1)]
        parts_y = [y] + [y.index_select(0, perms[g].to(y.device)) for g in range(k - 1)]
    return _weighted_sum(parts_x, w, dtype), _weighted_sum(parts_y, w, y.dtype)


def _weighted_sum(parts: list[torch.Tensor], weights: list[float], dtype: torch.dtype) -> torch.Tensor:
    """``sum_g weights[g] * parts[g]`` in ``dtype``, skipping zero weights (never reading those parts)."""
    active = [(p, c) for p, c in zip(parts, weights) if c != 0.0]
    first, c0 = active[0]
    # `mul` keeps the memory format of its input, so channels_last stays channels_last.
    out = first.to(dtype).mul_(c0) if first.dtype != dtype else first.mul(c0)
    for part, c in active[1:]:
        out.add_(part.to(dtype), alpha=c)
    return out


def group_rows(n_rows: int, k: int, drop_remainder: bool = False) -> int:
    """Rows per sum group, ``n = N // k``, when a batch of ``N = n_rows`` rows is split into ``k`` groups.

    Group-mode Sum Augmentation (Simionescu 2020, section 3.3) needs ``k`` to divide the batch size;
    with ``drop_remainder`` the last ``N % k`` rows are left out instead.

    Args:
        n_rows: batch size ``N``.
        k: number of sum groups (``k >= 1``).
        drop_remainder: allow ``N % k != 0`` (the remainder rows are not mixed; logged once per ``(k, N)``
            on the ``regpipe`` logger).

    Returns:
        ``n = N // k``.

    Raises:
        ValueError: ``k < 1``, ``k > N``, or ``k`` does not divide ``N`` and ``drop_remainder`` is False.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n_rows:
        raise ValueError(f"k={k} sum groups need at least k rows, the batch has {n_rows}")
    if n_rows % k and not drop_remainder:
        raise ValueError(f"k={k} does not divide the batch size {n_rows}; use a batch size that is a multiple "
                         f"of {k} or pass drop_remainder=True to drop the last {n_rows % k} rows")
    if n_rows % k:
        _log_dropped(k, n_rows)
    return n_rows // k


_LOGGED_DROPS: set[tuple[int, int]] = set()


def _log_dropped(k: int, n_rows: int) -> None:
    """The opt-in drop is logged (a warning on the ``regpipe`` logger), once per batch size and ``k``:
    nothing is left out without a word."""
    if (k, n_rows) in _LOGGED_DROPS:
        return
    _LOGGED_DROPS.add((k, n_rows))
    logging.getLogger("regpipe").warning(
        "drop_remainder=True: group mixing with k=%d leaves out the last %d of %d rows of every batch of %d rows",
        k, n_rows % k, n_rows, n_rows)


def _check_perms(perms: torch.Tensor, n_rows: int, k: int, distinct: bool = True) -> None:
    if perms.shape != (k - 1, n_rows):
        raise ValueError(f"perms must have shape (k - 1, N) = ({k - 1}, {n_rows}), got {tuple(perms.shape)}")
    if perms.dtype != torch.int64:
        raise TypeError(f"perms must be int64, got {perms.dtype}")
    # Each row must be a permutation: an out-of-range index would fail inside index_select (a device-side
    # assert on CUDA), a repeated one would silently weight some rows twice and never read others.
    # Checked on host values only; the ops draw theirs with randperm on the batch's device.
    check_permutations("perms", perms, n_rows, distinct=distinct)
