"""What every loader adapter shares: checks of a loader's arrays, the transfer + normalisation, building the
:class:`~regpipe.Batch` and running the ops (the device stage), so the torch, DALI and FFCV adapters report
the same errors for the same bad input and produce the same batches.

The augmentation parameters the DALI and FFCV kernels draw are replayed in torch by the op itself:
``augment.from_uniforms(u)`` (:class:`~regpipe.ops.augment.Augment`) reads the same draw tables as
:mod:`regpipe.loaders._kernels`, so ``augment.apply(batch, augment.from_uniforms(u))`` redoes what the
loader did.
"""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from regpipe.core.batch import Batch, labels_to_targets
from regpipe.core.checks import check_device
from regpipe.core.mix_plan import MixPlan
from regpipe.functional.normalize import normalize
from regpipe.functional.sum_mix import mix_rows
from regpipe.kernels import OUT_DTYPES, FusedMix, resolve_backend

__all__ = ["Op", "BatchBuilder", "BuilderAdapter", "check_outputs", "EXECUTORS", "LOG_ENV"]

Op = Callable[[Batch], Batch]

#: set to 1 to print, once per op, which implementation ran the device stage
LOG_ENV = "REGPIPE_LOG_KERNELS"
#: how a :class:`BatchBuilder` executes the mixing ops' plans (its ``executor`` argument)
EXECUTORS = ("auto", "fused", "torch")


def _pixel_bounds(images: torch.Tensor, where: str) -> tuple[float, float] | None:
    """``(smallest, largest)`` value of floating host images in one reduction (``aminmax``), or ``None`` for
    uint8, device or empty images (reading a device tensor would synchronise).

    Both bounds finite means every value is (NaN propagates into both): so the one pass refuses NaN and
    ``-inf`` pixels as well as ``+inf``, which a check of the largest value alone lets through.

    Raises:
        ValueError: a non-finite value (``where`` and the bounds are named).
    """
    if not images.dtype.is_floating_point or images.device.type != "cpu" or not images.numel():
        return None
    lo, hi = (float(v) for v in torch.aminmax(images))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{where}: non-finite pixel values (smallest {lo:g}, largest {hi:g}); images must be "
                         "finite (check the data, or the transforms that made them)")
    return lo, hi


def _refuse_0_255_floats(images: torch.Tensor) -> None:
    """Float images must be finite and in the 0..1 pixel scale; refuse the unmistakable slip of 0..255 floats.

    The bound is loose on purpose: SIGN's training rows legitimately leave ``[0, 1]`` (its iterates are
    unclamped; measured on Fashion-MNIST, mean ``|delta|`` 0.54 at K = 50 and 1.10 at K = 100 in the 0..1
    scale), while a batch of images still in ``0..255`` has a largest value near 255. Host tensors only (no
    device synchronisation); one reduction.
    """
    bounds = _pixel_bounds(images, "the loader's images")
    if bounds is not None and bounds[1] > 64.0:
        raise ValueError(f"images are floating point with a largest value of {bounds[1]:g}; floating images must "
                         "be in the 0..1 pixel scale (divide 0..255 images by 255, or pass uint8)")


