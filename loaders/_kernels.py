"""numba kernels shared by the DALI and FFCV adapters and the image-folder dataset: an augmentation chain's
parameters from uniforms, crop windows rounded to whole pixels, the uint8 warp and colour change, and the one
counter-based generator (:func:`counter_uniforms`) every loader draws from.

The chain's randomness is not written here: each transform of a regpipe
:class:`~regpipe.ops.augment.Augment` declares it once as a draw table (``transform.table``, see
:func:`regpipe.functional.augment.values_from_uniforms`), :func:`encode_augment` stacks the tables, and
:func:`augment_params` interprets them per copy with the same formulas as the torch reader. The slot
values then become a matrix by the rules of :mod:`regpipe.functional.augment` (``flip_affine``,
``shift_affine``, ``crop_affine``, ``affine_matrix``, ``compose_affine``), and :func:`warp_u8` /
:func:`colour_u8` mirror ``warp`` (``align_corners=False``, zero padding) and ``brightness_contrast``.
``tests/test_augment_spec.py`` checks, for every transform, that both readers give the same parameters and
matrices.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from regpipe.functional.augment import (
    ANGLE,
    BERNOULLI,
    BRIGHTNESS,
    CENTER_X,
    CENTER_Y,
    CONSTANT,
    CONTRAST,
    FLIP_X,
    FLIP_Y,
    IDENTITY_VALUES,
    INTEGER,
    MEAN_PIVOT,
    NUM_SLOTS,
    PIVOT,
    PIXEL_SHIFT_X,
    PIXEL_SHIFT_Y,
    SCALE,
    SHEAR_X,
    SHEAR_Y,
    SHIFT_X,
    SHIFT_Y,
    SIZE_X,
    SIZE_Y,
    UNIFORM,
    UNIFORMS_PER_DRAW,
    WINDOW,
    WINDOW_TRIES,
)
from regpipe.ops.augment import Augment

__all__ = ["MEAN_PIVOT", "encode_augment", "output_size", "colour_pivot", "axis_aligned", "crop_split", "chain_values",
           "chain_params", "crop_rest_params", "compose_copies", "pixel_matrices", "augment_params", "counter_uniforms",
           "copy_geometry", "copy_params", "snap_windows", "load_int64", "replicate_sample", "warp_u8", "colour_u8"]

_IDENTITY = np.asarray(IDENTITY_VALUES, dtype=np.float64)
_COLOUR_SLOTS = (BRIGHTNESS, CONTRAST, PIVOT)
#: every constant of regpipe.functional.augment the kernels are compiled with (see _refresh_stale_cache)
_LAYOUT = np.asarray([CONSTANT, BERNOULLI, UNIFORM, WINDOW, INTEGER, WINDOW_TRIES, NUM_SLOTS, FLIP_X, FLIP_Y, SIZE_X,
                      SIZE_Y, CENTER_X, CENTER_Y, ANGLE, SCALE, SHIFT_X, SHIFT_Y, SHEAR_X, SHEAR_Y, BRIGHTNESS,
                      CONTRAST, PIVOT, PIXEL_SHIFT_X, PIXEL_SHIFT_Y, MEAN_PIVOT, *IDENTITY_VALUES], dtype=np.float64)


def encode_augment(augment: Augment) -> tuple[np.ndarray, int]:
    """An :class:`Augment` chain as one ``(D, 7)`` float64 table and the number of uniforms one copy consumes.

    Each row is a draw-table row of one transform (``[kind, slot, a, b, c, d]``, see
    :func:`regpipe.functional.augment.draw_table`) prefixed with the transform's position in the chain;
    rows keep chain order, so a copy's uniforms are the transforms' columns side by side, as
    :meth:`Augment.from_uniforms` reads them.

    Raises:
        TypeError: ``augment`` is not an :class:`Augment`, or holds a transform without a draw table (named).
        ValueError: more than one colour transform (the kernels apply one ``brightness_contrast``).
    """
    if not isinstance(augment, Augment):
        raise TypeError(f"augment must be a regpipe Augment chain, got {type(augment).__name__}")
    _refresh_stale_cache()  # every use of the kernels starts from an encoded chain: checked here, not at import
    rows: list[list[float]] = []
    colour = 0
    for index, t in enumerate(augment.transforms):
        table = getattr(t, "table", None)
        if table is None:
            raise TypeError(f"the DALI/FFCV adapters cannot run transform {type(t).__name__}: it has no draw table "
                            "(subclass regpipe.ops.augment.RandomTransform)")
        table = table.numpy()
        rows.extend([float(index), *row] for row in table)
        colour += bool(np.isin(table[:, 1], _COLOUR_SLOTS).any())
    if colour > 1:
        raise ValueError(f"the DALI/FFCV adapters apply one colour transform per chain; merge the {colour} colour "
                         "transforms into one")
    spec = np.asarray(rows, dtype=np.float64).reshape(-1, 7)
    count = augment.num_uniforms
    return spec, int(count)


def output_size(augment: Augment) -> tuple[int, int] | None:
    """``(height, width)`` of the chain's sized ``RandomResizedCrop`` (copies at that size, windows in pixel
    aspect of each source), or ``None``: copies keep the source's size."""
    return augment.output_size


