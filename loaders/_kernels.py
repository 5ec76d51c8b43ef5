"""numba kernels shared by the DALI and FFCV adapters: an augmentation chain's parameters from uniforms,
the uint8 warp and colour change, counter-based uniforms, and the CPU sum mix.

The chain is a regpipe :class:`~regpipe.ops.augment.Augment` encoded once by :func:`encode_augment`
into a ``(T, 8)`` float64 table (one row per transform, its kind and hyper-parameters), so the same
spec drives the torch ops, the DALI pipeline and the FFCV operation. The formulas mirror
:mod:`regpipe.functional.augment` (``flip_affine``, ``crop_affine``, ``affine_matrix``,
``compose_affine``, ``warp`` with ``align_corners=False`` and zero padding, ``brightness_contrast``);
``tests/test_dali.py`` and ``tests/test_ffcv.py`` check them against those torch functions.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from regpipe.ops.augment import Augment, RandomAffine, RandomBrightnessContrast, RandomFlip, RandomResizedCrop

__all__ = ["MEAN_PIVOT", "FLIP", "CROP", "AFFINE", "COLOUR", "UNIFORMS", "encode_augment", "augment_params",
           "counter_uniforms", "replicate_sample", "mix_rows", "warp_u8", "colour_u8"]

FLIP, CROP, AFFINE, COLOUR = 0, 1, 2, 3
#: uniforms each transform kind consumes per copy (crop: 10 tries of area and ratio, then the centre)
UNIFORMS = {FLIP: 2, CROP: 22, AFFINE: 6, COLOUR: 2}
_CROP_TRIES = 10
#: the colour pivot meaning "each copy's mean" (not NaN: FFCV compiles with fastmath, which folds NaN tests)
MEAN_PIVOT = -1.0e30


def encode_augment(augment: Augment) -> tuple[np.ndarray, int]:
    """An :class:`Augment` chain as a ``(T, 8)`` float64 table and the number of uniforms one copy consumes.

    Row layout (unused slots 0): flip ``[0, p_h, p_v]``; crop ``[1, scale_lo, scale_hi, log_ratio_lo,
    log_ratio_hi]``; affine ``[2, degrees, tx, ty, scale_lo, scale_hi, shear_x, shear_y]``; colour ``[3,
    b_lo, b_hi, c_lo, c_hi, center]`` (center :data:`MEAN_PIVOT`: each copy's mean).

    Raises:
        TypeError: ``augment`` is not an :class:`Augment`, or holds a transform the loaders cannot run
            (named).
    """
    if not isinstance(augment, Augment):
        raise TypeError(f"augment must be a regpipe Augment chain, got {type(augment).__name__}")
    rows = []
    for t in augment.transforms:
        if isinstance(t, RandomFlip):
            rows.append([FLIP, t.horizontal, t.vertical, 0, 0, 0, 0, 0])
        elif isinstance(t, RandomResizedCrop):
            rows.append([CROP, t.scale[0], t.scale[1], math.log(t.ratio[0]), math.log(t.ratio[1]), 0, 0, 0])
        elif isinstance(t, RandomAffine):
            rows.append([AFFINE, t.degrees, t.translate[0], t.translate[1], t.scale[0], t.scale[1],
                         t.shear[0], t.shear[1]])
        elif isinstance(t, RandomBrightnessContrast):
            center = MEAN_PIVOT if t.center is None else float(t.center)
            rows.append([COLOUR, t.brightness[0], t.brightness[1], t.contrast[0], t.contrast[1], center, 0, 0])
        else:
            raise TypeError(f"the DALI/FFCV adapters cannot run transform {type(t).__name__}; supported: "
                            "RandomFlip, RandomResizedCrop, RandomAffine, RandomBrightnessContrast")
    if sum(1 for r in rows if r[0] == COLOUR) > 1:
        raise ValueError("the DALI/FFCV adapters apply one colour transform per chain; merge the "
                         f"{sum(1 for r in rows if r[0] == COLOUR)} RandomBrightnessContrast transforms into one")
    spec = np.asarray(rows, dtype=np.float64).reshape(-1, 8)
    return spec, int(sum(UNIFORMS[int(k)] for k in spec[:, 0]))


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
def _affine(u: np.ndarray, p: np.ndarray, height: int, width: int) -> np.ndarray:
    """``affine_matrix`` from 6 uniforms: angle, tx, ty, scale, shear x, shear y (output -> input, normalised)."""
    angle = u[0] * 2.0 * p[1] - p[1]
    tx = u[1] * 2.0 * p[2] - p[2]
    ty = u[2] * 2.0 * p[3] - p[3]
    scale = u[3] * (p[5] - p[4]) + p[4]
    shx = u[4] * 2.0 * p[6] - p[6]
    shy = u[5] * 2.0 * p[7] - p[7]
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    hx, hy = math.tan(math.radians(shx)), math.tan(math.radians(shy))
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
    sx, sy = tx * width, ty * height
    out[0, 2] = -(i00 * sx + i01 * sy) / half_w
    out[1, 2] = -(i10 * sx + i11 * sy) / half_h
    return out


@numba.njit(cache=True)
def _crop(u: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``RandomResizedCrop.sample`` + ``crop_affine`` from 22 uniforms (10 areas, 10 log-ratios, centre x, y)."""
    w, h = 1.0, 1.0
    for t in range(_CROP_TRIES):
        area = u[t] * (p[2] - p[1]) + p[1]
        aspect = math.exp(u[_CROP_TRIES + t] * (p[4] - p[3]) + p[3])
        tw, th = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if tw <= 1.0 and th <= 1.0:
            w, h = tw, th
            break
    out = np.zeros((2, 3))
    out[0, 0] = w
    out[1, 1] = h
    out[0, 2] = (u[20] * 2.0 - 1.0) * (1.0 - w)
    out[1, 2] = (u[21] * 2.0 - 1.0) * (1.0 - h)
    return out


@numba.njit(cache=True)
def augment_params(u: np.ndarray, spec: np.ndarray, height: int, width: int, include_original: bool,
                   theta: np.ndarray, photo: np.ndarray, pixels: np.ndarray) -> None:
    """Parameters of ``M`` copies from their uniforms.

    Args:
        u: ``(M, P)`` uniforms in ``[0, 1)``, ``P`` = the count :func:`encode_augment` returned.
        spec: ``(T, 8)`` the encoded chain.
        height, width: image size.
        include_original: copy 0 is the untouched image (identity, factors 1).
        theta: out ``(M, 2, 3)`` output -> input matrices, normalised (``affine_grid``, align_corners=False).
        photo: out ``(M, 3)`` brightness, contrast, contrast pivot (``MEAN_PIVOT``: the copy's mean).
        pixels: out ``(M, 2, 3)`` the same matrices in pixel coordinates (``affine_to_pixels``: DALI's).
    """
    m = u.shape[0]
    for j in range(m):
        mat = np.zeros((2, 3))
        mat[0, 0] = 1.0
        mat[1, 1] = 1.0
        b, c, center = 1.0, 1.0, MEAN_PIVOT
        if not (include_original and j == 0):
            k = 0
            for t in range(spec.shape[0]):
                kind = int(spec[t, 0])
                p = spec[t]
                if kind == FLIP:
                    f = np.zeros((2, 3))
                    f[0, 0] = -1.0 if u[j, k] < p[1] else 1.0
                    f[1, 1] = -1.0 if u[j, k + 1] < p[2] else 1.0
                    mat = _compose(mat, f)
                    k += 2
                elif kind == CROP:
                    mat = _compose(mat, _crop(u[j, k:k + 22], p))
                    k += 22
                elif kind == AFFINE:
                    mat = _compose(mat, _affine(u[j, k:k + 6], p, height, width))
                    k += 6
                else:
                    b *= u[j, k] * (p[2] - p[1]) + p[1]
                    c *= u[j, k + 1] * (p[4] - p[3]) + p[3]
                    center = p[5]
                    k += 2
        for r in range(2):
            for q in range(3):
                theta[j, r, q] = mat[r, q]
        # pixels = D theta D^-1 with D = [[W/2, 0, W/2], [0, H/2, H/2]]
        hw, hh = width / 2.0, height / 2.0
        pixels[j, 0, 0] = mat[0, 0]
        pixels[j, 0, 1] = mat[0, 1] * hw / hh
        pixels[j, 1, 0] = mat[1, 0] * hh / hw
        pixels[j, 1, 1] = mat[1, 1]
        pixels[j, 0, 2] = hw * (mat[0, 2] + 1.0 - mat[0, 0] - mat[0, 1])
        pixels[j, 1, 2] = hh * (mat[1, 2] + 1.0 - mat[1, 0] - mat[1, 1])
        photo[j, 0] = b
        photo[j, 1] = c
        photo[j, 2] = center


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
    """``warp`` of one ``(H, W, C)`` uint8 image (bilinear, zeros outside, ``align_corners=False``), rounded."""
    height, width, channels = src.shape
    acc = np.zeros(channels)
    for i in range(height):
        yn = (2.0 * i + 1.0) / height - 1.0
        for j in range(width):
            xn = (2.0 * j + 1.0) / width - 1.0
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
    """``M`` augmented copies of one ``(H, W, C)`` uint8 image into ``dst`` ``(M, H, W, C)``: one warp per copy
    (skipped for an identity matrix), then the colour change (skipped for factors 1)."""
    for j in range(dst.shape[0]):
        t = theta[j]
        if t[0, 0] == 1.0 and t[0, 1] == 0.0 and t[0, 2] == 0.0 and t[1, 0] == 0.0 and t[1, 1] == 1.0 \
                and t[1, 2] == 0.0:
            dst[j] = src
        else:
            warp_u8(src, t, dst[j])
        if photo[j, 0] != 1.0 or photo[j, 1] != 1.0:
            colour_u8(dst[j], photo[j, 0], photo[j, 1], photo[j, 2])


@numba.njit(cache=True)
def mix_rows(images: np.ndarray, sources: np.ndarray, weights: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = sum_g weights[g] * images[sources[i, g]]`` (float32), skipping zero weights (SPEC 1.1/1.3).

    Args:
        images: ``(N, ...)`` uint8 or float rows.
        sources: ``(N_out, k)`` int64 row indices.
        weights: ``(k,)`` float64.
        out: ``(N_out, ...)`` float32.
    """
    for i in range(out.shape[0]):
        row = out[i].reshape(-1)
        row[:] = 0.0
        for g in range(sources.shape[1]):
            w = weights[g]
            if w == 0.0:
                continue
            src = images[sources[i, g]].reshape(-1)
            for q in range(row.shape[0]):
                row[q] += w * src[q]
