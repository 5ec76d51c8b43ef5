"""Batch-level augmentations that remember what they did, and in-batch replication.

Each transform is declared once: a *draw table* (:mod:`regpipe.functional.augment`) says how many
uniforms a row takes (``num_uniforms``) and which distribution fills which parameter, and
``from_uniforms`` turns ``(N, num_uniforms)`` uniforms into the transform's frozen parameter record.
``sample(n, generator)`` is ``from_uniforms`` of fresh uniforms; the DALI and FFCV adapters
(:mod:`regpipe.loaders`) draw their uniforms in their own workers and read the same table, so a
transform added here runs in every loader without another edit.

Geometric transforms turn their parameters into a 2x3 matrix per row (``matrix``), photometric ones
into brightness/contrast factors. :class:`Augment` chains transforms: it multiplies the matrices and
warps once, then applies the colour change, and records the composed matrix in ``Batch.affine`` and
the colour factors in ``Batch.photometric`` so the chain can be inverted (:meth:`Augment.inverse`).
:class:`Replicate` turns ``S`` seeds into ``S * m`` rows. Both follow the op contract
(:mod:`regpipe.core.op`): ``draw`` then ``apply``, and replaying the parameters replays the batch.

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
    >>> RandomAffine(degrees=15).num_uniforms  # angle, shift x, shift y, scale, shear x, shear y
    6
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from regpipe.core.checks import check_finite_number
from regpipe.core.batch import Batch, identity_affine
from regpipe.core.op import BatchOp
from regpipe.core.rng import DeviceGenerator
from regpipe.functional.augment import (
    ANGLE,
    BRIGHTNESS,
    CENTER_X,
    CENTER_Y,
    CONTRAST,
    FLIP_X,
    FLIP_Y,
    MEAN_PIVOT,
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
    affine_matrix,
    bernoulli,
    brightness_contrast,
    compose_affine,
    constant,
    crop_affine,
    crop_window,
    draw_table,
    flip_affine,
    integer,
    inverse_warp,
    shift_affine,
    table_uniforms,
    uniform,
    values_from_uniforms,
    warp,
)

__all__ = [
    "AffineParams",
    "Augment",
    "AugmentParams",
    "ColourParams",
    "CropParams",
    "FlipParams",
    "RandomAffine",
    "RandomBrightnessContrast",
    "RandomFlip",
    "RandomPadCrop",
    "RandomResizedCrop",
    "RandomTransform",
    "Replicate",
    "ShiftParams",
    "warp_to",
]

_PADDING_MODES = ("zeros", "border", "reflection")


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
class ShiftParams:
    """``shift``: ``(N, 2)`` whole-pixel offsets ``(dx, dy)`` (float holding integers): output pixel ``(i, j)`` is
    input pixel ``(i + dy, j + dx)``."""

    shift: torch.Tensor


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


@dataclass(frozen=True)
class AugmentParams:
    """Every random choice of one :class:`Augment` draw: one record per transform, in chain order, each for the
    same ``N`` rows (:class:`FlipParams`, :class:`CropParams`, ...). Indexable like the tuple it holds."""

    records: tuple[Any, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.records)


class Transform(Protocol):
    """What :class:`Augment` needs of a transform (:class:`RandomTransform` provides all but ``matrix``/``apply``)."""

    geometric: bool
    num_uniforms: int

    def from_uniforms(self, u: torch.Tensor) -> Any: ...


class RandomTransform(ABC):
    """A transform whose parameters are a fixed function of ``num_uniforms`` uniforms per row.

    A subclass declares its randomness once, in :meth:`draws` (rows of a draw table, see
    :func:`~regpipe.functional.augment.values_from_uniforms`), and packs the slot values into its
    parameter record in :meth:`from_values`. The torch op (:meth:`sample`, :meth:`from_uniforms`) and the
    DALI and FFCV kernels (which read :attr:`table`) then agree by construction. Geometric subclasses
    add ``matrix(params, height, width)``, photometric ones ``apply(x, params)``.
    """

    geometric: bool

    @abstractmethod
    def draws(self) -> tuple[tuple[float, ...], ...]:
        """The draw-table rows of this transform (from ``bernoulli``, ``uniform``, ``integer``, ``crop_window``,
        ``constant``)."""

    @abstractmethod
    def from_values(self, values: torch.Tensor) -> Any:
        """The parameter record from ``(N, NUM_SLOTS)`` slot values (``values_from_uniforms`` of the table)."""

    @property
    def table(self) -> torch.Tensor:
        """``(D, 6)`` float64 draw table: what the loaders' numba kernels read."""
        return draw_table(self.draws())

    @property
    def num_uniforms(self) -> int:
        """Uniforms one row of parameters consumes."""
        return table_uniforms(self.draws())

    def from_uniforms(self, u: torch.Tensor) -> Any:
        """The parameter record of ``N`` rows from ``(N, num_uniforms)`` uniforms in ``[0, 1)`` (any device; the
        record is in ``u``'s float dtype, flips are bool). The table is read as host rows: nothing is read back
        per batch."""
        return self.from_values(values_from_uniforms(self.draws(), u))

    def sample(self, n: int, generator: torch.Generator) -> Any:
        """The parameter record of ``n`` rows drawn from ``generator`` (on its device)."""
        return self.from_uniforms(torch.rand(n, self.num_uniforms, generator=generator, device=generator.device))


