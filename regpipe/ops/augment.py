"""Batch-level augmentations that remember what they did, and in-batch replication (SPEC 3.1).

Each transform samples typed parameters from a ``torch.Generator`` (``sample``) and turns them into
what :mod:`regpipe.functional.augment` applies: geometric transforms give a 2x3 matrix per row
(``matrix``), photometric ones brightness/contrast factors. :class:`Augment` chains transforms:
it multiplies the matrices and warps once, then applies the colour change, and records the
composed matrix in ``Batch.affine`` and the colour factors in ``Batch.photometric`` so the chain can
be inverted (:meth:`Augment.inverse`). :class:`Replicate` turns ``S`` seeds into ``S * m`` rows.

Example:
    >>> import torch
    >>> from regpipe import Batch
    >>> from regpipe.ops.augment import Augment, RandomAffine, RandomFlip, Replicate
    >>> seeds = Batch.from_labels(torch.rand(4, 3, 16, 16), torch.arange(4), num_classes=4)
    >>> batch = Replicate(3, Augment([RandomFlip(), RandomAffine(degrees=15)], seed=0))(seeds)
    >>> batch.inputs.shape, batch.source_ids.tolist()
    (torch.Size([12, 3, 16, 16]), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    >>> bool((batch.affine[0::3] == torch.eye(2, 3)).all())  # the first copy of each seed is the original
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from regpipe.batch import Batch
from regpipe.functional.augment import (
    affine_matrix,
    brightness_contrast,
    compose_affine,
    crop_affine,
    flip_affine,
    inverse_warp,
    warp,
)
from regpipe.rng import DeviceGenerator

__all__ = [
    "AffineParams",
    "Augment",
    "ColourParams",
    "CropParams",
    "FlipParams",
    "RandomAffine",
    "RandomBrightnessContrast",
    "RandomFlip",
    "RandomResizedCrop",
    "Replicate",
]


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def _range(name: str, value: tuple[float, float], lowest: float | None = None) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low <= high or (lowest is not None and low < lowest):
        bound = f" and >= {lowest}" if lowest is not None else ""
        raise ValueError(f"{name} must be a (low, high) range with low <= high{bound}, got {value!r}")
    return low, high


@dataclass(frozen=True)
class FlipParams:
    """``horizontal``, ``vertical``: ``(N,)`` bool, True = that axis is flipped."""

    horizontal: torch.Tensor
    vertical: torch.Tensor


@dataclass(frozen=True)
class CropParams:
    """``size``: ``(N, 2)`` window (width, height) as fractions of the image; ``center``: ``(N, 2)`` normalised."""

    size: torch.Tensor
    center: torch.Tensor


@dataclass(frozen=True)
class AffineParams:
    """``angle`` ``(N,)`` degrees, ``scale`` ``(N,)``, ``translate`` ``(N, 2)`` fractions, ``shear`` ``(N, 2)`` degrees."""

    angle: torch.Tensor
    scale: torch.Tensor
    translate: torch.Tensor
    shear: torch.Tensor


@dataclass(frozen=True)
class ColourParams:
    """``brightness``, ``contrast``: ``(N,)`` multiplicative factors (1 = unchanged)."""

    brightness: torch.Tensor
    contrast: torch.Tensor


class Transform(Protocol):
    geometric: bool

    def sample(self, n: int, generator: torch.Generator) -> Any: ...


class RandomFlip:
    """Flip each row horizontally with probability ``horizontal`` and vertically with ``vertical``."""

    geometric = True

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.0) -> None:
        for name, p in (("horizontal", horizontal), ("vertical", vertical)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} flip probability must be in [0, 1], got {p}")
        self.horizontal, self.vertical = float(horizontal), float(vertical)

    def sample(self, n: int, generator: torch.Generator) -> FlipParams:
        return FlipParams(horizontal=_uniform(n, 0, 1, generator) < self.horizontal,
                          vertical=_uniform(n, 0, 1, generator) < self.vertical)

    def matrix(self, params: FlipParams, height: int, width: int) -> torch.Tensor:
        return flip_affine(params.horizontal, params.vertical)


class RandomResizedCrop:
    """torchvision's ``RandomResizedCrop`` at the batch's own size: a window of area ``scale`` (fraction of the
    image) and aspect ``ratio`` (log-uniform), placed uniformly inside the frame, resized to the frame.

    Windows are drawn as torchvision does, up to 10 tries per row; a row whose 10 tries all fall outside
    the frame keeps the whole image (torchvision falls back to a centre crop of the clamped ratio).
    """

    geometric = True

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.scale = _range("scale", scale, lowest=1e-6)
        self.ratio = _range("ratio", ratio, lowest=1e-6)
        if self.scale[1] > 1.0:
            raise ValueError(f"scale is a fraction of the image area, at most 1, got {scale!r}")

    def sample(self, n: int, generator: torch.Generator) -> CropParams:
        tries = 10
        area = _uniform(n * tries, *self.scale, generator).view(n, tries)
        log_ratio = _uniform(n * tries, math.log(self.ratio[0]), math.log(self.ratio[1]), generator).view(n, tries)
        aspect = log_ratio.exp()
        w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
        fits = (w <= 1.0) & (h <= 1.0)
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros_like(fits[:, 0], dtype=torch.long))
        pick = first.unsqueeze(1)
        size = torch.stack([w.gather(1, pick), h.gather(1, pick)], -1).squeeze(1)
        size = torch.where(fits.any(1, keepdim=True), size, torch.ones_like(size))
        center = (_uniform(2 * n, -1, 1, generator).view(n, 2)) * (1.0 - size)
        return CropParams(size=size, center=center)

    def matrix(self, params: CropParams, height: int, width: int) -> torch.Tensor:
        return crop_affine(params.size, params.center)


class RandomAffine:
    """Random rotation (``degrees``: max absolute angle), translation (``translate``: max fraction of width and
    height), scale (``scale`` range) and shear (``shear``: max absolute degrees along x and y), as
    torchvision's ``RandomAffine`` about the centre."""

    geometric = True

    def __init__(self, degrees: float = 0.0, translate: tuple[float, float] = (0.0, 0.0),
                 scale: tuple[float, float] = (1.0, 1.0), shear: tuple[float, float] = (0.0, 0.0)) -> None:
        if degrees < 0:
            raise ValueError(f"degrees is the maximum absolute angle, must be >= 0, got {degrees}")
        if any(not 0.0 <= t <= 1.0 for t in translate) or len(translate) != 2:
            raise ValueError(f"translate must be two fractions in [0, 1], got {translate!r}")
        if any(not 0.0 <= s < 90.0 for s in shear) or len(shear) != 2:
            raise ValueError(f"shear must be two angles in [0, 90) degrees, got {shear!r}")
        self.degrees = float(degrees)
        self.translate = tuple(float(t) for t in translate)
        self.scale = _range("scale", scale, lowest=1e-6)
        self.shear = tuple(float(s) for s in shear)

    def sample(self, n: int, generator: torch.Generator) -> AffineParams:
        angle = _uniform(n, -self.degrees, self.degrees, generator)
        tx, ty = self.translate
        translate = torch.stack([_uniform(n, -tx, tx, generator), _uniform(n, -ty, ty, generator)], -1)
        scale = _uniform(n, *self.scale, generator)
        sx, sy = self.shear
        shear = torch.stack([_uniform(n, -sx, sx, generator), _uniform(n, -sy, sy, generator)], -1)
        return AffineParams(angle=angle, scale=scale, translate=translate, shear=shear)

    def matrix(self, params: AffineParams, height: int, width: int) -> torch.Tensor:
        return affine_matrix(params.angle, params.scale, params.translate, params.shear, height, width)


