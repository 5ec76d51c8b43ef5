"""Value checks shared by every layer: each names the offending argument and value, and raises early.

regpipe's reliability rules (README, "Reliability"): non-finite values are refused where they enter,
nothing is dropped without an error or an explicit opt-in, and every setting is checked before work
starts. These helpers are the one place the checks are written, so every layer words them alike.

Device synchronisation: a value check of a tensor on an accelerator needs its values on the host, which
stalls the device's queue. The tensor checks here therefore look at values only where they already
are on the host (CPU tensors; :func:`is_host` says which) unless the caller passes ``sync=True``. Ops
that draw their own parameters (``randperm``, ``Beta``) produce valid values by construction and do
not need the device check; values a user passes in are checked on the host before they are moved.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

__all__ = [
    "NonFiniteLoss",
    "check_dense_labels",
    "check_device",
    "check_finite",
    "check_finite_number",
    "check_int",
    "check_permutations",
    "check_pixel_range",
    "check_same_device",
    "check_soft_targets",
    "check_unit_interval",
    "is_host",
]


class NonFiniteLoss(ValueError):
    """A training loss that is not finite, raised before its step reaches the weights (the message names
    where: epoch, step, recipe). An algorithm that takes trial steps through the training loop's step
    (loss-delta) catches it to roll its trial back."""


def is_host(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values costs no device synchronisation (a CPU tensor)."""
    return t.device.type == "cpu"


def check_finite_number(name: str, value: object, low: float | None = None, high: float | None = None, *,
                        low_open: bool = False, high_open: bool = False) -> float:
    """A real, finite number within ``[low, high]`` (open ends with ``low_open``/``high_open``).

    Accepts Python numbers, numpy scalars and 0-d tensors (a 0-d tensor on an accelerator is read, i.e.
    one synchronisation: pass host numbers on hot paths).

    Returns:
        ``value`` as a float.

    Raises:
        TypeError: ``value`` is not a real number (``bool`` included).
        ValueError: NaN, infinite, or out of range; the message names ``name`` and the value.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)} "
                            f"and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        if high is None:
            bound = f"> {low:g}" if low_open else f">= {low:g}"
        elif low is None:
            bound = f"< {high:g}" if high_open else f"<= {high:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {bound}, got {number:g}")
    return number


def check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An integer (not ``bool``) within ``[low, high]``; returns it as ``int``.

    Raises:
        TypeError: not an integer. ValueError: out of range (``name`` and the value are named).
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be an integer in [{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}], got {number}")
    return number


def check_unit_interval(name: str, value: float | torch.Tensor, sync: bool = False) -> None:
    """A weight in ``[0, 1]`` (a float, or a tensor of them): NaN, inf and values outside are refused.

    A tensor on an accelerator is checked only with ``sync=True`` (module docstring).

    Raises:
        ValueError: a value outside ``[0, 1]`` or not finite (the first one is named).
        TypeError: neither a real number nor a floating tensor.
    """
    if not isinstance(value, torch.Tensor):
        check_finite_number(name, value, 0.0, 1.0)
        return
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor of weights in [0, 1], got {value.dtype}")
    if not (sync or is_host(value)) or value.numel() == 0:
        return
    bad = ~((value >= 0) & (value <= 1))  # NaN compares False: it lands here too
    if bool(bad.any()):
        first = value.flatten()[bad.flatten()][0].item()
        raise ValueError(f"{name} must be in [0, 1], got {first}"
                         + (f" (at {bad.flatten().nonzero()[0].item()} of {value.numel()} values)" if value.dim() else ""))


def check_finite(name: str, t: torch.Tensor, sync: bool = False) -> None:
    """Refuse NaN and inf in a floating tensor (integer tensors pass).

    A tensor on an accelerator is checked only with ``sync=True``: call it there where the values enter
    (once per batch from a loader), not inside the training step.

    Raises:
        ValueError: the count of non-finite values and the first one's position are named.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point or not (sync or is_host(t)) or t.numel() == 0:
        return
    if _finite_bounds(t) is not None:
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        flat = (~finite).flatten()
        count, first = int(flat.sum()), int(flat.nonzero()[0])
        raise ValueError(f"{name} holds {count} non-finite value(s) (NaN or inf), the first at flat position "
                         f"{first} of shape {tuple(t.shape)}: {t.flatten()[first].item()}")


def _finite_bounds(t: torch.Tensor) -> tuple[float, float] | None:
    """``(smallest, largest)`` value of a non-empty floating tensor when both are finite, else ``None``.

    One reduction (``aminmax``): NaN propagates into both bounds, so finite bounds mean every value is finite.
    Loaders check every batch on the host: on a ``(128, 1000)`` float32 table this takes 0.1 ms, where
    ``isfinite(t).all()`` (a mask, then a pass over it) took 1.5 ms and ``(t < 0).any()`` another 0.8 ms.
    """
    lo, hi = (float(v) for v in torch.aminmax(t))
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None