def colour_pivot(spec: np.ndarray) -> float | None:
    """The contrast pivot of an encoded chain's colour transform (``MEAN_PIVOT``: each copy's mean), or ``None``
    without a colour transform."""
    colour = spec[np.isin(spec[:, 2], _COLOUR_SLOTS)]
    if not len(colour):
        return None
    pivot = colour[(colour[:, 1] == CONSTANT) & (colour[:, 2] == PIVOT)]
    return float(pivot[-1, 3]) if len(pivot) else MEAN_PIVOT


def axis_aligned(spec: np.ndarray) -> bool:
    """Whether an encoded chain (:func:`encode_augment`) moves pixels only by flips and crop windows, so that
    every copy is a resize of a window inside its source, possibly mirrored: the chain draws no rotation,
    shear, scale or shift (its matrices are ``[[+-w, 0, cx], [0, +-h, cy]]`` with the window inside the frame).

    Decided from the draw tables, not the transforms' classes: rows that draw crop windows (``WINDOW``), the
    colour slots (applied to the output pixels afterwards), and flips that are all-or-nothing (``BERNOULLI``,
    or a ``CONSTANT`` 0 or 1); any other row makes the chain general (a warp per copy).
    """
    kinds, slots, values = spec[:, 1], spec[:, 2], spec[:, 3]
    all_or_nothing = (kinds == BERNOULLI) | ((kinds == CONSTANT) & np.isin(values, (0.0, 1.0)))
    flips = np.isin(slots, (FLIP_X, FLIP_Y)) & all_or_nothing
    return bool(np.all((kinds == WINDOW) | np.isin(slots, _COLOUR_SLOTS) | flips))


def crop_split(spec: np.ndarray) -> tuple[int, int] | None:
    """Where an encoded chain splits into a crop the loader's resize makes and a rest its warp makes.

    A chain that starts with crops and flips (its leading transforms are :func:`axis_aligned`, one of them
    draws a crop window) and goes on with rotations, shears, scales or shifts (the replication chain on top
    of the ImageNet crop) is made in two steps per copy: the crop's window resized by the loader's own
    resize (antialiased), then the rest warped at the output size, zeros outside the crop (the device
    ``Replicate`` op warping a loader's crop does the same). :func:`crop_rest_params` gives both parts.

    Returns:
        ``(rows, uniforms)``: the spec rows and the uniforms per copy of the leading crop part; ``None`` when
        the whole chain is crops and flips (:func:`axis_aligned`: a resize per copy), when no crop window
        leads it, or when the rest draws a window too (then the chain is one warp per copy).
    """
    rows = uniforms = 0
    window = False
    for index in dict.fromkeys(spec[:, 0].tolist()):  # the transforms, in chain order
        part = spec[spec[:, 0] == index]
        if not axis_aligned(part):
            break
        window = window or bool((part[:, 1] == WINDOW).any())
        rows += len(part)
        uniforms += sum(UNIFORMS_PER_DRAW[int(kind)] for kind in part[:, 1])
    else:
        return None  # crops and flips only
    if not window or bool((spec[rows:, 1] == WINDOW).any()):
        return None
    return rows, uniforms