class RandomBrightnessContrast:
    """Brightness and contrast factors drawn uniformly from ``brightness`` and ``contrast``; the contrast
    pivot is ``center`` (``None``: each image's mean)."""

    geometric = False

    def __init__(self, brightness: tuple[float, float] = (0.8, 1.2), contrast: tuple[float, float] = (0.8, 1.2),
                 center: float | None = None) -> None:
        self.brightness = _range("brightness", brightness, lowest=0.0)
        self.contrast = _range("contrast", contrast, lowest=0.0)
        self.center = center

    def sample(self, n: int, generator: torch.Generator) -> ColourParams:
        return ColourParams(brightness=_uniform(n, *self.brightness, generator),
                            contrast=_uniform(n, *self.contrast, generator))

    def apply(self, x: torch.Tensor, params: ColourParams) -> torch.Tensor:
        return brightness_contrast(x, params.brightness, params.contrast, self.center)


class Augment:
    """A chain of transforms applied to a :class:`Batch` with one warp.

    The geometric transforms' matrices are multiplied (in chain order) and applied by a single
    ``grid_sample``; photometric transforms follow, in order. The batch's ``affine`` becomes
    ``compose_affine(batch.affine, chain)`` (so it keeps mapping each row back to the loader's image)
    and ``photometric`` records the product of the brightness and contrast factors (exact for one
    photometric transform; for several it is the record of their combined scaling).

    Args:
        transforms: instances of :class:`RandomFlip`, :class:`RandomResizedCrop`, :class:`RandomAffine`,
            :class:`RandomBrightnessContrast` (or anything with ``geometric``, ``sample`` and ``matrix``
            or ``apply``).
        seed: seed of the op's generator (on the batch's device).
        padding_mode: ``grid_sample`` padding for pixels that come from outside the frame.
    """

    def __init__(self, transforms: Sequence[Transform], seed: int = 0, padding_mode: str = "zeros") -> None:
        self.transforms = list(transforms)
        if not self.transforms:
            raise ValueError("Augment needs at least one transform")
        for t in self.transforms:
            if not hasattr(t, "sample") or not hasattr(t, "geometric"):
                raise TypeError(f"{type(t).__name__} is not a transform (needs .geometric and .sample())")
        self.padding_mode = padding_mode
        self.rng = DeviceGenerator(seed)

    def sample(self, n: int, device: torch.device | str) -> list[Any]:
        """One parameter record per transform, for ``n`` rows."""
        generator = self.rng.get(device)
        return [t.sample(n, generator) for t in self.transforms]

    def matrix(self, params: Sequence[Any], height: int, width: int) -> torch.Tensor | None:
        """The composed ``(N, 2, 3)`` matrix of the geometric transforms, or ``None`` when there are none."""
        theta = None
        for t, p in zip(self.transforms, params):
            if t.geometric:
                m = t.matrix(p, height, width)
                theta = m if theta is None else compose_affine(theta, m)
        return theta

    def apply(self, batch: Batch, params: Sequence[Any]) -> Batch:
        """Apply the chain with the given parameters (``len(params) == len(transforms)``)."""
        if len(params) != len(self.transforms):
            raise ValueError(f"{len(params)} parameter records for {len(self.transforms)} transforms")
        x = batch.inputs
        height, width = x.shape[-2:]
        theta = self.matrix(params, height, width)
        affine = batch.affine
        if theta is not None:
            theta = theta.to(x.device)
            x = warp(x, theta, padding_mode=self.padding_mode)
            affine = compose_affine(batch.affine, theta.to(batch.affine.dtype))
        photometric = batch.photometric
        for t, p in zip(self.transforms, params):
            if not t.geometric:
                x = t.apply(x, p)
                factors = torch.stack([p.brightness, p.contrast], -1).to(x.device, torch.float32)
                photometric = factors if photometric is None else photometric * factors
        return batch.replace(inputs=x, affine=affine, photometric=photometric)

    def __call__(self, batch: Batch, params: Sequence[Any] | None = None) -> Batch:
        return self.apply(batch, self.sample(batch.size, batch.device) if params is None else params)

    @staticmethod
    def inverse(y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Warp ``y`` (``(N, C, H, W)``: the batch's images or anything in their frame, e.g. saliency maps)
        back to the frame of the loader's images with the batch's recorded affines."""
        return inverse_warp(y, batch.affine.to(y.device))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])


class Replicate:
    """In-batch augmentation replication (SPEC 3.1): ``S`` seeds -> ``S * m`` rows.

    Rows ``s*m .. s*m + m - 1`` are the copies of seed ``s`` (contiguous), each with independently drawn
    parameters; with ``include_original`` the first copy is the seed untouched (identity affine).
    ``source_ids`` are the seeds' ids, affines and photometric factors are recorded. Works on uint8
    or float input.

    Args:
        m: copies per seed, ``>= 1`` (``m = 1`` with ``include_original`` returns the batch unchanged).
        augment: the :class:`Augment` chain drawn per copy.
        include_original: keep each seed itself as its first copy.
    """

    def __init__(self, m: int, augment: Augment, include_original: bool = True) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (copies per seed) must be an integer >= 1, got {m!r}")
        if not isinstance(augment, Augment):
            raise TypeError(f"augment must be an Augment chain, got {type(augment).__name__}")
        self.m = m
        self.augment = augment
        self.include_original = include_original

    def __call__(self, batch: Batch) -> Batch:
        if batch.mixing is not None or batch.patchup is not None:
            raise ValueError("Replicate takes seed batches: apply it before mixing ops and PatchUp")
        s, m = batch.size, self.m
        extra = m - 1 if self.include_original else m
        if extra == 0:
            return batch
        copies = self.augment(batch.rows(torch.arange(s, device=batch.device).repeat_interleave(extra)))
        if not self.include_original:
            return copies
        photometric = copies.photometric
        if photometric is not None:
            originals = torch.ones(s, 2, device=photometric.device, dtype=photometric.dtype) \
                if batch.photometric is None else batch.photometric
            photometric = _interleave(originals, photometric, s)
        return Batch(inputs=_interleave(batch.inputs, copies.inputs, s),
                     targets=_interleave(batch.targets, copies.targets, s),
                     source_ids=_interleave(batch.source_ids, copies.source_ids, s),
                     affine=_interleave(batch.affine, copies.affine, s), photometric=photometric)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "include_original": self.include_original, "augment": self.augment.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = int(state["m"])
        self.include_original = bool(state["include_original"])
        self.augment.load_state_dict(state["augment"])


def _interleave(first: torch.Tensor, rest: torch.Tensor, s: int) -> torch.Tensor:
    """Rows ``[first[0], rest[0:e], first[1], rest[e:2e], ...]`` for ``S`` seeds: seed-contiguous output."""
    out = torch.cat([first.unsqueeze(1), rest.reshape(s, -1, *rest.shape[1:])], dim=1).flatten(0, 1)
    if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