class RandomFlip(RandomTransform):
    """Flip each row horizontally with probability ``horizontal`` and vertically with ``vertical``."""

    geometric = True

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.0) -> None:
        for name, p in (("horizontal", horizontal), ("vertical", vertical)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} flip probability must be in [0, 1], got {p}")
        self.horizontal, self.vertical = float(horizontal), float(vertical)

    def draws(self) -> tuple[tuple[float, ...], ...]:
        return bernoulli(FLIP_X, self.horizontal), bernoulli(FLIP_Y, self.vertical)

    def from_values(self, values: torch.Tensor) -> FlipParams:
        return FlipParams(horizontal=values[:, FLIP_X] > 0.5, vertical=values[:, FLIP_Y] > 0.5)

    def matrix(self, params: FlipParams, height: int, width: int) -> torch.Tensor:
        return flip_affine(params.horizontal, params.vertical)


class RandomPadCrop(RandomTransform):
    """The CIFAR crop: pad each image with ``pad`` zero pixels on every side, then take a random window of the
    image's own size, its position uniform over the ``(2 pad + 1)^2`` whole-pixel offsets (the standard CIFAR
    training augmentation, pad 4 for 32-pixel images, with a horizontal flip).

    Drawn as two integer offsets per row, ``dx, dy`` uniform over ``{-pad, ..., pad}``, and applied as the
    whole-pixel translation :func:`~regpipe.functional.augment.shift_affine`, which samples exact pixel
    centres: the warp equals ``F.pad`` followed by slicing the window ``[pad + dy : pad + dy + H, pad + dx :
    pad + dx + W]``.

    Args:
        pad: zero pixels added on each side, ``>= 0`` (0: the identity).
    """

    geometric = True

    def __init__(self, pad: int = 4) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an integer >= 0 (pixels), got {pad!r}")
        self.pad = pad

    def draws(self) -> tuple[tuple[float, ...], ...]:
        return integer(PIXEL_SHIFT_X, -self.pad, self.pad), integer(PIXEL_SHIFT_Y, -self.pad, self.pad)

    def from_values(self, values: torch.Tensor) -> ShiftParams:
        return ShiftParams(shift=values[:, [PIXEL_SHIFT_X, PIXEL_SHIFT_Y]])

    def matrix(self, params: ShiftParams, height: int, width: int) -> torch.Tensor:
        return shift_affine(params.shift, height, width)


