"""Batch-level image augmentations with recorded, invertible parameters.

In-batch augmentation replication (Hernández-García, König & Kietzmann 2019, "Learning robust visual
representations using data augmentation invariance", section 2.3) puts several transformed copies of
each seed image in one batch; the invariance and saliency losses then compare a copy with its seed,
which needs each copy's transform *recorded* and *invertible*. These are the pure functions behind it.

Geometric transforms are 2x3 affine matrices ``theta`` in the ``torch.nn.functional.affine_grid``
convention: they map *output* coordinates to *input* coordinates, both normalised to ``[-1, 1]``
with ``align_corners=False`` (``-1`` and ``1`` are the outer edges of the border pixels). Building a
transform is separate from applying it, so a chain of geometric ops multiplies its matrices and
warps once (:func:`compose_affine`, :func:`warp`), and :func:`inverse_warp` undoes it.

Conventions of the matrix builders, per row (all tensors ``(N,)`` or ``(N, 2)``, float):

- :func:`flip_affine`: ``x -> -x`` (horizontal) and/or ``y -> -y`` (vertical); samples land on pixel centres.
- :func:`shift_affine`: output pixel ``(i, j)`` reads input pixel ``(i + dy, j + dx)`` for whole-pixel ``(dx, dy)``
  (zeros outside): a zero-padded random crop, whose samples land on pixel centres too.
- :func:`crop_affine`: the output shows the input window of relative size ``(w, h)`` (fractions of
  the width and height) centred at ``(cx, cy)`` (normalised), resized to the full frame.
- :func:`affine_matrix`: the *forward* map rotates by ``angle`` degrees (counter-clockwise on
  screen), shears by ``shear`` degrees ``(x, y)``, scales by ``scale`` and translates by
  ``translate`` (fractions of width and height), about the image centre and in pixel units, so a
  rotation stays a rotation on non-square images; the matrix returned is its inverse (output ->
  input), ready for :func:`warp`.

DALI and other libraries state matrices in pixel coordinates; :func:`affine_from_pixels` and
:func:`affine_to_pixels` convert (pixel centres at ``i + 0.5``, origin at the top-left corner).

**Parameters from uniforms.** A random transform is declared once, as a *draw table*
(:func:`draw_table`): rows ``[kind, slot, a, b, c, d]``, each saying which distribution (``kind``:
:data:`CONSTANT`, :data:`BERNOULLI`, :data:`UNIFORM`, :data:`WINDOW`, :data:`INTEGER`) fills which parameter
*slot* (:data:`FLIP_X` ... :data:`PIXEL_SHIFT_Y`) from how many uniforms. :func:`values_from_uniforms` reads the table
in torch (the ops, on any device); the loaders' numba kernels read the same numbers per copy. A new
transform is a new table (and, for a new kind of parameter, a new slot both readers know).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from regpipe.core.checks import is_host

__all__ = [
    "ANGLE",
    "BERNOULLI",
    "BRIGHTNESS",
    "CENTER_X",
    "CENTER_Y",
    "CONSTANT",
    "CONTRAST",
    "DRAW_COLUMNS",
    "FLIP_X",
    "FLIP_Y",
    "IDENTITY_VALUES",
    "INTEGER",
    "MEAN_PIVOT",
    "NUM_SLOTS",
    "PIVOT",
    "PIXEL_SHIFT_X",
    "PIXEL_SHIFT_Y",
    "SCALE",
    "SHEAR_X",
    "SHEAR_Y",
    "SHIFT_X",
    "SHIFT_Y",
    "SIZE_X",
    "SIZE_Y",
    "UNIFORM",
    "UNIFORMS_PER_DRAW",
    "WINDOW",
    "WINDOW_TRIES",
    "affine_from_pixels",
    "affine_matrix",
    "affine_to_pixels",
    "bernoulli",
    "brightness_contrast",
    "compose_affine",
    "constant",
    "crop_affine",
    "crop_window",
    "draw_table",
    "flip_affine",
    "integer",
    "invert_affine",
    "inverse_warp",
    "shift_affine",
    "table_uniforms",
    "uniform",
    "valid_mask",
    "values_from_uniforms",
    "warp",
]


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` -> ``(N, 3, 3)`` with a last row ``[0, 0, 1]``."""
    _check_theta(theta)
    last = torch.zeros(theta.shape[0], 1, 3, dtype=theta.dtype, device=theta.device)
    last[:, 0, 2] = 1.0
    return torch.cat([theta, last], dim=1)