@numba.njit(cache=True)
def _draw(row: np.ndarray, u: np.ndarray, k: int, values: np.ndarray, shift: float) -> int:
    """One draw-table row ``[kind, slot, a, b, c, d]`` reading ``u[k:]`` into ``values``; returns the uniforms used.

    The formulas of :func:`regpipe.functional.augment.values_from_uniforms`, one copy at a time. ``shift`` is
    added to a window's log aspect: ``log(H / W)`` of the source turns torchvision's pixel aspect
    ``w_px / h_px`` into the frame-fraction aspect the table's formulas use (``w / h = r H / W``); 0 keeps
    the table's own frame-fraction aspect.
    """
    kind, slot, a, b, c, d = int(row[0]), int(row[1]), row[2], row[3], row[4], row[5]
    if kind == CONSTANT:
        values[slot] = a
        return 0
    if kind == BERNOULLI:
        values[slot] = 1.0 if u[k] < a else 0.0
        return 1
    if kind == UNIFORM:
        values[slot] = a + u[k] * (b - a)
        return 1
    if kind == INTEGER:
        values[slot] = a + min(math.floor(u[k] * (b - a + 1.0)), b - a)
        return 1
    w, h = 1.0, 1.0  # WINDOW: the first of the tries that fits, else the whole image
    for t in range(WINDOW_TRIES):
        area = a + u[k + t] * (b - a)
        aspect = math.exp(c + u[k + WINDOW_TRIES + t] * (d - c) + shift)
        tw, th = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if tw <= 1.0 and th <= 1.0:
            w, h = tw, th
            break
    values[SIZE_X] = w
    values[SIZE_Y] = h
    values[CENTER_X] = (u[k + 2 * WINDOW_TRIES] * 2.0 - 1.0) * (1.0 - w)
    values[CENTER_Y] = (u[k + 2 * WINDOW_TRIES + 1] * 2.0 - 1.0) * (1.0 - h)
    return 2 * WINDOW_TRIES + 2


@numba.njit(cache=True)
def _transform_values(spec: np.ndarray, r: int, u: np.ndarray, k: int, values: np.ndarray,
                      shift: float) -> tuple[int, int]:
    """Slot values of the transform whose rows start at ``spec[r]``; returns (next row, next uniform)."""
    values[:] = _IDENTITY
    index = spec[r, 0]
    while r < spec.shape[0] and spec[r, 0] == index:
        k += _draw(spec[r, 1:], u, k, values, shift)
        r += 1
    return r, k


@numba.njit(cache=True)
def chain_values(u: np.ndarray, spec: np.ndarray, num_transforms: int) -> np.ndarray:
    """``(M, T, NUM_SLOTS)`` slot values of ``M`` copies' transforms from their ``(M, P)`` uniforms (the kernels'
    reading of the draw tables; ``transform.from_values(torch.from_numpy(out[:, t]))`` gives its record)."""
    out = np.empty((u.shape[0], num_transforms, NUM_SLOTS))
    values = np.empty(NUM_SLOTS)
    for j in range(u.shape[0]):
        r, k = 0, 0
        while r < spec.shape[0]:
            t = int(spec[r, 0])
            r, k = _transform_values(spec, r, u[j], k, values, 0.0)
            out[j, t] = values
    return out