def check_decoded_images(images: torch.Tensor, where: str, keep_uint8: bool, normalising: bool) -> None:
    """A decoding pipeline's images (DALI, FFCV) must be pixels: uint8, or floats in the 0..1 scale.

    Refused, naming ``where`` and the fix: floats when ``keep_uint8`` asks for the uint8 batch (the fused
    device stage would never run); floats with negative values when regpipe normalises (a decoded pixel is
    never negative: the pipeline normalised already, e.g. DALI's ``crop_mirror_normalize`` or FFCV's
    ``NormalizeImage``, and a second normalisation would go unnoticed); in the same reduction, non-finite
    values (NaN, ``+-inf``). Floats still in ``0..255``, and non-finite values when regpipe does not
    normalise, are refused by :meth:`BatchBuilder.build`. Host tensors only are read (no device
    synchronisation).
    """
    if not images.dtype.is_floating_point:
        return
    if keep_uint8:
        raise ValueError(f"{where} gives {images.dtype} images where keep_uint8=True expects the decoded uint8 "
                         "ones: drop the pipeline's float conversion/normalisation (regpipe's device stage "
                         "converts and normalises), or pass keep_uint8=False")
    bounds = _pixel_bounds(images, where) if normalising else None  # else build() reads them (one reduction)
    if bounds is not None:
        lo = bounds[0]
        if lo < 0.0:
            raise ValueError(f"{where} gives {images.dtype} images with values down to {lo:g}, so they are "
                             "normalised already; regpipe's mean/std would normalise them twice: end the pipeline "
                             "with uint8 images (drop crop_mirror_normalize / NormalizeImage), or pass no mean/std")
    # floats still in 0..255 are refused by BatchBuilder.build, which every adapter calls next


