"""FFCV adapter: numba-compiled ``Operation`` s (replication at decode), a ``Loader`` wrapper that yields
regpipe ``Batch`` es, and ``.beton`` writers for image arrays and map-style datasets.

Mixing is not done inside the loader: the wrapper's device stage (:class:`~regpipe.loaders.common.BatchBuilder`)
runs the mixing ops' plans through the fused kernel after the transfer (one pass that converts, normalises and
mixes; faster on a GPU than a CPU mix in FFCV's workers, and the one implementation of the math).

Add regpipe to an existing FFCV pipeline in a few lines::

    from regpipe.loaders.ffcv import FfcvLoader, Replicate
    rep = Replicate(m=4, augment=Augment([RandomFlip(), RandomAffine(degrees=15)]), seed=0)
    loader = Loader("train.beton", batch_size=32, order=OrderOption.RANDOM,
                    pipelines={"image": [NDArrayDecoder(), rep, ToTensor()],
                               "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]})
    batches = FfcvLoader(loader, num_classes=10, replicate=rep, ops=[GradualSumMix(k0=4, gradual_steps=1000)])

Randomness is counter-based, never a global generator (FFCV's own mixup reseeds numpy's global one per
batch): a copy's uniforms depend only on ``(seed, epoch, sample index, copy)``, so the loader's worker
threads and the wrapper's Python side compute the same parameters; the wrapper advances the epoch of
its operations at each pass (each operation keeps it in its own one-element array, which the compiled code
reads by address) and rebuilds the recorded affines from the ``index`` field. The uniforms
become parameters through the transforms' draw tables, the definition the torch op reads too.

Writing a regpipe dataset by name (``regpipe.engine.data``) is the engine's job: load it there and
pass its arrays to :func:`write_beton`.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np
import torch

from regpipe.core.batch import Batch
from regpipe.core.files import atomic_write, remove_stale_temporaries
from regpipe.core.optional import require
from regpipe.loaders import _kernels as K
from regpipe.loaders.common import BatchBuilder, BuilderAdapter, Op, check_decoded_images, check_outputs
from regpipe.loaders.file_index import FileIndex
from regpipe.ops.augment import Augment

# FFCV is an optional dependency (the `ffcv` extra): missing, or installed but broken, is said before the
# imports below, which then only fail on an FFCV of another version
require("ffcv", needed_by="regpipe.loaders.ffcv")
from ffcv.fields import IntField, NDArrayField, RGBImageField
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.writer import DatasetWriter

__all__ = ["Replicate", "ReplicatedCropDecoder", "WithIndices", "FfcvLoader", "write_beton", "write_rows",
           "write_image_folder"]


class _EpochOp(Operation):
    """An operation whose randomness is keyed by ``(seed, epoch, sample index)``.

    The epoch lives in a one-element int64 array the operation owns; its compiled code holds the array's
    address and reads it once per batch (:func:`regpipe.loaders._kernels.load_int64`), so :meth:`set_epoch`
    between passes changes what the already compiled pipeline draws. (numba freezes a global array into the
    compiled code as a constant, hence the address; an object-mode read per batch would hold the GIL.)
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._epoch = np.zeros(1, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def epoch_address(self) -> int:
        """Where the compiled code reads the epoch (valid as long as this operation lives)."""
        return int(self._epoch.ctypes.data)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next batches draw for (the wrapper sets it before each pass)."""
        self._epoch[0] = int(epoch)


def _check_state(op: str, state: State, ndim: int, dtypes: tuple[Any, ...]) -> None:
    if not state.jit_mode:
        raise TypeError(f"{op} runs on numpy arrays in FFCV's compiled stage: place it before ToTensor()")
    if len(state.shape) != ndim or np.dtype(state.dtype) not in [np.dtype(d) for d in dtypes]:
        raise TypeError(f"{op} needs a field of {ndim}-D {'/'.join(np.dtype(d).name for d in dtypes)} samples, "
                        f"got shape {tuple(int(d) for d in state.shape)} dtype {np.dtype(state.dtype).name}")


def _check_int_labels(op: str, state: State) -> None:
    if not state.jit_mode or not np.issubdtype(np.dtype(state.dtype), np.integer):
        raise TypeError(f"{op} needs integer labels (IntDecoder, before ToTensor), got "
                        f"dtype {np.dtype(state.dtype).name if state.jit_mode else 'torch'}")


_resize_crop = numba.njit(nogil=True)(resize_crop)


@numba.njit(nogil=True)
def _resize_window(image: np.ndarray, r0: int, r1: int, c0: int, c1: int, dst: np.ndarray) -> None:
    """``image[r0:r1, c0:c1]`` ``(H, W, 3)`` uint8 resized into ``dst`` ``(h, w, 3)`` by FFCV's C resize (OpenCV's
    ``INTER_AREA``, as ``ResizedCropRGBImageDecoder``).

    ``INTER_AREA`` averages each output pixel's footprint (a box filter) only when both axes shrink; when one
    grows it uses two-tap weights on both axes, which put a shrinking axis's samples off their footprints'
    centres by up to about ``(s - 1) / 2`` source pixels (``s``: source pixels per output pixel). Such a
    window is resized one axis at a time, the shrinking one first, so each axis samples at its footprints'
    centres (the recorded matrix's points).
    """
    out_h, out_w = dst.shape[0], dst.shape[1]
    h, w = r1 - r0, c1 - c0
    if h > out_h and w < out_w:
        tmp = np.empty((out_h, w, 3), dtype=np.uint8)
        _resize_crop(image, r0, r1, c0, c1, tmp)
        _resize_crop(tmp, 0, out_h, 0, w, dst)
    elif w > out_w and h < out_h:
        tmp = np.empty((h, out_w, 3), dtype=np.uint8)
        _resize_crop(image, r0, r1, c0, c1, tmp)
        _resize_crop(tmp, 0, h, 0, out_w, dst)
    else:
        _resize_crop(image, r0, r1, c0, c1, dst)


@numba.njit(nogil=True)
def _mirror(image: np.ndarray, horizontal: bool, vertical: bool) -> None:
    """Flip one ``(h, w, C)`` image in place, left-right and/or top-bottom."""
    h, w, c = image.shape
    if horizontal:
        for i in range(h):
            for j in range(w // 2):
                for k in range(c):
                    image[i, j, k], image[i, w - 1 - j, k] = image[i, w - 1 - j, k], image[i, j, k]
    if vertical:
        for i in range(h // 2):
            for j in range(w):
                for k in range(c):
                    image[i, j, k], image[h - 1 - i, j, k] = image[h - 1 - i, j, k], image[i, j, k]


@numba.njit(nogil=True)
def _crop_copy(image: np.ndarray, crop: np.ndarray, window: np.ndarray, dst: np.ndarray) -> None:
    """One axis-aligned copy of an ``(H, W, 3)`` uint8 image into ``dst`` ``(h, w, 3)``: its whole-pixel ``window``
    (``[r0, r1, c0, c1]``, :func:`regpipe.loaders._kernels.snap_windows`) resized by FFCV's C resize, mirrored
    where its matrix ``crop`` ``(2, 3)`` flips an axis (a negative diagonal entry)."""
    _resize_window(image, window[0], window[1], window[2], window[3], dst)
    _mirror(dst, crop[0, 0] < 0.0, crop[1, 1] < 0.0)


@numba.njit(nogil=True)
def _is_identity(t: np.ndarray) -> bool:
    return t[0, 0] == 1.0 and t[0, 1] == 0.0 and t[0, 2] == 0.0 and t[1, 0] == 0.0 and t[1, 1] == 1.0 and t[1, 2] == 0.0


@numba.njit(nogil=True)
def _crop_copies(image: np.ndarray, theta: np.ndarray, windows: np.ndarray, photo: np.ndarray,
                 dst: np.ndarray) -> None:
    """``M`` axis-aligned copies of one ``(H, W, 3)`` uint8 image into ``dst`` ``(M, h, w, 3)`` (:func:`_crop_copy`
    each), then each copy's colour change (skipped for factors 1)."""
    for j in range(dst.shape[0]):
        _crop_copy(image, theta[j], windows[j], dst[j])
        if photo[j, 0] != 1.0 or photo[j, 1] != 1.0:
            K.colour_u8(dst[j], photo[j, 0], photo[j, 1], photo[j, 2])


@numba.njit(nogil=True)
def _crop_warp_copies(image: np.ndarray, crop: np.ndarray, windows: np.ndarray, rest: np.ndarray,
                      photo: np.ndarray, dst: np.ndarray) -> None:
    """``M`` copies of one ``(H, W, 3)`` uint8 image into ``dst`` ``(M, h, w, 3)`` made in two steps: the crop
    (:func:`_crop_copy`: FFCV's resize of the window, antialiased), then the rest of the chain (``rest``
    ``(M, 2, 3)``, output -> crop frame: rotations, shears, scales, shifts) as a bilinear warp at the output
    size, zeros outside the crop (``K.warp_u8``; skipped for the identity), then the colour change."""
    crop_pixels = np.empty(dst.shape[1:], dtype=np.uint8)
    for j in range(dst.shape[0]):
        if _is_identity(rest[j]):
            _crop_copy(image, crop[j], windows[j], dst[j])
        else:
            _crop_copy(image, crop[j], windows[j], crop_pixels)
            K.warp_u8(crop_pixels, rest[j], dst[j])
        if photo[j, 0] != 1.0 or photo[j, 1] != 1.0:
            K.colour_u8(dst[j], photo[j, 0], photo[j, 1], photo[j, 2])


class Replicate(_EpochOp):
    """FFCV operation: ``M`` augmented copies of each ``(H, W, C)`` uint8 sample -> ``(M, H, W, C)``: in-batch
    replication (:class:`regpipe.ops.augment.Replicate`) inside the loader.

    Place it after the image decoder (``NDArrayDecoder`` / ``SimpleRGBImageDecoder``) and before
    ``ToTensor``; pass the same instance to :class:`FfcvLoader` (``replicate=``) with an ``index`` field in
    the loader, which rebuilds the recorded affines and colour factors from ``(seed, epoch, index)``.

    Args:
        m: copies per sample, ``>= 1``.
        augment: the regpipe chain to draw (flip, resized crop, affine, brightness/contrast, or any
            ``RandomTransform``: the kernels read each transform's draw table); ``augment.num_uniforms``
            counter-based uniforms per copy.
        include_original: copy 0 is the sample itself.
        seed: seed of the counter-based draws.
    """

    def __init__(self, m: int, augment: Augment, include_original: bool = True, seed: int = 0) -> None:
        super().__init__(seed)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (copies per sample) must be an integer >= 1, got {m!r}")
        self.m, self.augment, self.include_original = m, augment, include_original
        self.spec, self.count = K.encode_augment(augment)

    def params(self, indices: np.ndarray, height: int, width: int, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S*M, 2, 3)`` normalised output -> input matrices and ``(S*M, 2)`` brightness/contrast of the copies
        of samples ``indices`` (``(S,)``) in ``epoch`` (default: the current one), seed-contiguous."""
        indices = np.asarray(indices, dtype=np.int64)
        # what generate_code's K.augment_params draws: the output frame is the image's, windows in frame fractions
        theta, photo, _ = K.copy_params(self.seed, self.epoch if epoch is None else epoch, indices,
                                        np.full(len(indices), height, np.int64),
                                        np.full(len(indices), width, np.int64), self.spec, self.count, self.m, height,
                                        width, False, self.include_original, False)
        return (torch.from_numpy(theta).reshape(-1, 2, 3).float(),
                torch.from_numpy(photo[..., :2]).reshape(-1, 2).float())

    def generate_code(self) -> Callable:
        seed, address, spec, count, m, include_original = self.seed, self.epoch_address, self.spec, self.count, \
            self.m, self.include_original
        my_range = Compiler.get_iterator()
        params, counter, replicate_sample, load = K.augment_params, K.counter_uniforms, K.replicate_sample, K.load_int64

        def replicate(images, dst, indices):
            epoch = load(address)
            height, width = images.shape[1], images.shape[2]
            for i in my_range(images.shape[0]):
                u = np.empty((m, max(count, 1)))
                counter(seed, epoch, indices[i], u)
                theta = np.empty((m, 2, 3))
                photo = np.empty((m, 3))
                pixels = np.empty((m, 2, 3))
                params(u, spec, height, width, include_original, theta, photo, pixels)
                replicate_sample(images[i], theta, photo, dst[i])
            return dst[:images.shape[0]]

        replicate.is_parallel = True
        replicate.with_indices = True
        return replicate

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        _check_state("Replicate", previous_state, 3, (np.uint8,))
        shape = (self.m, *previous_state.shape)
        return replace(previous_state, shape=shape), AllocationQuery(shape, np.dtype(np.uint8))


class ReplicatedCropDecoder(_EpochOp, SimpleRGBImageDecoder):
    """FFCV decoder of an ``RGBImageField``: decodes each image once at its own resolution and emits ``M``
    independently augmented copies ``(M, h, w, 3)``: repeated augmentation (Hoffer et al. 2020,
    "Augment your batch"; timm's ``RepeatAugSampler`` reads the image ``M`` times instead) at the cost of a
    crop per copy, not a decode.

    Every copy is its own random-resized crop (the chain's ``RandomResizedCrop(size=(h, w))``: windows
    drawn as torchvision's, aspect in the source's pixels) with the rest of the chain. Its parameters come
    from counter-based uniforms of ``(seed, epoch, sample index)`` read through the transforms' draw
    tables, so :class:`FfcvLoader` rebuilds each copy's whole transform (crop included) from the indices
    FFCV hands the decoder, and records it in ``Batch.affine``; the epoch is the wrapper's (it sets it at
    each pass), so a run resumed at epoch ``e`` redraws epoch ``e``'s crops whatever the worker count.

    How the pixels are made is decided once per chain (:func:`regpipe.loaders._kernels.axis_aligned`):

    * crops and flips (the ImageNet recipe), with or without brightness/contrast: each copy's window is
      rounded to whole source pixels (the recorded matrix is the rounded window: edges move by at most half
      a source pixel against the drawn one) and resized by FFCV's own C resize, as
      ``RandomResizedCropRGBImageDecoder`` (OpenCV ``INTER_AREA``: a box filter over each output pixel's
      footprint when the window shrinks; when it grows, each source pixel's area spread over the output
      pixels, which is within half a neighbour step of bilinear sampling), then mirrored in place, then the
      colour change on the output pixels. A window that shrinks along one axis and grows along the other
      is resized one axis at a time, where OpenCV's one-pass resize would misplace the shrunk axis's
      samples; FFCV's decoder does resize it in one pass. Output pixel centres map to source points as
      with ``align_corners=False``, so the recorded matrix and the pixels agree to interpolation error;
    * crops and flips followed by rotations, shears, scales or shifts (:func:`regpipe.loaders._kernels.crop_split`:
      the ImageNet crop with a replication chain on top): two steps per copy, the crop's window resized
      as above (antialiased), then the rest of the chain as a bilinear warp of that crop at the output size
      (zeros outside the crop, as the device ``Replicate`` op warping a loader's crop;
      :func:`regpipe.loaders._kernels.warp_u8`). The recorded matrix is the two composed;
    * any other chain (a rotation before the crop, a second window): the whole chain composed into one
      bilinear warp from the decoded image (zeros outside, ``align_corners=False``, rounded:
      :func:`regpipe.loaders._kernels.warp_u8`, the torch op's ``grid_sample``; no antialiasing).

    Use it in place of ``RandomResizedCropRGBImageDecoder`` (it replaces that decoder and
    ``RandomHorizontalFlip``; ``m=1`` with ``Augment([RandomResizedCrop(size=(s, s)), RandomFlip()])`` is that
    pair with reproducible crops), before ``ToTensor``, and pass the same instance to :class:`FfcvLoader`
    (``replicate=``).

    Args:
        m: copies per image, ``>= 1``.
        augment: the chain; it must hold a sized ``RandomResizedCrop`` (the copies' size).
        include_original: copy 0 is the whole image resized (identity matrix).
        seed: seed of the counter-based draws.

    Attributes:
        axis_aligned: the chain is crops and flips: copies are FFCV resizes of whole-pixel windows.
        split: ``(rows, uniforms)`` of the crop part when a copy is a crop then a warp
            (:func:`regpipe.loaders._kernels.crop_split`), else ``None``.

    Raises:
        ValueError: ``m < 1`` or a chain without a sized crop.
        TypeError: a transform the kernels cannot run (named).
    """

    def __init__(self, m: int, augment: Augment, include_original: bool = False, seed: int = 0) -> None:
        _EpochOp.__init__(self, seed)
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"m (copies per image) must be an integer >= 1, got {m!r}")
        self.spec, self.count = K.encode_augment(augment)
        size = K.output_size(augment)
        if size is None:
            raise ValueError("ReplicatedCropDecoder needs the copies' size: put RandomResizedCrop(size=(h, w)) in "
                             "the chain")
        self.m, self.augment, self.include_original, self.size = m, augment, bool(include_original), size
        self.axis_aligned = K.axis_aligned(self.spec)
        self.split = None if self.axis_aligned else K.crop_split(self.spec)

    def source_sizes(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(S,)`` heights and widths of the stored images ``indices`` (the ``.beton``'s metadata)."""
        if self.metadata is None:
            raise ValueError("the decoder has not been given to an FFCV Loader yet (it reads the image sizes there)")
        rows = self.metadata[np.asarray(indices, dtype=np.int64)]
        return rows["height"].astype(np.int64), rows["width"].astype(np.int64)

    def params(self, indices: np.ndarray, height: int | None = None, width: int | None = None,
               epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S*M, 2, 3)`` normalised output -> source matrices and ``(S*M, 2)`` brightness/contrast of the copies of
        images ``indices`` in ``epoch`` (default: the current one), seed-contiguous (``height, width``: unused,
        the sources' sizes are read from the ``.beton``)."""
        indices = np.asarray(indices, dtype=np.int64)
        heights, widths = self.source_sizes(indices)
        rows, uniforms = self.split or (0, 0)
        theta, photo, _ = K.copy_params(self.seed, self.epoch if epoch is None else epoch, indices, heights, widths,
                                        self.spec, self.count, self.m, self.size[0], self.size[1], True,
                                        self.include_original, self.axis_aligned or self.split is not None, rows,
                                        uniforms)
        return (torch.from_numpy(theta).reshape(-1, 2, 3).float(),
                torch.from_numpy(photo[..., :2]).reshape(-1, 2).float())

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, AllocationQuery]]:
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        shape = (self.m, self.size[0], self.size[1], 3)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                (AllocationQuery(shape, np.dtype("<u1")), AllocationQuery((max_pixels * np.uint64(3),), np.dtype("<u1"))))

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        seed, address, spec, count, m, include_original = self.seed, self.epoch_address, self.spec, self.count, \
            self.m, self.include_original
        out_h, out_w = self.size
        counter, replicate_sample, geometry, load = K.counter_uniforms, K.replicate_sample, K.copy_geometry, \
            K.load_int64
        crop_copies, crop_warp_copies = _crop_copies, _crop_warp_copies
        aligned = self.axis_aligned
        rows, uniforms = self.split or (0, 0)
        snap = aligned or rows > 0  # the crop's window resized by FFCV: rounded to whole source pixels

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            epoch = load(address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                u = np.empty((m, max(count, 1)))
                counter(seed, epoch, source_ix, u)
                theta = np.empty((m, 2, 3))
                photo = np.empty((m, 3))
                crop = np.empty((m, 2, 3))
                rest = np.empty((m, 2, 3))
                windows = np.empty((m, 4), dtype=np.int64)
                geometry(u, spec, rows, uniforms, int(height), int(width), out_h, out_w, True, include_original, snap,
                         theta, photo, crop, rest, windows)
                if aligned:  # crops and flips: FFCV's resize of each whole-pixel window
                    crop_copies(image, theta, windows, photo, destination[dst_ix])
                elif rows > 0:  # the crop resized by FFCV, then the rest of the chain warped at the output size
                    crop_warp_copies(image, crop, windows, rest, photo, destination[dst_ix])
                else:
                    replicate_sample(image, theta, photo, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class WithIndices(Operation):
    """FFCV operation for the label pipeline: integer labels ``(N,)``/``(N, 1)`` -> ``(N, 2)`` int64 rows
    ``[label, sample index]``, from the indices FFCV hands every operation, so an image + label ``.beton``
    (no ``index`` field) gives :class:`FfcvLoader` each row's dataset id: ``[IntDecoder(), WithIndices(), ToTensor()]``.
    """

    def generate_code(self) -> Callable:
        def with_indices(labels, dst, indices):
            n = labels.shape[0]
            for i in range(n):
                dst[i, 0] = labels[i].reshape(-1)[0]
                dst[i, 1] = indices[i]
            return dst[:n]

        with_indices.with_indices = True
        return with_indices

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        _check_int_labels("WithIndices", previous_state)
        return (replace(previous_state, shape=(2,), dtype=np.dtype(np.int64)),
                AllocationQuery((2,), np.dtype(np.int64)))


def _tensor(value: Any) -> torch.Tensor:
    """An FFCV output (numpy array or tensor, often a reused buffer) as a tensor that owns its memory."""
    t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    return t.clone() if t.device.type == "cpu" else t


class FfcvLoader(BuilderAdapter):
    """Wrap an FFCV ``Loader`` so it yields regpipe :class:`Batch` es with regpipe's device ops applied.

    The loader's outputs are named by its fields (the ``.beton``'s order). Per batch: images ``(N, H, W, C)``
    (``(N, M, H, W, C)`` from :class:`Replicate` or :class:`ReplicatedCropDecoder`; ``(N, C, H, W)`` after
    ``ToTorchImage``) become ``(N*M, C, H, W)`` rows (declared as ``Batch.replicas = M``), labels/ids are
    repeated per copy, the recorded affines and colour factors of the replication are rebuilt from the samples'
    indices, then the shared builder moves, normalises (or, with a mixing first op, converts, normalises and
    mixes in one fused pass) and checks as the torch and DALI adapters do, and ``ops`` run.

    Each row's dataset id is the sample's index in the ``.beton``: from the label pipeline's
    :class:`WithIndices` (an image + label ``.beton`` works as it is) or an ``index`` field; never from the
    row's position when there are copies.

    Args:
        loader: an ``ffcv.loader.Loader``.
        num_classes: ``K``.
        replicate: the :class:`Replicate` or :class:`ReplicatedCropDecoder` in the image pipeline, if any.
        image_field, label_field, index_field: field names.
        device, ops, mean, std, channels_last, non_blocking, keep_uint8, executor: as :class:`TorchLoader`.
        start_epoch: the epoch of the first pass (a resumed run's): the operations' counter-based draws
            are keyed by it, one epoch per pass.

    Raises:
        ValueError: a needed field is missing from the loader, or the samples' indices are needed and
            neither an ``index`` field nor :class:`WithIndices` gives them (named).
        TypeError: a field of the wrong type in the ``.beton`` (named).
    """

    def __init__(self, loader: Loader, num_classes: int, *, replicate: Replicate | ReplicatedCropDecoder | None = None,
                 image_field: str = "image", label_field: str = "label", index_field: str = "index",
                 device: torch.device | str = "cpu", ops: Sequence[Op] = (), mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, channels_last: bool = False, non_blocking: bool = True,
                 keep_uint8: bool = False, executor: str = "auto", start_epoch: int = 0) -> None:
        if not isinstance(loader, Loader):
            raise TypeError(f"loader must be an ffcv.loader.Loader, got {type(loader).__name__}")
        self.loader = loader
        self.names = list(loader.pipeline_specs)
        check_outputs(self.names, [image_field, label_field], "the FFCV loader")
        label_spec = loader.pipeline_specs[label_field]
        self.label_indices = any(isinstance(op, WithIndices) for op in [label_spec.decoder, *label_spec.transforms])
        if replicate is not None and index_field not in self.names and not self.label_indices:
            raise ValueError(f"the FFCV loader gives no sample indices (no {index_field!r} field, no WithIndices in "
                             f"the {label_field!r} pipeline): the copies' ids and transforms need them. Use "
                             f"[IntDecoder(), WithIndices(), ToTensor()] for {label_field!r} "
                             "(regpipe.loaders.ffcv.WithIndices)")
        handlers = loader.reader.handlers
        kinds = {image_field: (NDArrayField, RGBImageField), label_field: (IntField,), index_field: (IntField,)}
        for name, allowed in kinds.items():
            if name in handlers and not isinstance(handlers[name], allowed):
                raise TypeError(f"field {name!r} of {loader.fname} is a {type(handlers[name]).__name__}; regpipe "
                                f"needs {' or '.join(a.__name__ for a in allowed)}")
        self.builder = BatchBuilder(num_classes, device=device, ops=ops, mean=mean, std=std,
                                    channels_last=channels_last, non_blocking=non_blocking, keep_uint8=keep_uint8,
                                    executor=executor)
        self.replicate = replicate
        self.image_field, self.label_field, self.index_field = image_field, label_field, index_field
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        self.epoch = start_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next pass draws for (counts on by one per pass): a resumed run sets its epoch, so the
        replication redraws that epoch's parameters.

        Raises:
            ValueError: a negative or non-integer epoch (named).
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def to_batch(self, outputs: Sequence[Any], position: int = 0, epoch: int | None = None,
                 raw: bool = False) -> Batch:
        """One FFCV output tuple (in field order) -> :class:`Batch` (no ops applied; ``raw``: uint8 images stay
        uint8 for the fused stage of :meth:`apply`)."""
        if len(outputs) != len(self.names):
            raise ValueError(f"the FFCV loader yielded {len(outputs)} arrays for fields {self.names}")
        named = dict(zip(self.names, outputs))
        epoch = self.epoch if epoch is None else epoch
        images = _tensor(named[self.image_field])
        if images.dim() == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.permute(0, 2, 3, 1)  # ToTorchImage already gave (N, C, H, W)
        if images.dim() not in (4, 5):
            raise ValueError(f"FFCV images must be (N, H, W, C) or (N, M, H, W, C), got {tuple(images.shape)}")
        check_decoded_images(images, "the FFCV pipeline", self.builder.keep_uint8, self.builder.mean is not None)
        s = images.shape[0]
        m = images.shape[1] if images.dim() == 5 else 1
        height, width = images.shape[-3], images.shape[-2]
        x = images.reshape(s * m, height, width, images.shape[-1]).permute(0, 3, 1, 2)
        labels = _tensor(named[self.label_field])
        indices = _tensor(named[self.index_field]).reshape(-1).long() if self.index_field in named else None
        if self.label_indices:
            if labels.dim() != 2 or labels.shape[1] != 2:
                raise ValueError(f"WithIndices gives (N, 2) [label, index] rows, got labels of shape "
                                 f"{tuple(labels.shape)}")
            indices = labels[:, 1].long()
            labels = labels[:, :1]
        affine = photometric = None
        labels = labels.reshape(s, -1)
        if labels.shape[1] != 1:
            raise ValueError(f"labels must be (N,) = ({s},), got {tuple(named[self.label_field].shape)}")
        labels = labels[:, 0].repeat_interleave(m)
        if indices is None and m > 1:
            raise ValueError("the FFCV batch has copies but no sample indices: add WithIndices() to the label "
                             "pipeline or an index field")
        ids = indices.repeat_interleave(m) if indices is not None else None
        if self.replicate is not None:
            if m != self.replicate.m:
                raise ValueError(f"the image field holds {m} copies per sample, Replicate makes {self.replicate.m}")
            affine, photometric = self.replicate.params(indices.numpy(), height, width, epoch)
        # (N, M, H, W, C) images: M copies per sample, made at decode: declared on the batch
        if m > 1:
            self.builder._log(self.replicate or self, f"replicate[ffcv] {m} copies per image")
        return self.builder.build(x, labels, ids, position, affine=affine, photometric=photometric, replicas=m,
                                  raw=raw)

    def apply(self, batch: Batch) -> Batch:
        """Run the ops on a batch."""
        return self.builder.apply(batch)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        if self.replicate is not None:
            self.replicate.set_epoch(epoch)
        if isinstance(self.replicate, ReplicatedCropDecoder) and self.replicate.metadata is None:
            raise ValueError("the ReplicatedCropDecoder given to FfcvLoader is not the one in the loader's image "
                             "pipeline")
        self.epoch += 1
        position = 0
        threads = torch.get_num_threads()
        for outputs in self.loader:
            # FFCV's epoch thread sets torch's thread count to the loader's worker count when it starts, after
            # iter() returned: set it back before each batch is used, so this process keeps its thread count
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            batch = self.to_batch(outputs, position, epoch, raw=True)
            position += batch.size
            yield self.apply(batch)


def write_beton(path: str | Path, images: Any, labels: Any, ids: Any = None, num_workers: int = 1) -> Path:
    """Write ``(N, C, H, W)`` uint8 (or float32) images and ``(N,)`` integer labels to a ``.beton`` with fields
    ``image`` (``NDArrayField`` ``(H, W, C)``: exact, any channel count), ``label`` and ``index``
    (``IntField``; ``ids``, default ``0..N-1``). Written atomically (:func:`regpipe.core.files.atomic_write`),
    after removing what killed writes of the same file left.

    Raises:
        TypeError: images are not uint8/float32 or labels not integers (the wrong field type is named).
        ValueError: shapes disagree.
        IsADirectoryError: ``path`` is a folder.
    """
    path = Path(path)
    _check_beton_path(path)
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    if images.dtype not in (torch.uint8, torch.float32):
        raise TypeError(f"field 'image' must be uint8 (or float32) images, got {images.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"field 'label' must be integer labels, got {labels.dtype}")
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    hwc = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
    lab = labels.long().numpy()
    index = np.arange(len(lab)) if ids is None else torch.as_tensor(ids).long().reshape(-1).numpy()
    if index.shape != lab.shape:
        raise ValueError(f"ids must be (N,) = ({len(lab)},), got {tuple(index.shape)}")

    class _Rows:
        def __len__(self) -> int:
            return len(hwc)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
            return hwc[i], int(lab[i]), int(index[i])

    fields = {"image": NDArrayField(dtype=hwc.dtype, shape=hwc.shape[1:]), "label": IntField(), "index": IntField()}
    remove_stale_temporaries(path)
    return atomic_write(path, lambda tmp: DatasetWriter(str(tmp), fields, num_workers=num_workers)
                        .from_indexed_dataset(_Rows()))


def write_rows(path: str | Path, dataset: Any, num_workers: int = 1) -> Path:
    """Write every row of a map-style dataset yielding ``(image (C, H, W), label, index)`` (e.g.
    ``regpipe.engine.data.ArrayDataset``; its batched ``__getitems__`` is used when present) with
    :func:`write_beton`.

    Raises:
        ValueError: an empty dataset.
    """
    from torch.utils.data import default_collate

    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to write")
    rows = list(range(len(dataset)))
    fetch = getattr(dataset, "__getitems__", None)
    samples = fetch(rows) if fetch is not None else [dataset[i] for i in rows]
    images, labels, ids = default_collate(samples)[:3]
    return write_beton(path, images, labels, ids=ids, num_workers=num_workers)


class _FirstFailure:
    """The first error met by any of FFCV's writer processes, readable by the parent.

    FFCV's ``DatasetWriter`` parent waits until its shared counter of written rows reaches the dataset's
    length; a worker that raises dies without counting its rows, so the parent waits forever. The rows
    therefore never raise in a worker: the first failure is recorded here (a shared, locked byte buffer,
    which FFCV's ``Process`` arguments carry to every worker under fork or spawn) and the parent raises it
    once the writer returns.
    """

    SIZE = 4096  # bytes of message kept: a long path and its error

    def __init__(self) -> None:
        self._buffer = multiprocessing.Array(ctypes.c_char, self.SIZE)

    def record(self, message: str) -> None:
        """Keep ``message`` unless a failure was recorded already (the first one is the one reported)."""
        with self._buffer.get_lock():
            if not self._buffer.value:
                self._buffer.value = message.encode()[:self.SIZE - 1]

    @property
    def message(self) -> str | None:
        """The recorded failure, or ``None``."""
        with self._buffer.get_lock():
            value = self._buffer.value
        return value.decode(errors="replace") or None


class _FolderImages:
    """Map-style ``(RGB image (H, W, 3) uint8, label[, id])`` rows of a :class:`FileIndex`, in id order (picklable
    for FFCV's writer).

    A file that does not decode is recorded in :attr:`failure` (``"cannot decode image PATH: reason"``) and
    from then on every row, in every worker, is a 1 x 1 black image without decoding anything: FFCV's parent
    only returns once every row is written (see :class:`_FirstFailure`), so the rest of the pass is made as
    cheap as possible; the caller raises the failure and deletes the file.
    """

    def __init__(self, index: FileIndex, with_ids: bool) -> None:
        self.index, self.with_ids = index, with_ids
        self.failure = _FirstFailure()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        from PIL import Image

        row: tuple[Any, ...] | None = None
        if self.failure.message is None:
            path = self.index.path(i)
            try:
                with Image.open(path) as image:
                    row = np.array(image.convert("RGB")), int(self.index.labels[i])
            except Exception as err:  # anything escaping a worker hangs FFCV's parent
                self.failure.record(f"cannot decode image {path}: {err}")
        if row is None:
            row = np.zeros((1, 1, 3), np.uint8), int(self.index.labels[i])
        return (*row, int(i)) if self.with_ids else row


def _check_beton_path(path: Path) -> None:
    """Refuse, before any work, a ``.beton`` path that names a folder (the final rename would fail)."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the .beton file to write")


def write_image_folder(root: str | Path | FileIndex, path: str | Path, *, max_resolution: int | None = None,
                       jpeg_quality: int = 90, write_mode: str = "jpg", compress_probability: float = 0.5,
                       num_workers: int = 1, index_field: bool = False) -> tuple[Path, FileIndex]:
    """Write an ImageNet-layout folder (``ROOT/CLASS/IMAGE``) to a ``.beton`` with the fields ``image``
    (``RGBImageField``) and ``label`` (``IntField``): the layout of ffcv-imagenet's ``write_imagenet.py``.

    Sample ``i`` is ``FileIndex(root).paths[i]``, so its index in the ``.beton`` is the id DALI's
    :func:`regpipe.loaders.dali.sample_ids` and the streamed training (``--data imagefolder:``) give the same
    file; labels are the sorted class folders. The file is written under a temporary name and then renamed, so
    an interrupted write leaves no partial ``.beton`` at ``path``; the temporary files of killed writes of
    ``path`` (their process gone) are removed first, a live writer's are kept.

    Args:
        root: the image folder, or its :class:`FileIndex` (possibly a subset: its rows in order).
        path: the ``.beton`` to write (its folder is created).
        max_resolution: longest side kept (larger images are shrunk, ``INTER_AREA``); ``None``: full size.
        jpeg_quality: JPEG quality of re-encoded images, 1..100.
        write_mode: ``"raw"``, ``"jpg"``, ``"smart"`` or ``"proportion"`` (FFCV's ``RGBImageField`` modes).
        compress_probability: share of images stored as JPEG in ``"proportion"`` mode.
        num_workers: FFCV writer processes.
        index_field: also write an ``IntField`` ``index``, each row's id (its position).

    Returns:
        The ``.beton`` path and the :class:`FileIndex` (paths, labels, classes).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        IsADirectoryError: ``path`` is a folder.
        ValueError: an empty folder, a bad mode, quality or resolution (the value is named), or an image that
            does not decode (a corrupt or truncated file, a text file named ``.jpg``): the first one met is
            named, the writer stops at the end of its pass (the remaining rows are not decoded) and nothing is
            left at ``path``.
        ImportError: Pillow is not installed, or fails to import.
    """
    if write_mode not in ("raw", "jpg", "smart", "proportion"):
        raise ValueError(f"write_mode must be 'raw', 'jpg', 'smart' or 'proportion', got {write_mode!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in 1..100, got {jpeg_quality!r}")
    if max_resolution is not None and (isinstance(max_resolution, bool) or not isinstance(max_resolution, int)
                                       or max_resolution < 1):
        raise ValueError(f"max_resolution must be a positive integer or None, got {max_resolution!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    require("PIL", needed_by="write_image_folder")  # decodes the images: said before anything is written
    path = Path(path)
    _check_beton_path(path)
    index = root if isinstance(root, FileIndex) else FileIndex(root)
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                     compress_probability=compress_probability), "label": IntField()}
    if index_field:
        fields["index"] = IntField()
    rows = _FolderImages(index, index_field)

    def write(tmp: Path) -> None:
        DatasetWriter(str(tmp), fields, num_workers=num_workers).from_indexed_dataset(rows)
        if rows.failure.message is not None:
            raise ValueError(rows.failure.message)

    remove_stale_temporaries(path)  # the leftovers of a killed write of this file
    atomic_write(path, write)
    return path, index