class RandomResizedCrop(RandomTransform):
    """torchvision's ``RandomResizedCrop``: a window of area ``scale`` (fraction of the image) and aspect ``ratio``
    (log-uniform), placed uniformly inside the frame, resized to the frame (no ``size``) or to ``size``.

    Windows are drawn as torchvision does, up to 10 tries per row; a row whose 10 tries all fall outside
    the frame keeps the whole image (torchvision falls back to a centre crop of the clamped ratio).
    The formulas are in :func:`~regpipe.functional.augment.values_from_uniforms` (``WINDOW``).

    Without ``size`` the output keeps the batch's size and ``ratio`` is in fractions of the frame
    (``w / h`` of the window's relative width and height). With ``size`` (the ImageNet crop, Szegedy et al.
    2015, section 6) the copies are ``size`` whatever the source's size, and ``ratio`` is in pixels of the
    source, as torchvision's: a ``H x W`` source draws its window with the log aspect shifted by
    ``log(H / W)`` (the frame-fraction aspect of a pixel aspect ``r`` is ``r H / W``; see ``from_uniforms``).
    The loaders (:func:`regpipe.loaders.dali.replicate`, :class:`regpipe.loaders.ffcv.ReplicatedCropDecoder`)
    then crop every copy from the decoded image at its own resolution.

    Args:
        scale: ``(low, high)`` window area, fractions of the image area, ``0 < low <= high <= 1``.
        ratio: ``(low, high)`` window aspect ratio, ``> 0``.
        size: ``(height, width)`` (or one int for a square) of the output, or ``None``.
    """

    geometric = True

    def __init__(self, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 size: int | tuple[int, int] | None = None) -> None:
        self.scale = _range("scale", scale, lowest=1e-6)
        self.ratio = _range("ratio", ratio, lowest=1e-6)
        if self.scale[1] > 1.0:
            raise ValueError(f"scale is a fraction of the image area, at most 1, got {scale!r}")
        self.size = _output_size(size)

    def draws(self) -> tuple[tuple[float, ...], ...]:
        return (crop_window(self.scale, self.ratio),)

    def from_uniforms(self, u: torch.Tensor, aspect: float = 1.0) -> CropParams:
        """The windows of ``N`` rows from ``(N, num_uniforms)`` uniforms.

        Args:
            u: uniforms in ``[0, 1)``.
            aspect: ``H / W`` of the source, used with ``size`` only: the table's log-aspect bounds
                ``log r`` become ``log r + log(H / W)``, so that the window's pixel aspect
                ``(w W) / (h H)`` is drawn log-uniformly from ``ratio`` (torchvision's draw).
        """
        rows = self.draws()
        if self.size is not None and aspect != 1.0:
            if not aspect > 0.0:
                raise ValueError(f"aspect (source H / W) must be > 0, got {aspect!r}")
            shift = math.log(aspect)
            rows = tuple((*row[:4], row[4] + shift, row[5] + shift) for row in rows)
        return self.from_values(values_from_uniforms(rows, u))

    def from_values(self, values: torch.Tensor) -> CropParams:
        return CropParams(size=values[:, [SIZE_X, SIZE_Y]], center=values[:, [CENTER_X, CENTER_Y]])

    def matrix(self, params: CropParams, height: int, width: int) -> torch.Tensor:
        return crop_affine(params.size, params.center)