def _check_theta(theta: torch.Tensor, n: int | None = None) -> None:
    if not isinstance(theta, torch.Tensor) or not theta.dtype.is_floating_point:
        raise TypeError(f"affine matrices must be a floating point tensor, got {getattr(theta, 'dtype', type(theta))}")
    if theta.dim() != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(f"affine matrices must have shape (N, 2, 3), got {tuple(theta.shape)}")
    if n is not None and theta.shape[0] != n:
        raise ValueError(f"{theta.shape[0]} affine matrices for a batch of {n} images")


def _check_images(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if not (x.dtype.is_floating_point or x.dtype == torch.uint8):
        raise TypeError(f"images must be floating point or uint8, got {x.dtype}")


def compose_affine(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The single matrix of warping by ``first`` and then by ``then``, ``(N, 2, 3)``.

    ``warp(warp(x, first), then) == warp(x, compose_affine(first, then))`` up to interpolation:
    output -> input maps chain from the last op back to the first, so the product is ``first @ then``.
    """
    _check_theta(then, first.shape[0])
    return (_homogeneous(first) @ _homogeneous(then))[:, :2]


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` inverse matrices: the transform that undoes ``theta``.

    Raises:
        ValueError: a singular matrix (e.g. scale 0), naming its row.
    """
    full = _homogeneous(theta)
    det = torch.linalg.det(full[:, :2, :2].double())
    bad = (det.abs() < 1e-12).nonzero()
    if bad.numel():
        raise ValueError(f"affine matrix of row {int(bad[0])} is singular (determinant {float(det[bad[0]]):.3g})")
    return torch.linalg.inv(full.double())[:, :2].to(theta.dtype)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Resample images through per-row affine matrices (``affine_grid`` + ``grid_sample``).

    Args:
        x: ``(N, C, H, W)`` float or uint8. uint8 is resampled in float32 and rounded back (bilinear
            weights are convex, so values stay in 0..255).
        theta: ``(N, 2, 3)`` output -> input matrices.
        mode, padding_mode: as in ``grid_sample``; pixels mapped from outside the frame get 0 with
            ``"zeros"``.

    Returns:
        ``(N, C, H, W)``, same dtype and memory format as ``x``.
    """
    _check_images(x)
    _check_theta(theta, x.shape[0])
    work = x.float() if x.dtype == torch.uint8 else x
    grid = F.affine_grid(theta.to(work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    if x.dtype == torch.uint8:
        out = out.round_().to(torch.uint8)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def inverse_warp(y: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp ``y`` (``(N, C, H, W)``, e.g. an augmented image or its saliency map) back to the frame of the
    input that ``theta`` was applied to. Pixels that left the frame come back as 0 (see :func:`valid_mask`)."""
    return warp(y, invert_affine(theta), mode=mode)


def valid_mask(theta: torch.Tensor, height: int, width: int, tolerance: float = 1e-3) -> torch.Tensor:
    """``(N, 1, H, W)`` bool: pixels of the original frame that survive warping with ``theta`` and back (the
    pixels :func:`inverse_warp` can restore). Computed by sending a frame of ones through the warp and
    the inverse warp, so it agrees with ``grid_sample``'s interpolation on both legs: a pixel counts
    as valid when at least ``1 - tolerance`` of its bilinear weight came from inside the frame."""
    ones = torch.ones(theta.shape[0], 1, height, width, dtype=theta.dtype, device=theta.device)
    return inverse_warp(warp(ones, theta), theta) >= 1.0 - tolerance


def flip_affine(horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` flips: ``horizontal``/``vertical`` are ``(N,)`` bool (True = flip that axis)."""
    if horizontal.shape != vertical.shape or horizontal.dim() != 1:
        raise ValueError(f"horizontal and vertical must both be (N,), got {tuple(horizontal.shape)} "
                         f"and {tuple(vertical.shape)}")
    theta = torch.zeros(horizontal.shape[0], 2, 3, device=horizontal.device)
    theta[:, 0, 0] = 1.0 - 2.0 * horizontal.float()
    theta[:, 1, 1] = 1.0 - 2.0 * vertical.float()
    return theta


def shift_affine(shift: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 2, 3)`` whole-pixel translations: output pixel ``(i, j)`` reads input pixel ``(i + dy, j + dx)``.

    ``shift`` is ``(N, 2)`` float ``(dx, dy)`` in pixels. The normalised offset of ``d`` pixels along an axis of
    ``n`` pixels is ``2 d / n``, so with ``align_corners=False`` an output pixel centre ``(2 j + 1) / n - 1``
    lands on the input pixel centre ``(2 (j + d) + 1) / n - 1``: for integer offsets the bilinear warp only
    copies pixels, and rows that come from outside the frame are zeros. Drawing ``dx, dy`` uniformly from
    ``{-p, ..., p}`` is the CIFAR crop: pad the image by ``p`` zeros on every side, then take a random
    ``H x W`` window of the padded image (window offset ``d + p``).
    """
    if shift.dim() != 2 or shift.shape[1] != 2:
        raise ValueError(f"shift must be (N, 2) pixel offsets (dx, dy), got {tuple(shift.shape)}")
    theta = torch.zeros(shift.shape[0], 2, 3, dtype=shift.dtype, device=shift.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shift[:, 0] * (2.0 / width)
    theta[:, 1, 2] = shift[:, 1] * (2.0 / height)
    return theta


def crop_affine(size: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` crop-and-resize: show the window of relative size ``size[:, 0]`` x ``size[:, 1]``
    (fractions of width and height, in ``(0, 1]`` for a crop, ``> 1`` zooms out) centred at ``center``
    (normalised ``(x, y)``) over the whole output frame."""
    if size.dim() != 2 or size.shape[1] != 2 or center.shape != size.shape:
        raise ValueError(f"size and center must both be (N, 2), got {tuple(size.shape)} and {tuple(center.shape)}")
    if is_host(size) and bool((size <= 0).any()):  # device values: drawn positive, not read back
        raise ValueError(f"crop sizes must be > 0, got minimum {float(size.min())}")
    theta = torch.zeros(size.shape[0], 2, 3, dtype=size.dtype, device=size.device)
    theta[:, 0, 0] = size[:, 0]
    theta[:, 1, 1] = size[:, 1]
    theta[:, :, 2] = center
    return theta


def affine_matrix(angle: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor, shear: torch.Tensor,
                  height: int, width: int) -> torch.Tensor:
    """``(N, 2, 3)`` output -> input matrices of a rotation/shear/scale/translation about the centre.

    Args:
        angle: ``(N,)`` degrees, counter-clockwise as seen on screen (y points down).
        scale: ``(N,)`` > 0, > 1 enlarges the content.
        translate: ``(N, 2)`` shift of the content, fractions of ``(width, height)``.
        shear: ``(N, 2)`` degrees along x and y.
        height, width: image size, so that angles are true angles on non-square images.
    """
    n = angle.shape[0]
    if scale.shape != (n,) or translate.shape != (n, 2) or shear.shape != (n, 2):
        raise ValueError(f"expected angle (N,), scale (N,), translate (N, 2), shear (N, 2); got {tuple(angle.shape)}, "
                         f"{tuple(scale.shape)}, {tuple(translate.shape)}, {tuple(shear.shape)}")
    if is_host(scale) and bool((scale <= 0).any()):  # device values: drawn positive, not read back
        raise ValueError(f"scale must be > 0, got minimum {float(scale.min())}")
    a = torch.deg2rad(angle.double())
    # Forward map in centred pixel units (y down, so a screen-counter-clockwise rotation uses -a).
    rot = torch.stack([torch.stack([a.cos(), a.sin()], -1), torch.stack([-a.sin(), a.cos()], -1)], 1)
    sh = torch.deg2rad(shear.double()).tan()
    shear_m = torch.stack([torch.stack([torch.ones_like(a), sh[:, 0]], -1),
                           torch.stack([sh[:, 1], torch.ones_like(a)], -1)], 1)
    linear = rot @ shear_m * scale.double().view(n, 1, 1)
    # Normalised <-> centred pixels is a diagonal scaling D = diag(W/2, H/2): theta = D^-1 M^-1 D, shift -D^-1 M^-1 t.
    # (D's two host numbers scale rows and columns directly: a tensor of them would be a host -> device copy.)
    half_w, half_h = width / 2.0, height / 2.0
    inv = torch.linalg.inv(linear)
    lin_norm = torch.stack([torch.stack([inv[:, 0, 0], inv[:, 0, 1] * (half_h / half_w)], -1),
                            torch.stack([inv[:, 1, 0] * (half_w / half_h), inv[:, 1, 1]], -1)], 1)
    shift_px = torch.stack([translate[:, 0].double() * width, translate[:, 1].double() * height], -1)
    shift = (inv @ shift_px.unsqueeze(-1)).squeeze(-1)
    shift_norm = torch.stack([-shift[:, 0] / half_w, -shift[:, 1] / half_h], -1)
    return torch.cat([lin_norm, shift_norm.unsqueeze(-1)], dim=2).to(torch.float32)


def _pixel_frame(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(3, 3)`` map from normalised coordinates to pixel coordinates (centres at ``i + 0.5``)."""
    return torch.tensor([[width / 2.0, 0.0, width / 2.0], [0.0, height / 2.0, height / 2.0], [0.0, 0.0, 1.0]],
                        device=device, dtype=dtype)


def affine_from_pixels(matrix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel-coordinate ``(N, 2, 3)`` output -> input matrices (DALI ``warp_affine`` with ``inverse_map=True``)
    to this module's normalised convention."""
    d = _pixel_frame(height, width, matrix.device, torch.float64)
    return (torch.linalg.inv(d) @ _homogeneous(matrix.double()) @ d)[:, :2].to(matrix.dtype)


def affine_to_pixels(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`affine_from_pixels`."""
    d = _pixel_frame(height, width, theta.device, torch.float64)
    return (d @ _homogeneous(theta.double()) @ torch.linalg.inv(d))[:, :2].to(theta.dtype)


def brightness_contrast(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                        center: float | torch.Tensor | None = None) -> torch.Tensor:
    """``brightness * (center + contrast * (x - center))`` per row (DALI's ``brightness_contrast`` form).

    Args:
        x: ``(N, C, H, W)`` float or uint8.
        brightness, contrast: ``(N,)`` multiplicative factors (1 = unchanged).
        center: the contrast pivot; ``None``: each image's mean (torchvision's choice). DALI pivots on
            half the range (128 for uint8).

    Returns:
        Same shape and dtype; uint8 is rounded and saturates at 0 and 255 (the image's range, as in
        DALI and torchvision), float is not clamped.
    """
    _check_images(x)
    n = x.shape[0]
    if brightness.shape != (n,) or contrast.shape != (n,):
        raise ValueError(f"brightness and contrast must be ({n},), got {tuple(brightness.shape)} "
                         f"and {tuple(contrast.shape)}")
    work = x.float() if x.dtype == torch.uint8 else x
    b = brightness.to(work).view(n, 1, 1, 1)
    c = contrast.to(work).view(n, 1, 1, 1)
    if center is None:
        pivot = work.mean(dim=(1, 2, 3), keepdim=True)
    elif isinstance(center, torch.Tensor):
        pivot = center.to(work).view(-1, 1, 1, 1)
    else:
        pivot = float(center)  # a Python number: no host -> device copy
    out = b * (pivot + c * (work - pivot))
    if x.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out



# ------------------------------------------------------------------------------------------------------------------
# Parameters from uniforms: the one declaration of a random transform, read by the ops and by the loaders' kernels.

#: draw kinds (column 0 of a draw table)
CONSTANT, BERNOULLI, UNIFORM, WINDOW, INTEGER = 0, 1, 2, 3, 4
#: tries of a :data:`WINDOW` draw before it falls back to the whole image (torchvision's count)
WINDOW_TRIES = 10
#: uniforms one draw of each kind consumes, indexed by kind
UNIFORMS_PER_DRAW = (0, 1, 1, 2 * WINDOW_TRIES + 2, 1)
#: parameter slots (column 1 of a draw table): flips (1 = flipped), crop window size and centre, affine angle
#: (degrees), scale, shift (fractions of width and height), shear (degrees), colour factors, contrast pivot, and
#: whole-pixel shifts (pixels). A transform's matrix is that of its flip, then its whole-pixel shift, then its
#: crop window, then its affine (``flip_affine``, ``shift_affine``, ``crop_affine``, ``affine_matrix`` composed
#: in that order; slots left at their identity values change nothing), which is how the loaders' kernels build
#: it: a new transform that fits these slots needs no kernel change.
(FLIP_X, FLIP_Y, SIZE_X, SIZE_Y, CENTER_X, CENTER_Y, ANGLE, SCALE, SHIFT_X, SHIFT_Y, SHEAR_X, SHEAR_Y,
 BRIGHTNESS, CONTRAST, PIVOT, PIXEL_SHIFT_X, PIXEL_SHIFT_Y) = range(17)
NUM_SLOTS = 17
#: the :data:`PIVOT` meaning "each image's mean" (a finite sentinel, not NaN: FFCV compiles its kernels with
#: fastmath, which folds NaN tests away)
MEAN_PIVOT = -1.0e30
#: the slot values of "no change": a slot no draw writes keeps its value here
IDENTITY_VALUES = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, MEAN_PIVOT, 0.0, 0.0)
#: columns of a draw table: kind, slot, then the kind's settings a, b, c, d
DRAW_COLUMNS = 6

Row = tuple[float, float, float, float, float, float]


def constant(slot: int, value: float) -> Row:
    """Draw-table row: ``slot = value`` (a setting that travels with the parameters, no uniform)."""
    return (CONSTANT, slot, float(value), 0.0, 0.0, 0.0)


def bernoulli(slot: int, p: float) -> Row:
    """Draw-table row: ``slot = 1 if u < p else 0`` (one uniform)."""
    return (BERNOULLI, slot, float(p), 0.0, 0.0, 0.0)


def uniform(slot: int, low: float, high: float) -> Row:
    """Draw-table row: ``slot = low + u * (high - low)`` (one uniform)."""
    return (UNIFORM, slot, float(low), float(high), 0.0, 0.0)


def integer(slot: int, low: int, high: int) -> Row:
    """Draw-table row: ``slot = low + min(floor(u * (high - low + 1)), high - low)``, an integer uniform over
    ``{low, ..., high}`` (one uniform; the ``min`` keeps a float32 ``u`` just below 1 inside the range)."""
    return (INTEGER, slot, float(low), float(high), 0.0, 0.0)


def crop_window(area: tuple[float, float], ratio: tuple[float, float]) -> Row:
    """Draw-table row of a random crop window: writes :data:`SIZE_X`, :data:`SIZE_Y`, :data:`CENTER_X`,
    :data:`CENTER_Y` from ``2 * WINDOW_TRIES + 2`` uniforms (see :func:`values_from_uniforms`).

    Args:
        area: ``(low, high)`` window area as a fraction of the image area, ``0 < low <= high <= 1``.
        ratio: ``(low, high)`` window aspect ratio (width / height, in fractions of the frame), ``> 0``.
    """
    return (WINDOW, SIZE_X, float(area[0]), float(area[1]), math.log(ratio[0]), math.log(ratio[1]))


def draw_table(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """Rows from :func:`constant`, :func:`bernoulli`, :func:`uniform`, :func:`integer`, :func:`crop_window` as a
    ``(D, 6)`` float64 CPU tensor, the form the ops and the loaders' kernels read.

    Raises:
        ValueError: a row of the wrong length, an unknown kind or slot, or a window row not writing
            :data:`SIZE_X` (the value is named).
    """
    checked = _table_rows(rows)
    return torch.tensor(checked, dtype=torch.float64).reshape(-1, DRAW_COLUMNS)


Table = torch.Tensor | Sequence[Sequence[float]]


def _table_rows(table: Table) -> list[tuple[float, ...]]:
    """The rows of a draw table, validated, as host tuples (a ``(D, 6)`` tensor is read once; the ops pass their
    rows as tuples, so nothing is read per batch)."""
    if isinstance(table, torch.Tensor):
        if table.dim() != 2 or table.shape[1] != DRAW_COLUMNS:
            raise ValueError(f"a draw table is a (D, {DRAW_COLUMNS}) tensor, got {tuple(table.shape)}")
        given = table.tolist()
    elif isinstance(table, Sequence) and all(isinstance(row, Sequence) for row in table):
        given = list(table)
    else:
        raise ValueError(f"a draw table is a (D, {DRAW_COLUMNS}) tensor or a sequence of rows, got "
                         f"{type(table).__name__}")
    for row in given:
        if len(row) != DRAW_COLUMNS:
            raise ValueError(f"a draw-table row has {DRAW_COLUMNS} values [kind, slot, a, b, c, d], got {list(row)!r}")
    rows = [tuple(float(v) for v in row) for row in given]
    for kind, slot, *_ in rows:
        if kind not in (CONSTANT, BERNOULLI, UNIFORM, WINDOW, INTEGER):
            raise ValueError(f"unknown draw kind {kind!r}; known: CONSTANT=0, BERNOULLI=1, UNIFORM=2, WINDOW=3, "
                             "INTEGER=4")
        if slot != int(slot) or not 0 <= slot < NUM_SLOTS or (kind == WINDOW and slot != SIZE_X):
            raise ValueError(f"draw of kind {int(kind)} writes slot {slot!r}: slots are 0..{NUM_SLOTS - 1}, and a "
                             f"WINDOW draw writes SIZE_X={SIZE_X} (and the three slots after it)")
    for kind, _, low, high, *_ in rows:
        if kind == INTEGER and not (low == int(low) and high == int(high) and low <= high):
            raise ValueError(f"an INTEGER draw needs integer bounds low <= high, got [{low!r}, {high!r}]")
    return rows


def table_uniforms(table: Table) -> int:
    """Uniforms one row of parameters consumes under the draw table ``table`` (``(D, 6)`` tensor or rows)."""
    return _uniform_count(_table_rows(table))


def _uniform_count(rows: Sequence[tuple[float, ...]]) -> int:
    """Uniforms consumed by validated table rows (:func:`_table_rows`)."""
    return int(sum(UNIFORMS_PER_DRAW[int(row[0])] for row in rows))


def values_from_uniforms(table: Table, u: torch.Tensor) -> torch.Tensor:
    """The slot values a draw table gives to ``N`` rows of uniforms (the torch reader of the table).

    Rows of ``table`` consume consecutive columns of ``u`` in order (:data:`UNIFORMS_PER_DRAW`); slots no
    row writes keep :data:`IDENTITY_VALUES`. The kinds:

    - ``CONSTANT a``: ``a``. ``BERNOULLI p``: ``1`` if ``u < p`` else ``0``. ``UNIFORM a b``: ``a + u (b - a)``.
    - ``INTEGER a b``: ``a + min(floor(u (b - a + 1)), b - a)``, each of ``a, ..., b`` with probability
      ``1 / (b - a + 1)``.
    - ``WINDOW`` (area ``[a, b]``, log aspect ``[c, d]``): the random-resized-crop window of Szegedy et al.
      (2015, "Going deeper with convolutions", section 6), drawn as torchvision's ``RandomResizedCrop``
      does. Try ``t = 0 .. WINDOW_TRIES - 1``: area ``s_t = a + u_t (b - a)``, aspect
      ``r_t = exp(c + u_{T+t} (d - c))``, width ``w_t = sqrt(s_t r_t)`` and height ``h_t = sqrt(s_t / r_t)``
      as fractions of the frame; keep the first try with ``w_t <= 1`` and ``h_t <= 1``, or the whole
      image (``w = h = 1``) when none fits. The centre is uniform over the positions that keep the window
      inside the frame: ``c_x = (2 u_{2T} - 1)(1 - w)``, ``c_y = (2 u_{2T+1} - 1)(1 - h)`` (``T`` = tries).

    Args:
        table: ``(D, 6)`` draw table (:func:`draw_table`), or its rows.
        u: ``(N, P)`` float uniforms in ``[0, 1)``, ``P = table_uniforms(table)``, on any device.

    Returns:
        ``(N, NUM_SLOTS)`` values in ``u``'s dtype and device.

    Raises:
        ValueError: ``u`` is not ``(N, P)`` floating point (the shape is named).
    """
    rows = _table_rows(table)
    count = _uniform_count(rows)  # rows validated once per call (the ops call this per batch)
    if not isinstance(u, torch.Tensor) or not u.dtype.is_floating_point or u.dim() != 2 or u.shape[1] != count:
        raise ValueError(f"expected (N, {count}) float uniforms for this draw table, got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}"
                         f"{'' if not isinstance(u, torch.Tensor) else ' ' + str(u.dtype)}")
    n = u.shape[0]
    columns = [u.new_full((n,), v) for v in IDENTITY_VALUES]
    k = 0
    for kind, slot, a, b, c, d in rows:
        kind, slot = int(kind), int(slot)
        if kind == CONSTANT:
            columns[slot] = u.new_full((n,), a)
        elif kind == BERNOULLI:
            columns[slot] = (u[:, k] < a).to(u.dtype)
        elif kind == UNIFORM:
            columns[slot] = a + u[:, k] * (b - a)
        elif kind == INTEGER:
            columns[slot] = a + torch.floor(u[:, k] * (b - a + 1.0)).clamp_(max=b - a)
        else:
            tries = WINDOW_TRIES
            area = a + u[:, k:k + tries] * (b - a)
            aspect = torch.exp(c + u[:, k + tries:k + 2 * tries] * (d - c))
            w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
            fits = (w <= 1.0) & (h <= 1.0)
            first = fits.to(u.dtype).argmax(1, keepdim=True)  # argmax returns the first maximum: the first fit
            found = fits.any(1)
            width = torch.where(found, w.gather(1, first).squeeze(1), 1.0)
            height = torch.where(found, h.gather(1, first).squeeze(1), 1.0)
            columns[SIZE_X], columns[SIZE_Y] = width, height
            columns[CENTER_X] = (u[:, k + 2 * tries] * 2.0 - 1.0) * (1.0 - width)
            columns[CENTER_Y] = (u[:, k + 2 * tries + 1] * 2.0 - 1.0) * (1.0 - height)
        k += UNIFORMS_PER_DRAW[kind]
    return torch.stack(columns, 1)
