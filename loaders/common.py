"""What every loader adapter shares: checks of a loader's arrays, the transfer + normalisation, building the
:class:`~regpipe.Batch` and running the ops, so the torch, DALI and FFCV adapters report the same errors
for the same bad input and produce the same batches.

Also the torch reference of the replication kernels (:func:`params_from_uniforms`, :func:`replicate_reference`):
the same uniforms give the same parameter records as :mod:`regpipe.loaders._kernels`, as regpipe's
own param dataclasses, so ``Augment.apply`` can replay what DALI or FFCV did.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import math

import torch

from regpipe.batch import Batch, MixRecord, labels_to_targets
from regpipe.ops.augment import (
    AffineParams,
    Augment,
    ColourParams,
    CropParams,
    FlipParams,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    RandomResizedCrop,
)

__all__ = ["Op", "BatchBuilder", "BuilderAdapter", "normalize", "check_outputs", "params_from_uniforms", "uniform_count"]

Op = Callable[[Batch], Batch]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` in 0..255 (or float in 0..1) -> ``(x / 255 - mean) / std`` in ``dtype``.

    ``mean``/``std`` are ``(C,)`` in the 0..1 scale. The memory format of ``images`` is kept.
    """
    if images.dtype == torch.uint8:
        x = images.to(dtype).div_(255.0)
    else:
        x = images.to(dtype, copy=True)  # the in-place ops below must not touch the caller's tensor
    c = x.shape[1]
    if mean.numel() != c or std.numel() != c:
        raise ValueError(f"mean/std have {mean.numel()}/{std.numel()} values for {c} channels")
    return x.sub_(mean.to(x.device, dtype).view(1, c, 1, 1)).div_(std.to(x.device, dtype).view(1, c, 1, 1))