class RandomAffine(RandomTransform):
    """Random rotation (``degrees``: max absolute angle), translation (``translate``: max fraction of width and
    height), scale (``scale`` range) and shear (``shear``: max absolute degrees along x and y), as
    torchvision's ``RandomAffine`` about the centre; each uniform over its range."""

    geometric = True

    def __init__(self, degrees: float = 0.0, translate: tuple[float, float] = (0.0, 0.0),
                 scale: tuple[float, float] = (1.0, 1.0), shear: tuple[float, float] = (0.0, 0.0)) -> None:
        check_finite_number("degrees", degrees, 0.0)  # the maximum absolute angle
        if len(translate) != 2 or any(not 0.0 <= t <= 1.0 for t in translate):
            raise ValueError(f"translate must be two fractions in [0, 1], got {translate!r}")
        if len(shear) != 2 or any(not 0.0 <= s < 90.0 for s in shear):
            raise ValueError(f"shear must be two angles in [0, 90) degrees, got {shear!r}")
        self.degrees = float(degrees)
        self.translate = tuple(float(t) for t in translate)
        self.scale = _range("scale", scale, lowest=1e-6)
        self.shear = tuple(float(s) for s in shear)

    def draws(self) -> tuple[tuple[float, ...], ...]:
        (tx, ty), (hx, hy) = self.translate, self.shear
        return (uniform(ANGLE, -self.degrees, self.degrees), uniform(SHIFT_X, -tx, tx), uniform(SHIFT_Y, -ty, ty),
                uniform(SCALE, *self.scale), uniform(SHEAR_X, -hx, hx), uniform(SHEAR_Y, -hy, hy))

    def from_values(self, values: torch.Tensor) -> AffineParams:
        return AffineParams(angle=values[:, ANGLE], scale=values[:, SCALE], translate=values[:, [SHIFT_X, SHIFT_Y]],
                            shear=values[:, [SHEAR_X, SHEAR_Y]])

    def matrix(self, params: AffineParams, height: int, width: int) -> torch.Tensor:
        return affine_matrix(params.angle, params.scale, params.translate, params.shear, height, width)


class RandomBrightnessContrast(RandomTransform):
    """Brightness and contrast factors drawn uniformly from ``brightness`` and ``contrast``; the contrast
    pivot is ``center`` (``None``: each image's mean)."""

    geometric = False

    def __init__(self, brightness: tuple[float, float] = (0.8, 1.2), contrast: tuple[float, float] = (0.8, 1.2),
                 center: float | None = None) -> None:
        self.brightness = _range("brightness", brightness, lowest=0.0)
        self.contrast = _range("contrast", contrast, lowest=0.0)
        self.center = None if center is None else float(center)

    def draws(self) -> tuple[tuple[float, ...], ...]:
        # The pivot is a setting, not a draw; it travels in the table so the loaders' kernels read it there too.
        return (uniform(BRIGHTNESS, *self.brightness), uniform(CONTRAST, *self.contrast),
                constant(PIVOT, MEAN_PIVOT if self.center is None else self.center))

    def from_values(self, values: torch.Tensor) -> ColourParams:
        return ColourParams(brightness=values[:, BRIGHTNESS], contrast=values[:, CONTRAST])

    def apply(self, x: torch.Tensor, params: ColourParams) -> torch.Tensor:
        return brightness_contrast(x, params.brightness, params.contrast, self.center)


def _output_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``None``, an int (square) or ``(height, width)`` -> ``(height, width)`` of positive ints."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"size must be a positive int or (height, width) of positive ints, got {size!r}")
    return int(pair[0]), int(pair[1])