def check_outputs(available: Sequence[str], required: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` naming every name of ``required`` missing from ``available`` (a pipeline's outputs)."""
    missing = [name for name in required if name not in available]
    if missing:
        raise ValueError(f"{where} lacks the output(s) {missing}: it has {list(available)}; regpipe needs "
                         f"{list(required)}")


class BatchBuilder:
    """Loader arrays -> :class:`Batch` on the device, then the ops (the device stage). Used by every adapter.

    Args:
        num_classes: number of classes ``K``.
        device: where the batch goes.
        ops: callables ``Batch -> Batch`` applied in order.
        mean, std: per-channel normalisation in the 0..1 scale; ``None`` leaves values unnormalised (uint8
            is still converted to float in 0..1 unless ``keep_uint8``).
        channels_last: make the images ``torch.channels_last``.
        non_blocking: asynchronous host -> CUDA copies.
        keep_uint8: hand the raw uint8 images to the ops (uint8 augmentations are cheaper); the first
            mixing op still converts, normalises and mixes them in one fused pass, and a batch still
            uint8 after the ops is normalised when ``mean``/``std`` are given (never ignored).
        executor: who executes the mixing ops' plans: ``"fused"`` the compiled kernel of
            :class:`regpipe.kernels.FusedMix` (Triton on CUDA, numba on CPU; an error where neither runs),
            ``"torch"`` the torch reference (:func:`~regpipe.functional.normalize.normalize`, then
            :func:`~regpipe.functional.sum_mix.mix_rows`), ``"auto"`` (default) the kernel where a compiled
            backend runs on ``device``, else the reference. ``$REGPIPE_KERNEL_BACKEND`` still picks among the
            kernel's backends (see :func:`regpipe.kernels.resolve_backend`).

    The device stage (:meth:`apply`). An op that mixes rows by a plan (it provides ``mix(batch, executor)``:
    :class:`~regpipe.ops.SumMix`, :class:`~regpipe.ops.GradualSumMix`, :class:`~regpipe.ops.cutmix.MixUp`) is
    handed this builder's executor: on the loader's uint8 batch the kernel converts, normalises
    (``(x / 255 - mean) / std``) and mixes in one pass (zero weights not read), written in the float32
    batch's memory format (channels_last when asked); on a float batch it mixes alone. Any other op gets a
    normalised float batch (the batch is normalised before its first such op, unless ``keep_uint8``), and so
    does a mixing op that keeps its unmixed rows (``keep_parent``: the kept rows must be normalised too).
    Nothing depends on what was imported: the argument decides. ``REGPIPE_LOG_KERNELS=1`` prints, once per
    op, which implementation ran, e.g. ``GradualSumMix: fused_mix[numba] uint8 -> float32``; :attr:`ran`
    counts every stage run (the builder's own record).

    Attributes:
        ran: ``Counter`` of the stages run, e.g. ``ran["fused_mix[numba]"]``, ``ran["normalize[torch]"]``.

    Raises:
        ValueError: bad mean/std, an unknown ``executor``, or ``"fused"`` on a device no compiled backend runs on.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ops: Sequence[Op] = (),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels_last: bool = False, non_blocking: bool = True, keep_uint8: bool = False,
                 executor: str = "auto") -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {list(EXECUTORS)}, got {executor!r}")
        self.num_classes = int(num_classes)
        self.device = check_device("device", device)
        if executor == "fused" and resolve_backend(self.device) == "torch":
            raise ValueError(f"executor='fused' needs a compiled backend on {self.device} (numba for CPU tensors, "
                             "Triton for CUDA ones) and none is usable here; use executor='auto' or 'torch'")
        self.executor = executor
        self.ops = list(ops)
        # on the device once: a per-batch host -> device copy of the statistics would be a synchronisation
        self.mean = torch.tensor(mean, dtype=torch.float32).to(self.device) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32).to(self.device) if std is not None else None
        self._norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std)) if mean is not None else None
        self.channels_last = channels_last
        self.non_blocking = non_blocking and self.device.type == "cuda"
        self.keep_uint8 = keep_uint8
        self.ran: Counter[str] = Counter()
        self._mixers: dict[tuple[Any, ...], FusedMix] = {}
        self._logged: set[int] = set()

    def _to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.non_blocking)

    def images(self, images: Any, raw: bool = False) -> torch.Tensor:
        """Check ``(N, C, H, W)`` images, move them, optionally channels_last, convert/normalise (not with ``raw``:
        uint8 then stays uint8 for :meth:`apply`'s fused stage)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        x = self._to(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.keep_uint8 and not (raw and x.dtype == torch.uint8):
            x = self.convert(x)
        return x

    def convert(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> ``(x / 255 - mean) / std`` (or ``x / 255`` without mean/std); float: normalised when mean/std."""
        if self.mean is not None:
            return normalize(x, self.mean, self.std)
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x

    def targets(self, labels: Any, n: int) -> torch.Tensor:
        """``(N,)`` integer labels -> one-hot ``(N, K)``, range-checked on the host before the transfer."""
        labels = torch.as_tensor(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
        return labels_to_targets(labels, self.num_classes)

    def soft_targets(self, targets: Any, n: int) -> torch.Tensor:
        """A loader's ``(N, K)`` float targets, checked on the host (shape, dtype, rows sum to 1)."""
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
              replicas: int = 1, raw: bool = False) -> Batch:
        """Build the :class:`Batch` (no ops applied; with ``raw``, uint8 images stay uint8 for :meth:`apply`).

        Args:
            images: ``(N, C, H, W)`` uint8 or float (host or device).
            labels: ``(N,)`` integer labels (or give ``targets``).
            indices: ``(N,)`` dataset ids; ``None``: ``position .. position + N - 1``.
            targets: ``(N, K)`` soft targets from a loader that made them.
            affine: ``(N, 2, 3)`` normalised output -> input matrices recorded by the loader.
            photometric: ``(N, 2)`` brightness/contrast factors recorded by the loader.
            replicas: the loader made ``replicas`` copies of each sample, rows ``s * replicas ..`` of sample ``s``
                (in-loader replication): declared on the batch (``Batch.replicas``).
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            self.images(images)  # raises the shared message
        n = images.shape[0]
        _refuse_0_255_floats(images)  # 0..255 floats fed as 0..1 pixels: values in the hundreds
        y = self.soft_targets(targets, n) if targets is not None else self.targets(labels, n)
        ids = self.ids(indices, n) if indices is not None else torch.arange(position, position + n)
        x = self.images(images, raw=raw)
        return Batch(inputs=x, targets=self._to(y), source_ids=self._to(ids),
                     affine=None if affine is None else self._to(affine.float()),
                     photometric=None if photometric is None else self._to(photometric.float()), replicas=replicas)

    def apply(self, batch: Batch) -> Batch:
        """Run the ops on a batch; a uint8 batch is converted and normalised by the first mixing op's fused pass
        or before its first other op (see the class docstring). Reads no device value on the host.

        Raises:
            ValueError: with ``keep_uint8`` and ``mean``/``std``, an op turned the uint8 batch into floats before
                it was normalised (named: its output would be un-normalised 0..255 values).
        """
        pending = batch.inputs.dtype == torch.uint8
        for op in self.ops:
            mix = getattr(op, "mix", None)  # what a plan-mixing op provides (regpipe.ops.sum_mix.RowMixOp)
            keeps_rows = bool(getattr(op, "keep_parent", False))
            if pending and (keeps_rows if mix is not None else not self.keep_uint8):
                batch, pending = self._normalised(batch), False
            if mix is not None:
                batch = mix(batch, self._executor(op, batch.inputs))
                pending = batch.inputs.dtype == torch.uint8  # an identity plan (k = 1) leaves the batch as it was
                continue
            out = op(batch)
            if pending and out.inputs.dtype != torch.uint8:
                if self.mean is not None:
                    raise ValueError(f"{type(op).__name__} turned the uint8 batch into {out.inputs.dtype} before the "
                                     "loader's mean/std were applied: put it after a mixing op, or drop keep_uint8")
                pending = False
            batch = out
        if pending and (not self.keep_uint8 or self.mean is not None):
            batch = self._normalised(batch)
        return batch

    def _log(self, op: Any, text: str) -> None:
        if os.environ.get(LOG_ENV, "0") not in ("", "0") and id(op) not in self._logged:
            self._logged.add(id(op))
            print(f"{type(op).__name__}: {text}", file=sys.stderr)

    def _normalised(self, batch: Batch) -> Batch:
        self.ran["normalize[torch]"] += 1
        self._log(self, f"normalize[torch] {batch.inputs.dtype} -> float32")
        return batch.replace(inputs=self.convert(batch.inputs))

    def _executor(self, op: Any, x: torch.Tensor) -> Callable[[torch.Tensor, MixPlan], torch.Tensor]:
        """The function that mixes ``op``'s inputs ``x``: the fused kernel (uint8: with the conversion and this
        builder's normalisation; float: the mix alone, in ``x``'s dtype and layout) or the torch reference."""
        uint8 = x.dtype == torch.uint8
        mixer = None if self.executor == "torch" else self._fused(x)
        backend = "torch" if mixer is None else mixer.resolve(x.device)
        if mixer is None or backend == "torch":
            name, out = "mix_rows[torch]", torch.float32 if uint8 else x.dtype  # mix_rows keeps a float dtype

            def run(inputs: torch.Tensor, plan: MixPlan) -> torch.Tensor:
                return mix_rows(self.convert(inputs) if uint8 else inputs, plan)
        else:
            name, run, out = f"fused_mix[{backend}]", mixer, mixer.out_dtype
        out_dtype = str(out).replace("torch.", "")

        def counted(inputs: torch.Tensor, plan: MixPlan) -> torch.Tensor:
            self.ran[name] += 1
            self._log(op, f"{name} {str(inputs.dtype).replace('torch.', '')} -> {out_dtype}")
            return run(inputs, plan)
        return counted

    def _fused(self, x: torch.Tensor) -> FusedMix | None:
        """This builder's kernel executor for inputs like ``x`` (made once per kind), or ``None`` for a float
        dtype the kernel does not write (float64: the torch reference mixes it)."""
        c = x.shape[1]
        if x.dtype == torch.uint8:
            key: tuple[Any, ...] = ("uint8", c)
            mean, std = self._norm if self._norm is not None else ((0.0,) * c, (1.0,) * c)
            fmt, dtype = (torch.channels_last if self.channels_last else torch.contiguous_format), torch.float32
        else:
            if x.dtype not in OUT_DTYPES:
                return None
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
                else torch.contiguous_format
            key, mean, std, dtype = ("float", c, x.dtype, fmt), (0.0,) * c, (1.0,) * c, x.dtype
        mixer = self._mixers.get(key)
        if mixer is None:
            mixer = self._mixers[key] = FusedMix(mean, std, out_dtype=dtype, memory_format=fmt)
        return mixer


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