def check_outputs(available: Sequence[str], required: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming every name of ``required`` missing from ``available`` (a pipeline's outputs)."""
    missing = [name for name in required if name not in available]
    if missing:
        raise ValueError(f"{where} lacks the output(s) {missing}: it has {list(available)}; regpipe needs "
                         f"{list(required)}")


class BatchBuilder:
    """Loader arrays -> :class:`Batch` on the device, then the ops. Used by every adapter.

    Args:
        num_classes: number of classes ``K``.
        device: where the batch goes.
        ops: callables ``Batch -> Batch`` applied in order.
        mean, std: per-channel normalisation in the 0..1 scale; ``None`` leaves values unnormalised (uint8
            is still converted to float in 0..1 unless ``keep_uint8``).
        channels_last: make the images ``torch.channels_last``.
        non_blocking: asynchronous host -> CUDA copies.
        keep_uint8: hand the raw uint8 images to the ops.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ops: Sequence[Op] = (),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels_last: bool = False, non_blocking: bool = True, keep_uint8: bool = False) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.ops = list(ops)
        self.mean = torch.tensor(mean, dtype=torch.float32) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32) if std is not None else None
        self.channels_last = channels_last
        self.non_blocking = non_blocking and self.device.type == "cuda"
        self.keep_uint8 = keep_uint8

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.non_blocking)

    def images(self, images: Any) -> torch.Tensor:
        """Check ``(N, C, H, W)`` images, move them, optionally channels_last, convert/normalise."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        x = self._to(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.keep_uint8:
            if self.mean is not None:
                x = normalize(x, self.mean, self.std)
            elif x.dtype == torch.uint8:
                x = x.float().div_(255.0)
        return x

    def targets(self, labels: Any, n: int) -> torch.Tensor:
        """``(N,)`` integer labels -> one-hot ``(N, K)``, range-checked on the host before the transfer."""
        labels = torch.as_tensor(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
        return labels_to_targets(labels, self.num_classes)

    def soft_targets(self, targets: Any, n: int) -> torch.Tensor:
        """Loader-mixed ``(N, K)`` float targets, checked on the host (shape, dtype, rows sum to 1)."""
        targets = torch.as_tensor(targets)
        if targets.shape != (n, self.num_classes):
            raise ValueError(f"soft targets must be (N, K) = ({n}, {self.num_classes}), got {tuple(targets.shape)}")
        if not targets.dtype.is_floating_point:
            raise TypeError(f"soft targets must be floating point, got {targets.dtype}")
        if n and not torch.allclose(targets.sum(1).double(), torch.ones(n, dtype=torch.float64), atol=1e-3):
            bad = int((targets.sum(1).double() - 1).abs().argmax())
            raise ValueError(f"soft target row {bad} sums to {float(targets[bad].sum()):.4f}, not 1")
        return targets.float()

    def ids(self, indices: Any, n: int) -> torch.Tensor:
        ids = torch.as_tensor(indices).long()
        if ids.shape != (n,):
            raise ValueError(f"indices must be (N,) = ({n},), got {tuple(ids.shape)}")
        return ids

    def build(self, images: torch.Tensor, labels: Any = None, indices: Any = None, position: int = 0, *,
              targets: Any = None, affine: torch.Tensor | None = None, photometric: torch.Tensor | None = None,
              mixing: MixRecord | None = None) -> Batch:
        """Build the :class:`Batch` (no ops applied).

        Args:
            images: ``(N, C, H, W)`` uint8 or float (host or device).
            labels: ``(N,)`` integer labels (or give ``targets``).
            indices: ``(N,)`` dataset ids; ``None``: ``position .. position + N - 1``.
            targets: ``(N, K)`` soft targets from a loader that mixed.
            affine: ``(N, 2, 3)`` normalised output -> input matrices recorded by the loader.
            photometric: ``(N, 2)`` brightness/contrast factors recorded by the loader.
            mixing: the loader's mix record.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            self.images(images)  # raises the shared message
        n = images.shape[0]
        y = self.soft_targets(targets, n) if targets is not None else self.targets(labels, n)
        ids = self.ids(indices, n) if indices is not None else torch.arange(position, position + n)
        x = self.images(images)
        if mixing is not None:
            mixing = MixRecord(*(self._to(t) for t in (mixing.sources, mixing.weights, mixing.source_ids)))
        return Batch(inputs=x, targets=self._to(y), source_ids=self._to(ids),
                     affine=None if affine is None else self._to(affine.float()),
                     photometric=None if photometric is None else self._to(photometric.float()), mixing=mixing)

    def apply(self, batch: Batch) -> Batch:
        """Run the ops on a batch."""
        for op in self.ops:
            batch = op(batch)
        return batch


class BuilderAdapter:
    """What every adapter exposes from its :class:`BatchBuilder` (``self.builder``): the number of classes,
    the device and the editable list of ops."""

    builder: BatchBuilder

    @property
    def num_classes(self) -> int:
        return self.builder.num_classes

    @property
    def device(self) -> torch.device:
        return self.builder.device

    @property
    def ops(self) -> list[Op]:
        """The ops applied to every batch, in order (a list you may edit)."""
        return self.builder.ops

    @ops.setter
    def ops(self, ops: Sequence[Op]) -> None:
        self.builder.ops = list(ops)


def uniform_count(augment: Augment) -> int:
    """Uniforms one copy consumes under the loaders' parameterisation (see :mod:`regpipe.loaders._kernels`)."""
    from regpipe.loaders._kernels import encode_augment

    return encode_augment(augment)[1]


def params_from_uniforms(augment: Augment, u: torch.Tensor) -> list[Any]:
    """regpipe parameter records of ``augment``'s transforms from ``(N, P)`` uniforms, as the DALI/FFCV kernels
    read them: the torch reference (``Augment.apply(batch, params_from_uniforms(aug, u))`` replays them).

    Copies that are originals (``include_original``) are not the kernels' business here: pass only the
    augmented rows.
    """
    from regpipe.loaders._kernels import encode_augment

    _, count = encode_augment(augment)
    if u.dim() != 2 or u.shape[1] != count:
        raise ValueError(f"expected (N, {count}) uniforms for this chain, got {tuple(u.shape)}")
    u = u.double()
    out: list[Any] = []
    k = 0
    for t in augment.transforms:
        if isinstance(t, RandomFlip):
            out.append(FlipParams(horizontal=u[:, k] < t.horizontal, vertical=u[:, k + 1] < t.vertical))
            k += 2
        elif isinstance(t, RandomResizedCrop):
            area = u[:, k:k + 10] * (t.scale[1] - t.scale[0]) + t.scale[0]
            lo, hi = math.log(t.ratio[0]), math.log(t.ratio[1])
            aspect = (u[:, k + 10:k + 20] * (hi - lo) + lo).exp()
            w, h = (area * aspect).sqrt(), (area / aspect).sqrt()
            fits = (w <= 1.0) & (h <= 1.0)
            pick = fits.double().argmax(1, keepdim=True)
            size = torch.cat([w.gather(1, pick), h.gather(1, pick)], 1)
            size = torch.where(fits.any(1, keepdim=True), size, torch.ones_like(size))
            center = (u[:, k + 20:k + 22] * 2.0 - 1.0) * (1.0 - size)
            out.append(CropParams(size=size.float(), center=center.float()))
            k += 22
        elif isinstance(t, RandomAffine):
            deg, (tx, ty), (s0, s1), (hx, hy) = t.degrees, t.translate, t.scale, t.shear
            out.append(AffineParams(angle=(u[:, k] * 2 * deg - deg).float(),
                                    translate=torch.stack([u[:, k + 1] * 2 * tx - tx, u[:, k + 2] * 2 * ty - ty], -1).float(),
                                    scale=(u[:, k + 3] * (s1 - s0) + s0).float(),
                                    shear=torch.stack([u[:, k + 4] * 2 * hx - hx, u[:, k + 5] * 2 * hy - hy], -1).float()))
            k += 6
        elif isinstance(t, RandomBrightnessContrast):
            out.append(ColourParams(brightness=(u[:, k] * (t.brightness[1] - t.brightness[0]) + t.brightness[0]).float(),
                                    contrast=(u[:, k + 1] * (t.contrast[1] - t.contrast[0]) + t.contrast[0]).float()))
            k += 2
    return out