def warp_to(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int], padding_mode: str = "zeros") -> torch.Tensor:
    """``warp`` into an output of ``size`` ``(H_out, W_out)``: ``affine_grid`` of the output frame, ``grid_sample`` of
    ``x`` (bilinear, ``align_corners=False``; uint8 is resampled in float32 and rounded back).

    Args:
        x: ``(N, C, H, W)`` float or uint8.
        theta: ``(N, 2, 3)`` output -> input matrices (normalised coordinates, frame-size free).
        size: the output's ``(H_out, W_out)``.

    Returns:
        ``(N, C, H_out, W_out)`` in ``x``'s dtype and memory format.
    """
    work = x.float() if x.dtype == torch.uint8 else x
    grid = F.affine_grid(theta.to(work.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    if x.dtype == torch.uint8:
        out = out.round_().to(torch.uint8)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _record_rows(record: Any) -> set[int]:
    """Row counts of the tensor fields of a parameter record (a dataclass; other records are not checked)."""
    if not dataclasses.is_dataclass(record):
        return set()
    return {getattr(record, f.name).shape[0] for f in dataclasses.fields(record)
            if isinstance(getattr(record, f.name), torch.Tensor) and getattr(record, f.name).dim() > 0}


class Augment(BatchOp[AugmentParams]):
    """A chain of transforms applied to a :class:`Batch` with one warp.

    The geometric transforms' matrices are multiplied (in chain order) and applied by a single
    ``grid_sample``; photometric transforms follow, in order. The batch's ``affine`` becomes
    ``compose_affine(batch.affine, chain)`` (so it keeps mapping each row back to the loader's image)
    and ``photometric`` records the product of the brightness and contrast factors (exact for one
    photometric transform; for several it is the record of their combined scaling).

    A draw is one ``(N, num_uniforms)`` block of uniforms from the op's generator, the transforms'
    columns side by side in chain order (the layout the DALI and FFCV adapters draw too).

    Args:
        transforms: instances of :class:`RandomFlip`, :class:`RandomPadCrop`, :class:`RandomResizedCrop`,
            :class:`RandomAffine`,
            :class:`RandomBrightnessContrast` (or any :class:`RandomTransform`; anything else with
            ``geometric``, ``num_uniforms``, ``from_uniforms`` and ``matrix`` or ``apply`` runs in torch
            but not in the DALI/FFCV kernels).
        seed: seed of the op's generator (on the batch's device).
        padding_mode: ``grid_sample`` padding for pixels that come from outside the frame.

    Raises:
        ValueError: no transforms, or an unknown ``padding_mode`` (named).
        TypeError: an object that is not a transform (named, with what it lacks).
    """

    def __init__(self, transforms: Sequence[Transform], seed: int = 0, padding_mode: str = "zeros") -> None:
        self.transforms = list(transforms)
        if not self.transforms:
            raise ValueError("Augment needs at least one transform")
        for t in self.transforms:
            kind = "matrix" if getattr(t, "geometric", False) else "apply"
            needs = ("geometric", "num_uniforms", "from_uniforms", kind)
            missing = [name for name in needs if not hasattr(t, name)]
            if missing:
                raise TypeError(f"{type(t).__name__} is not a transform: it lacks {missing}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {list(_PADDING_MODES)}, got {padding_mode!r}")
        sized = [t for t in self.transforms if getattr(t, "size", None) is not None]
        if len(sized) > 1:
            raise ValueError(f"a chain resizes once: {len(sized)} transforms have an output size")
        super().__init__(seed)
        self.padding_mode = padding_mode

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of the chain's sized crop (the rows' size after :meth:`apply`), or ``None``."""
        for t in self.transforms:
            if getattr(t, "size", None) is not None:
                return t.size
        return None

    @property
    def num_uniforms(self) -> int:
        """Uniforms one row consumes: the transforms' counts, summed."""
        return sum(t.num_uniforms for t in self.transforms)

    def from_uniforms(self, u: torch.Tensor, aspect: float = 1.0) -> AugmentParams:
        """The parameters of ``N`` rows from ``(N, num_uniforms)`` uniforms (columns in chain order), e.g. those a
        DALI pipeline returned, so :meth:`apply` replays what the loader did. ``aspect`` is the source's
        ``H / W``, read by a sized crop (its window's pixel aspect, see :class:`RandomResizedCrop`).

        Raises:
            ValueError: ``u`` is not ``(N, num_uniforms)`` (the shape is named).
        """
        counts = [t.num_uniforms for t in self.transforms]
        if not isinstance(u, torch.Tensor) or u.dim() != 2 or u.shape[1] != sum(counts):
            raise ValueError(f"expected (N, {sum(counts)}) uniforms for this chain ({counts} per transform), got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        records, k = [], 0
        for t, count in zip(self.transforms, counts):
            sized = getattr(t, "size", None) is not None
            records.append(t.from_uniforms(u[:, k:k + count], aspect) if sized else t.from_uniforms(u[:, k:k + count]))
            k += count
        return AugmentParams(tuple(records))

    def sample(self, n: int, device: torch.device | str, aspect: float = 1.0) -> AugmentParams:
        """The parameters of ``n`` rows, drawn from the op's generator on ``device`` (``aspect``: the source's
        ``H / W``, for a sized crop)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n (rows) must be an integer >= 0, got {n!r}")
        generator = self.rng.get(device)
        return self.from_uniforms(torch.rand(n, self.num_uniforms, generator=generator, device=generator.device),
                                  aspect)

    def draw(self, batch: Batch) -> AugmentParams:
        """The parameters of every row of ``batch``, from the op's generator on the batch's device."""
        height, width = batch.inputs.shape[-2:]
        return self.sample(batch.size, batch.device, height / width if self.output_size is not None else 1.0)

    def matrix(self, params: Sequence[Any], height: int, width: int) -> torch.Tensor | None:
        """The composed ``(N, 2, 3)`` float32 output -> source matrix of the geometric transforms, or ``None`` when
        there are none. ``height, width`` are the source's; transforms after a sized crop work in its
        output frame (their pixel-true angles use the output's size), as in the loaders' kernels."""
        theta = None
        for t, p in zip(self.transforms, params):
            if t.geometric:
                m = t.matrix(p, height, width).to(torch.float32)
                theta = m if theta is None else compose_affine(theta, m)
                if getattr(t, "size", None) is not None:
                    height, width = t.size
        return theta

    def apply(self, batch: Batch, params: AugmentParams | Sequence[Any]) -> Batch:
        """Apply the chain with the given parameters (one record per transform, each for ``batch.size`` rows).

        Raises:
            ValueError: a record count or a row count that does not match (named) -- checked before any work.
        """
        records = tuple(params)
        if len(records) != len(self.transforms):
            raise ValueError(f"{len(records)} parameter records for {len(self.transforms)} transforms")
        for t, record in zip(self.transforms, records):
            rows = _record_rows(record)
            if rows and rows != {batch.size}:
                raise ValueError(f"{type(t).__name__} parameters are for {sorted(rows)} rows, "
                                 f"the batch has {batch.size}")
        x = batch.inputs
        height, width = x.shape[-2:]
        theta = self.matrix(records, height, width)
        affine = batch.affine
        if theta is not None:
            theta = theta.to(x.device)
            size = self.output_size
            x = warp(x, theta, padding_mode=self.padding_mode) if size is None else \
                warp_to(x, theta, size, padding_mode=self.padding_mode)
            affine = compose_affine(batch.affine, theta.to(batch.affine.dtype))
        photometric = batch.photometric
        for t, p in zip(self.transforms, records):
            if not t.geometric:
                x = t.apply(x, p)
                factors = torch.stack([p.brightness, p.contrast], -1).to(x.device, torch.float32)
                photometric = factors if photometric is None else photometric * factors
        return batch.replace(inputs=x, affine=affine, photometric=photometric)

    @staticmethod
    def inverse(y: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Warp ``y`` (``(N, C, H, W)``: the batch's images or anything in their frame, e.g. saliency maps)
        back to the frame of the loader's images with the batch's recorded affines."""
        return inverse_warp(y, batch.affine.to(y.device))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "padding_mode": self.padding_mode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.padding_mode = state.get("padding_mode", self.padding_mode)


class Replicate(BatchOp[AugmentParams]):
    """In-batch augmentation replication: ``S`` seeds -> ``S * m`` rows.

    Hernández-García, König & Kietzmann (2019), "Learning robust visual representations using data
    augmentation invariance", section 2.3: instead of one augmented view of each image per batch, a batch
    holds ``m`` independently transformed copies of each of ``S`` seed images, and every row keeps the id
    of its seed, so a loss can compare the copies of one seed (the invariance loss of
    :mod:`regpipe.functional.invariance`, the saliency loss).

    Rows ``s*m .. s*m + m - 1`` are the copies of seed ``s`` (contiguous), each with independently drawn
    parameters; with ``include_original`` the first copy is the seed untouched (identity affine). The output
    declares it: ``Batch.replicas = m`` (times the input's, when the seeds were copies already), which the
    mixing ops and the invariance loss read instead of guessing from ``source_ids``.
    ``source_ids`` are the seeds' ids, affines and photometric factors are recorded. Works on uint8
    or float input.

    The op has no generator of its own: the copies' parameters are draws of ``augment`` (its seed, its
    state), so ``draw`` returns the :class:`AugmentParams` of the ``S * (m - 1)`` (or ``S * m``) copies,
    seed-major, and ``reseed`` reseeds ``augment``.

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
        # No BatchOp.__init__: the generator is the chain's (the `rng` property), not a second one.
        self.m = m
        self.augment = augment
        self.include_original = bool(include_original)

    @property
    def rng(self) -> DeviceGenerator:  # type: ignore[override]
        """The chain's generator, which draws every copy's parameters."""
        return self.augment.rng

    @property
    def extra(self) -> int:
        """Augmented copies per seed (``m - 1`` with the original kept, else ``m``)."""
        return self.m - 1 if self.include_original else self.m

    @staticmethod
    def _check_seeds(batch: Batch) -> None:
        if batch.mixing is not None or batch.patchup is not None:
            raise ValueError("Replicate takes seed batches: apply it before mixing ops and PatchUp")

    def draw(self, batch: Batch) -> AugmentParams:
        """The chain's parameters for the ``S * extra`` augmented copies, seed-major (copy ``j`` of seed ``s`` is
        row ``s * extra + j``)."""
        self._check_seeds(batch)
        height, width = batch.inputs.shape[-2:]
        aspect = height / width if self.augment.output_size is not None else 1.0
        return self.augment.sample(batch.size * self.extra, batch.device, aspect)

    def apply(self, batch: Batch, params: AugmentParams) -> Batch:
        """The ``S * m`` rows with the copies' parameters ``params`` (from :meth:`draw`)."""
        self._check_seeds(batch)
        s, extra = batch.size, self.extra
        if extra == 0:
            return batch
        replicas = batch.replicas * self.m  # rows of one seed stay contiguous: groups of m times the old ones
        copies = self.augment.apply(batch.rows(torch.arange(s, device=batch.device).repeat_interleave(extra)), params)
        if not self.include_original:
            return copies.replace(replicas=replicas)
        size = self.augment.output_size
        if size is not None and tuple(batch.inputs.shape[-2:]) != size:  # the original, whole, at the copies' size
            batch = batch.replace(inputs=warp_to(batch.inputs, identity_affine(s, batch.device), size))
        photometric = copies.photometric
        if photometric is not None:
            originals = torch.ones(s, 2, device=photometric.device, dtype=photometric.dtype) \
                if batch.photometric is None else batch.photometric
            photometric = _interleave(originals, photometric, s)
        return Batch(inputs=_interleave(batch.inputs, copies.inputs, s),
                     targets=_interleave(batch.targets, copies.targets, s),
                     source_ids=_interleave(batch.source_ids, copies.source_ids, s),
                     affine=_interleave(batch.affine, copies.affine, s), photometric=photometric, replicas=replicas)

    def reseed(self, seed: int, rank: int = 0) -> None:
        """Reseed the chain (whose generator draws the copies) with ``rank_seed(seed, rank)``."""
        self.augment.reseed(seed, rank)

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "include_original": self.include_original, "augment": self.augment.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in ("m", "include_original", "augment") if key not in state]
        if missing:
            raise KeyError(f"Replicate state lacks {missing} (keys: {sorted(state)})")
        self.m = int(state["m"])
        self.include_original = bool(state["include_original"])
        self.augment.load_state_dict(state["augment"])


def _interleave(first: torch.Tensor, rest: torch.Tensor, s: int) -> torch.Tensor:
    """Rows ``[first[0], rest[0:e], first[1], rest[e:2e], ...]`` for ``S`` seeds: seed-contiguous output."""
    out = torch.cat([first.unsqueeze(1), rest.reshape(s, -1, *rest.shape[1:])], dim=1).flatten(0, 1)
    if first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
