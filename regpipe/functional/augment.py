"""Batch-level image augmentations with recorded, invertible parameters (SPEC 3.1).

Geometric transforms are 2x3 affine matrices ``theta`` in the ``torch.nn.functional.affine_grid``
convention: they map *output* coordinates to *input* coordinates, both normalised to ``[-1, 1]``
with ``align_corners=False`` (``-1`` and ``1`` are the outer edges of the border pixels). Building a
transform is separate from applying it, so a chain of geometric ops multiplies its matrices and
warps once (:func:`compose_affine`, :func:`warp`), and :func:`inverse_warp` undoes it.

Conventions of the matrix builders, per row (all tensors ``(N,)`` or ``(N, 2)``, float):

- :func:`flip_affine`: ``x -> -x`` (horizontal) and/or ``y -> -y`` (vertical); samples land on pixel centres.
- :func:`crop_affine`: the output shows the input window of relative size ``(w, h)`` (fractions of
  the width and height) centred at ``(cx, cy)`` (normalised), resized to the full frame.
- :func:`affine_matrix`: the *forward* map rotates by ``angle`` degrees (counter-clockwise on
  screen), shears by ``shear`` degrees ``(x, y)``, scales by ``scale`` and translates by
  ``translate`` (fractions of width and height), about the image centre and in pixel units, so a
  rotation stays a rotation on non-square images; the matrix returned is its inverse (output ->
  input), ready for :func:`warp`.

DALI and other libraries state matrices in pixel coordinates; :func:`affine_from_pixels` and
:func:`affine_to_pixels` convert (pixel centres at ``i + 0.5``, origin at the top-left corner).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "affine_from_pixels",
    "affine_matrix",
    "affine_to_pixels",
    "brightness_contrast",
    "compose_affine",
    "crop_affine",
    "flip_affine",
    "invert_affine",
    "inverse_warp",
    "valid_mask",
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


def crop_affine(size: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` crop-and-resize: show the window of relative size ``size[:, 0]`` x ``size[:, 1]``
    (fractions of width and height, in ``(0, 1]`` for a crop, ``> 1`` zooms out) centred at ``center``
    (normalised ``(x, y)``) over the whole output frame."""
    if size.dim() != 2 or size.shape[1] != 2 or center.shape != size.shape:
        raise ValueError(f"size and center must both be (N, 2), got {tuple(size.shape)} and {tuple(center.shape)}")
    if bool((size <= 0).any()):
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
    if bool((scale <= 0).any()):
        raise ValueError(f"scale must be > 0, got minimum {float(scale.min())}")
    a = torch.deg2rad(angle.double())
    # Forward map in centred pixel units (y down, so a screen-counter-clockwise rotation uses -a).
    rot = torch.stack([torch.stack([a.cos(), a.sin()], -1), torch.stack([-a.sin(), a.cos()], -1)], 1)
    sh = torch.deg2rad(shear.double()).tan()
    shear_m = torch.stack([torch.stack([torch.ones_like(a), sh[:, 0]], -1),
                           torch.stack([sh[:, 1], torch.ones_like(a)], -1)], 1)
    linear = rot @ shear_m * scale.double().view(n, 1, 1)
    half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64, device=angle.device)
    # Normalised <-> centred pixels is a diagonal scaling D = diag(W/2, H/2): theta = D^-1 M^-1 D, shift -D^-1 M^-1 t.
    inv = torch.linalg.inv(linear)
    lin_norm = inv * half.view(1, 1, 2) / half.view(1, 2, 1)
    shift_px = translate.double() * half * 2.0
    shift_norm = -(inv @ shift_px.unsqueeze(-1)).squeeze(-1) / half
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
        pivot = torch.tensor(float(center), dtype=work.dtype, device=work.device)
    out = b * (pivot + c * (work - pivot))
    if x.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out