@numba.njit(cache=True)
def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(2, 3) @ (2, 3)`` in homogeneous form: warping by ``a`` then ``b`` (``compose_affine``)."""
    out = np.empty((2, 3))
    for r in range(2):
        out[r, 0] = a[r, 0] * b[0, 0] + a[r, 1] * b[1, 0]
        out[r, 1] = a[r, 0] * b[0, 1] + a[r, 1] * b[1, 1]
        out[r, 2] = a[r, 0] * b[0, 2] + a[r, 1] * b[1, 2] + a[r, 2]
    return out


@numba.njit(cache=True)
def _affine(v: np.ndarray, height: int, width: int) -> np.ndarray:
    """``affine_matrix`` of the slot values (output -> input, normalised): the inverse of the forward map
    ``rotate(angle) @ shear(shear) * scale`` plus the shift, conjugated into normalised coordinates."""
    a = math.radians(v[ANGLE])
    c, s = math.cos(a), math.sin(a)
    hx, hy = math.tan(math.radians(v[SHEAR_X])), math.tan(math.radians(v[SHEAR_Y]))
    scale = v[SCALE]
    # linear = rot @ shear * scale with rot = [[c, s], [-s, c]], shear = [[1, hx], [hy, 1]]
    l00 = (c + s * hy) * scale
    l01 = (c * hx + s) * scale
    l10 = (-s + c * hy) * scale
    l11 = (-s * hx + c) * scale
    det = l00 * l11 - l01 * l10
    i00, i01, i10, i11 = l11 / det, -l01 / det, -l10 / det, l00 / det
    half_w, half_h = width / 2.0, height / 2.0
    out = np.empty((2, 3))
    out[0, 0] = i00
    out[0, 1] = i01 * half_h / half_w
    out[1, 0] = i10 * half_w / half_h
    out[1, 1] = i11
    sx, sy = v[SHIFT_X] * width, v[SHIFT_Y] * height
    out[0, 2] = -(i00 * sx + i01 * sy) / half_w
    out[1, 2] = -(i10 * sx + i11 * sy) / half_h
    return out


@numba.njit(cache=True)
def _values_matrix(v: np.ndarray, height: int, width: int) -> np.ndarray:
    """The ``(2, 3)`` output -> input matrix of one transform's slot values: its flip (``flip_affine``), then its
    whole-pixel shift (``shift_affine``), then its crop window (``crop_affine``), then its affine
    (``affine_matrix``); slots at their identity values contribute the identity exactly, so each built-in
    transform gets its own matrix."""
    flip = np.zeros((2, 3))
    flip[0, 0] = 1.0 - 2.0 * v[FLIP_X]
    flip[1, 1] = 1.0 - 2.0 * v[FLIP_Y]
    shift = np.zeros((2, 3))
    shift[0, 0] = 1.0
    shift[1, 1] = 1.0
    shift[0, 2] = v[PIXEL_SHIFT_X] * (2.0 / width)
    shift[1, 2] = v[PIXEL_SHIFT_Y] * (2.0 / height)
    crop = np.zeros((2, 3))
    crop[0, 0] = v[SIZE_X]
    crop[1, 1] = v[SIZE_Y]
    crop[0, 2] = v[CENTER_X]
    crop[1, 2] = v[CENTER_Y]
    return _compose(_compose(_compose(flip, shift), crop), _affine(v, height, width))


@numba.njit(cache=True)
def chain_params(u: np.ndarray, spec: np.ndarray, src_height: int, src_width: int, out_height: int, out_width: int,
                 pixel_aspect: bool, include_original: bool, theta: np.ndarray, photo: np.ndarray,
                 pixels: np.ndarray) -> None:
    """Parameters of ``M`` copies of one ``src_height x src_width`` image warped to ``out_height x out_width``.

    The chain's matrices multiply in chain order (``compose_affine``: the first transform is applied to
    the source first). A transform with a crop window (``WINDOW`` draw) picks a region of the frame it
    receives and resizes it to the output frame, so transforms up to it have the source's size (for the
    pixel-true angles of ``affine_matrix``) and those after it the output's. With ``pixel_aspect`` the
    windows' aspect ratios are in pixels of the source, as torchvision's ``RandomResizedCrop``: the log
    aspect is shifted by ``log(src_height / src_width)`` (see :func:`_draw`).

    Args:
        u: ``(M, P)`` uniforms in ``[0, 1)``, ``P`` = the count :func:`encode_augment` returned.
        spec: ``(D, 7)`` the encoded chain.
        src_height, src_width: the source image's size.
        out_height, out_width: the copies' size.
        pixel_aspect: windows draw pixel aspect ratios of the source (else frame fractions).
        include_original: copy 0 is the whole source (identity: the source resized to the output size), factors 1.
        theta: out ``(M, 2, 3)`` output -> source matrices, normalised (``affine_grid``, align_corners=False).
        photo: out ``(M, 3)`` brightness, contrast, contrast pivot (``MEAN_PIVOT``: the copy's mean).
        pixels: out ``(M, 2, 3)`` the same matrices in pixel coordinates, output pixel -> source pixel (DALI's
            ``warp_affine`` with ``inverse_map``): ``D_src theta D_out^-1`` with ``D = [[W/2, 0, W/2], [0, H/2, H/2]]``.
    """
    m = u.shape[0]
    values = np.empty(NUM_SLOTS)
    shift = math.log(src_height / src_width) if pixel_aspect else 0.0
    for j in range(m):
        mat = np.zeros((2, 3))
        mat[0, 0] = 1.0
        mat[1, 1] = 1.0
        b, c, center = 1.0, 1.0, MEAN_PIVOT
        height, width = src_height, src_width
        if not (include_original and j == 0):
            r, k = 0, 0
            while r < spec.shape[0]:
                first = r
                r, k = _transform_values(spec, r, u[j], k, values, shift)
                mat = _compose(mat, _values_matrix(values, height, width))
                for q in range(first, r):
                    if spec[q, 1] == WINDOW:
                        height, width = out_height, out_width
                b *= values[BRIGHTNESS]
                c *= values[CONTRAST]
                if values[PIVOT] > MEAN_PIVOT:
                    center = values[PIVOT]
        for r in range(2):
            for q in range(3):
                theta[j, r, q] = mat[r, q]
        photo[j, 0] = b
        photo[j, 1] = c
        photo[j, 2] = center
    pixel_matrices(theta, src_height, src_width, out_height, out_width, pixels)


@numba.njit(cache=True)
def pixel_matrices(theta: np.ndarray, src_height: int, src_width: int, out_height: int, out_width: int,
                   pixels: np.ndarray) -> None:
    """``(M, 2, 3)`` normalised output -> source matrices as pixel matrices, output pixel -> source pixel (DALI's
    ``warp_affine`` with ``inverse_map``): ``D_src theta D_out^-1`` with ``D = [[W/2, 0, W/2], [0, H/2, H/2]]``."""
    hs, ws = src_height / 2.0, src_width / 2.0
    for j in range(theta.shape[0]):
        mat = theta[j]
        pixels[j, 0, 0] = mat[0, 0] * src_width / out_width
        pixels[j, 0, 1] = mat[0, 1] * src_width / out_height
        pixels[j, 1, 0] = mat[1, 0] * src_height / out_width
        pixels[j, 1, 1] = mat[1, 1] * src_height / out_height
        pixels[j, 0, 2] = ws * (mat[0, 2] + 1.0 - mat[0, 0] - mat[0, 1])
        pixels[j, 1, 2] = hs * (mat[1, 2] + 1.0 - mat[1, 0] - mat[1, 1])


@numba.njit(cache=True)
def compose_copies(crop: np.ndarray, rest: np.ndarray, theta: np.ndarray) -> None:
    """``theta[j] = crop[j] o rest[j]`` (``(M, 2, 3)`` each): a copy's whole output -> source matrix from its crop
    (crop frame -> source) and its rest (output -> crop frame)."""
    for j in range(theta.shape[0]):
        theta[j] = _compose(crop[j], rest[j])


@numba.njit(cache=True)
def crop_rest_params(u: np.ndarray, spec: np.ndarray, rows: int, uniforms: int, src_height: int, src_width: int,
                     out_height: int, out_width: int, pixel_aspect: bool, include_original: bool, crop: np.ndarray,
                     rest: np.ndarray, photo: np.ndarray, rest_pixels: np.ndarray) -> None:
    """The two parts of ``M`` copies of a chain split by :func:`crop_split`: the crop (``spec[:rows]`` from
    ``u[:, :uniforms]``, source -> output size) and the rest (the other rows and uniforms, at the output
    size). ``compose_copies(crop, rest)`` is what :func:`chain_params` gives for the whole chain.

    Args:
        u, spec, src_height, src_width, out_height, out_width, pixel_aspect, include_original: as
            :func:`chain_params` (copy 0 with ``include_original``: both parts the identity).
        rows, uniforms: where the chain splits (:func:`crop_split`).
        crop: out ``(M, 2, 3)`` normalised crop-frame -> source matrices (axis-aligned).
        rest: out ``(M, 2, 3)`` normalised output -> crop-frame matrices.
        photo: out ``(M, 3)`` the copies' brightness, contrast and pivot (the parts' factors multiplied, the
            last fixed pivot), as :func:`chain_params`.
        rest_pixels: out ``(M, 2, 3)`` ``rest`` in pixel coordinates of the output frame.
    """
    m = u.shape[0]
    crop_photo = np.empty((m, 3))
    crop_pixels = np.empty((m, 2, 3))
    chain_params(u[:, :uniforms], spec[:rows], src_height, src_width, out_height, out_width, pixel_aspect,
                 include_original, crop, crop_photo, crop_pixels)
    chain_params(u[:, uniforms:], spec[rows:], out_height, out_width, out_height, out_width, False, include_original,
                 rest, photo, rest_pixels)
    for j in range(m):
        photo[j, 0] *= crop_photo[j, 0]
        photo[j, 1] *= crop_photo[j, 1]
        if photo[j, 2] <= MEAN_PIVOT:
            photo[j, 2] = crop_photo[j, 2]


@numba.njit(cache=True)
def augment_params(u: np.ndarray, spec: np.ndarray, height: int, width: int, include_original: bool,
                   theta: np.ndarray, photo: np.ndarray, pixels: np.ndarray) -> None:
    """Parameters of ``M`` copies at the image's own size: :func:`chain_params` with the output frame equal to the
    source's and windows in frame fractions (``RandomResizedCrop`` without ``size``).

    Args:
        u: ``(M, P)`` uniforms in ``[0, 1)``, ``P`` = the count :func:`encode_augment` returned.
        spec: ``(D, 7)`` the encoded chain.
        height, width: image size.
        include_original: copy 0 is the untouched image (identity, factors 1).
        theta: out ``(M, 2, 3)`` output -> input matrices, normalised (``affine_grid``, align_corners=False).
        photo: out ``(M, 3)`` brightness, contrast, contrast pivot (``MEAN_PIVOT``: the copy's mean).
        pixels: out ``(M, 2, 3)`` the same matrices in pixel coordinates (``affine_to_pixels``: DALI's).
    """
    chain_params(u, spec, height, width, height, width, False, include_original, theta, photo, pixels)


@numba.njit(cache=True)
def _mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finaliser."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def counter_uniforms(seed: int, epoch: int, index: int, out: np.ndarray) -> None:
    """Fill ``out`` (any shape, float64) with uniforms in ``[0, 1)`` that depend only on
    ``(seed, epoch, index)`` and the position: a counter-based generator (splitmix64), no global state,
    so the loader's workers and the adapter's Python side compute the same values."""
    flat = out.reshape(-1)
    key = _mix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch))
    key = _mix64(key ^ (np.uint64(index) * np.uint64(0xD1B54A32D192ED03)))
    for i in range(flat.shape[0]):
        z = _mix64(key + np.uint64(i + 1) * np.uint64(0x9E3779B97F4A7C15))
        flat[i] = (z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True)
def warp_u8(src: np.ndarray, theta: np.ndarray, dst: np.ndarray) -> None:
    """``warp`` of one ``(H, W, C)`` uint8 image into ``dst`` ``(H_out, W_out, C)`` (bilinear, zeros outside,
    ``align_corners=False``: output pixel centre ``((2j + 1) / W_out - 1, (2i + 1) / H_out - 1)`` maps through
    ``theta`` to a normalised source point, read at pixel ``((x + 1) W - 1) / 2``), rounded."""
    height, width, channels = src.shape
    out_height, out_width = dst.shape[0], dst.shape[1]
    acc = np.zeros(channels)
    for i in range(out_height):
        yn = (2.0 * i + 1.0) / out_height - 1.0
        for j in range(out_width):
            xn = (2.0 * j + 1.0) / out_width - 1.0
            gx = theta[0, 0] * xn + theta[0, 1] * yn + theta[0, 2]
            gy = theta[1, 0] * xn + theta[1, 1] * yn + theta[1, 2]
            ix = ((gx + 1.0) * width - 1.0) / 2.0
            iy = ((gy + 1.0) * height - 1.0) / 2.0
            x0 = math.floor(ix)
            y0 = math.floor(iy)
            fx = ix - x0
            fy = iy - y0
            acc[:] = 0.0
            for dy in range(2):
                yy = int(y0) + dy
                if yy < 0 or yy >= height:
                    continue
                wy = fy if dy else 1.0 - fy
                for dx in range(2):
                    xx = int(x0) + dx
                    if xx < 0 or xx >= width:
                        continue
                    wgt = wy * (fx if dx else 1.0 - fx)
                    for ch in range(channels):
                        acc[ch] += wgt * src[yy, xx, ch]
            for ch in range(channels):
                dst[i, j, ch] = np.uint8(min(255.0, max(0.0, np.rint(acc[ch]))))


@numba.njit(cache=True)
def colour_u8(img: np.ndarray, brightness: float, contrast: float, center: float) -> None:
    """``brightness_contrast`` in place on one uint8 image; ``center`` ``MEAN_PIVOT`` pivots on the image's mean."""
    flat = img.reshape(-1)
    pivot = center
    if pivot <= MEAN_PIVOT:
        pivot = 0.0
        for i in range(flat.shape[0]):
            pivot += flat[i]
        pivot /= max(flat.shape[0], 1)
    for i in range(flat.shape[0]):
        v = brightness * (pivot + contrast * (flat[i] - pivot))
        flat[i] = np.uint8(min(255.0, max(0.0, np.rint(v))))


@numba.njit(cache=True)
def replicate_sample(src: np.ndarray, theta: np.ndarray, photo: np.ndarray, dst: np.ndarray) -> None:
    """``M`` augmented copies of one ``(H, W, C)`` uint8 image into ``dst`` ``(M, H_out, W_out, C)``: one warp per
    copy (skipped for an identity matrix at the same size), then the colour change (skipped for factors 1)."""
    same = dst.shape[1] == src.shape[0] and dst.shape[2] == src.shape[1]
    for j in range(dst.shape[0]):
        t = theta[j]
        if same and t[0, 0] == 1.0 and t[0, 1] == 0.0 and t[0, 2] == 0.0 and t[1, 0] == 0.0 and t[1, 1] == 1.0 \
                and t[1, 2] == 0.0:
            dst[j] = src
        else:
            warp_u8(src, t, dst[j])
        if photo[j, 0] != 1.0 or photo[j, 1] != 1.0:
            colour_u8(dst[j], photo[j, 0], photo[j, 1], photo[j, 2])


@intrinsic
def load_int64(typingctx, address):  # noqa: ANN001, ANN201 - numba's intrinsic protocol
    """Compiled code: the int64 stored at ``address`` (an integer: ``array.ctypes.data`` of an int64 array that
    outlives the compiled function). Lets a compiled FFCV operation read a value its Python owner changes
    between calls (the epoch of its draws) without an object-mode block or a module-level registry."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(pointer)
    return types.int64(address), codegen


@numba.njit(cache=True)
def _pixel_edges(scale: float, shift: float, size: int) -> tuple[int, int]:
    """The whole-pixel span ``[start, end)`` of a window along one axis of ``size`` pixels: the window of the
    normalised map ``x_in = scale x_out + shift`` covers ``[shift - |scale|, shift + |scale|]``, i.e. pixel edges
    ``(shift -+ |scale| + 1) size / 2``, each rounded to the nearest edge (at least one pixel, inside the axis)."""
    half = abs(scale)
    start = int(math.floor((shift - half + 1.0) * size / 2.0 + 0.5))
    end = int(math.floor((shift + half + 1.0) * size / 2.0 + 0.5))
    start = min(max(start, 0), size - 1)
    return start, min(max(end, start + 1), size)


@numba.njit(cache=True)
def snap_windows(theta: np.ndarray, height: int, width: int, windows: np.ndarray) -> None:
    """Round the windows of ``M`` axis-aligned copies (``theta`` ``(M, 2, 3)``, flips and crop windows only) of a
    ``height x width`` source to whole source pixels, in place, and write them to ``windows`` ``(M, 4)`` as
    ``[row start, row end, column start, column end]``: the one rounding of a random-resized crop, shared by
    FFCV's decoder (its resize reads integer windows) and the image-folder dataset.

    A span ``[a, b)`` of ``n`` pixels is the normalised ``scale = +-(b - a) / n`` (the sign keeps the flip),
    ``shift = (a + b) / n - 1``; edges move by at most half a pixel.
    """
    for j in range(theta.shape[0]):
        r0, r1 = _pixel_edges(theta[j, 1, 1], theta[j, 1, 2], height)
        c0, c1 = _pixel_edges(theta[j, 0, 0], theta[j, 0, 2], width)
        windows[j, 0], windows[j, 1], windows[j, 2], windows[j, 3] = r0, r1, c0, c1
        theta[j, 0, 0] = math.copysign((c1 - c0) / width, theta[j, 0, 0])
        theta[j, 0, 2] = (c0 + c1) / width - 1.0
        theta[j, 1, 1] = math.copysign((r1 - r0) / height, theta[j, 1, 1])
        theta[j, 1, 2] = (r0 + r1) / height - 1.0


@numba.njit(cache=True)
def copy_geometry(u: np.ndarray, spec: np.ndarray, rows: int, uniforms: int, height: int, width: int, out_h: int,
                  out_w: int, pixel_aspect: bool, include_original: bool, snap: bool, theta: np.ndarray,
                  photo: np.ndarray, crop: np.ndarray, rest: np.ndarray, windows: np.ndarray) -> None:
    """The parameters of ``M`` copies of one ``height x width`` image from their ``(M, P)`` uniforms, as FFCV's
    decoder makes them and its wrapper records them (one function, so the two cannot drift apart).

    ``rows == 0``: the whole chain at once (:func:`chain_params` into ``theta``; with ``snap`` its windows are
    rounded to whole source pixels, :func:`snap_windows`, into ``windows`` ``(M, 4)``). ``rows > 0``: the chain
    split by :func:`crop_split` into its crop (``crop``, snapped with ``snap``) and the rest at the output size
    (``rest``), ``theta`` the two composed. ``photo`` gets the colour factors (``(M, 3)``).
    """
    pixels = np.empty((u.shape[0], 2, 3))
    if rows > 0:
        crop_rest_params(u, spec, rows, uniforms, height, width, out_h, out_w, pixel_aspect, include_original, crop,
                         rest, photo, pixels)
        if snap:
            snap_windows(crop, height, width, windows)
        compose_copies(crop, rest, theta)
    else:
        chain_params(u, spec, height, width, out_h, out_w, pixel_aspect, include_original, theta, photo, pixels)
        if snap:
            snap_windows(theta, height, width, windows)


@numba.njit(cache=True)
def copy_params(seed: int, epoch: int, indices: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                spec: np.ndarray, count: int, m: int, out_h: int, out_w: int, pixel_aspect: bool,
                include_original: bool, snap: bool, rows: int = 0,
                uniforms: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(S, M, 2, 3)`` normalised output -> source matrices, ``(S, M, 3)`` colour factors and ``(S, M, 4)`` int64
    whole-pixel windows (of the crop part when ``rows > 0``) of the copies of samples ``indices`` whose sizes
    are ``heights``, ``widths``: :func:`counter_uniforms` keyed by ``(seed, epoch, index)``, then
    :func:`copy_geometry` per sample; ``snap``: the windows rounded to whole source pixels (else zeros)."""
    s = indices.shape[0]
    theta = np.empty((s, m, 2, 3))
    photo = np.empty((s, m, 3))
    windows = np.zeros((s, m, 4), dtype=np.int64)
    crop = np.empty((m, 2, 3))
    rest = np.empty((m, 2, 3))
    u = np.empty((m, max(count, 1)))
    for i in range(s):
        counter_uniforms(seed, epoch, indices[i], u)
        copy_geometry(u, spec, rows, uniforms, heights[i], widths[i], out_h, out_w, pixel_aspect, include_original,
                      snap, theta[i], photo[i], crop, rest, windows[i])
    return theta, photo, windows


@numba.njit(cache=True)
def _compiled_layout() -> np.ndarray:
    return _LAYOUT.copy()


def _refresh_stale_cache() -> None:
    """Recompile every kernel here when its on-disk cache was compiled against another table layout.

    numba freezes globals such as the slot numbers into the compiled code and keys its cache by this file
    alone, so after a change to the constants of :mod:`regpipe.functional.augment` the cached kernels
    would still read the old layout. Called by :func:`encode_augment` (the first step of every use of these
    kernels), so importing this module compiles nothing. (Callers in other files embed these kernels in their
    own compiled code; they are not cached for the same reason.)
    """
    if np.array_equal(_compiled_layout(), _LAYOUT):
        return
    for kernel in [value for value in globals().values() if isinstance(value, numba.core.dispatcher.Dispatcher)]:
        kernel.recompile()