def check_soft_targets(name: str, targets: torch.Tensor, atol: float | None = None, sync: bool = False) -> None:
    """Soft targets ``(N, K)``: finite, non-negative, every row summing to 1.

    Args:
        name: how the caller names the tensor (e.g. ``"Batch.targets"``).
        targets: floating ``(N, K)``.
        atol: tolerance of the row sums (default: ``max(1e-4, 8 eps(dtype)) * sqrt(K)``).
        sync: also check a tensor on an accelerator (module docstring).

    Raises:
        ValueError: the first offending row and its value are named.
    """
    if not (sync or is_host(targets)) or targets.numel() == 0:
        return
    bounds = _finite_bounds(targets)
    if bounds is None:
        check_finite(name, targets, sync=sync)  # raises, naming the first non-finite value
    elif bounds[0] < 0:
        row = int((targets < 0).any(dim=1).nonzero()[0])
        raise ValueError(f"{name} must be non-negative soft targets; row {row} is {targets[row].tolist()}")
    if atol is None:  # a few roundings of the dtype (bfloat16 mixing weights such as 1/3 are off by ~2e-3)
        atol = max(1e-4, 8 * torch.finfo(targets.dtype).eps) * max(1.0, targets.shape[1] ** 0.5)
    # summed in float32 at least (exact enough for any atol above; float64 doubled the time on a loader's host path)
    sums = targets.sum(dim=1, dtype=torch.promote_types(targets.dtype, torch.float32))
    off = (sums - 1).abs() > atol
    if bool(off.any()):
        row = int(off.nonzero()[0])
        raise ValueError(f"{name} rows must sum to 1 (soft targets); row {row} sums to {sums[row].item():.6g}"
                         f"{' and ' + str(int(off.sum()) - 1) + ' more rows do not' if int(off.sum()) > 1 else ''}")


def check_permutations(name: str, perms: torch.Tensor, n: int, sync: bool = False, distinct: bool = True) -> None:
    """Every row of ``perms`` ``(..., n)`` is a permutation of ``range(n)`` (int64 assumed checked).

    A tensor on an accelerator is checked only with ``sync=True`` (ops draw theirs with ``randperm``).
    ``distinct=False`` checks the range only (partner indices drawn with replacement).

    Raises:
        ValueError: an index out of ``[0, n)`` or a repeated index; the row and the value are named.
    """
    if not (sync or is_host(perms)) or perms.numel() == 0:
        return
    rows = perms.reshape(-1, n)
    out_of_range = (rows < 0) | (rows >= n)
    if bool(out_of_range.any()):
        r, c = (int(v) for v in out_of_range.nonzero()[0])
        raise ValueError(f"{name} row {r} holds index {int(rows[r, c])} at position {c}, outside [0, {n})")
    if not distinct:
        return
    ok = torch.sort(rows, dim=1).values == torch.arange(n, device=rows.device)
    if not bool(ok.all()):
        r = int((~ok).any(dim=1).nonzero()[0])
        counts = torch.bincount(rows[r], minlength=n)
        repeated = int((counts > 1).nonzero()[0])
        raise ValueError(f"{name} row {r} is not a permutation of range({n}): index {repeated} appears "
                         f"{int(counts[repeated])} times")


def check_pixel_range(name: str, images: torch.Tensor, high: float = 1.0, sync: bool = False) -> None:
    """Floating images are expected in the ``0..high`` pixel scale (``high = 1``: ``x / 255``).

    Catches the common slip of passing float images still in ``0..255``: normalised with a 0..1 mean
    and std they become values in the hundreds and training silently fails. uint8 images pass.

    Raises:
        ValueError: the largest (or a non-finite) value is named, with the fix.
    """
    if not images.dtype.is_floating_point or not (sync or is_host(images)) or images.numel() == 0:
        return
    check_finite(name, images, sync=sync)
    lo, hi = float(images.min()), float(images.max())
    # A little slack: augmentations (brightness, interpolation) overshoot slightly.
    if hi > 1.5 * high or lo < -0.5 * high:
        raise ValueError(f"{name} are floating point with values in [{lo:g}, {hi:g}]; floating images must be "
                         f"in the 0..{high:g} pixel scale (divide 0..255 images by 255, or pass uint8)")


def check_dense_labels(name: str, labels: torch.Tensor, num_classes: int | None = None) -> int:
    """Integer labels ``(N,)`` that use every class ``0 .. K-1`` (``K = num_classes`` or ``max + 1``).

    A label set such as ``{0, 5}`` would otherwise be read as 6 classes, four of them empty: the model
    gets output units it never trains and per-class draws fail later with an unclear error.

    Returns:
        ``K``.

    Raises:
        TypeError: not an integer tensor. ValueError: empty, negative labels, labels ``>= num_classes``,
            or classes with no sample (named, with the labels found).
    """
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (N,) tensor, got shape {tuple(labels.shape)}")
    labels = labels.cpu()
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"{name} holds the negative label {lo}")
    k = hi + 1 if num_classes is None else int(num_classes)
    if hi >= k:
        raise ValueError(f"{name} holds label {hi}, out of range for num_classes={k}")
    present = torch.bincount(labels.long(), minlength=k) > 0
    if not bool(present.all()):
        missing = (~present).nonzero().squeeze(1).tolist()
        found = (present).nonzero().squeeze(1).tolist()
        raise ValueError(f"{name} has no sample of class(es) {missing[:10]}{'...' if len(missing) > 10 else ''} "
                         f"of {k} (labels found: {found[:10]}{'...' if len(found) > 10 else ''}); labels must be "
                         f"0..K-1 with every class present: relabel them densely")
    return k


def check_same_device(owner: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors live on one device (no synchronisation: only ``.device`` is read).

    Raises:
        ValueError: the tensors and their devices are named.
    """
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{owner} tensors must be on one device, got {listed}; move them with .to(device)")


def check_device(name: str, device: torch.device | str) -> torch.device:
    """A CPU or CUDA device this machine has: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Without the check, a CUDA device on a machine without one fails at the first transfer with torch's
    ``AssertionError: Torch not compiled with CUDA enabled`` (or a bare "invalid device ordinal").

    Returns:
        The ``torch.device``.

    Raises:
        ValueError: a device name torch does not know, a type other than cpu/cuda, CUDA without CUDA, or a
            CUDA index beyond the devices present (``name`` and the value are named).
    """
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {str(device)!r} ({name}): use cpu, cuda or cuda:N") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} ({name}) is not supported: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} ({name}) requested but CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} ({name}) requested but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return parsed
