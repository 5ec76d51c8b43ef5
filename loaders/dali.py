"""NVIDIA DALI adapter: helpers for a user's ``pipeline_def`` and an iterator that yields regpipe ``Batch`` es.

Add regpipe to an existing DALI pipeline in a few lines::

    from regpipe.loaders.dali import DaliLoader, replicate
    from regpipe.ops.augment import Augment, RandomAffine, RandomFlip

    @pipeline_def(batch_size=32, num_threads=4, device_id=0)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=root, name="reader")
        images = fn.decoders.image(jpegs)                                  # (H, W, C) uint8
        rep = replicate(images, m=4, augment=Augment([RandomFlip(), RandomAffine(degrees=15)]))
        return rep.images, labels, rep.affine, rep.photometric             # (4, H, W, C) per sample

    batches = DaliLoader(pipe(), num_classes=10, output_map=["images", "labels", "affine", "photometric"],
                         ops=[GradualSumMix(k0=4, gradual_steps=1000)], reader_name="reader")

Conventions: images leave DALI as ``HWC`` (or ``FHWC`` with ``M`` copies per sample); the loader
flattens the copies seed-contiguously (row ``s*M + j`` is copy ``j`` of seed ``s``, as
:class:`~regpipe.ops.augment.Replicate`), repeats labels and ids, and converts the recorded pixel
matrices (``warp_affine`` with ``inverse_map=True``) to regpipe's normalised convention with
:func:`~regpipe.functional.augment.affine_from_pixels`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import torch

from regpipe.core.batch import Batch
from regpipe.core.optional import require
from regpipe.functional.augment import affine_from_pixels
from regpipe.loaders import _kernels as K
from regpipe.loaders.common import BatchBuilder, BuilderAdapter, Op, check_decoded_images, check_outputs
from regpipe.loaders.file_index import FileIndex, lookup_id
from regpipe.ops.augment import Augment

# DALI is an optional dependency (the `dali` extra): missing, or installed but broken, is said before the
# imports below, which then only fail on a DALI too old for them
require("nvidia.dali", needed_by="regpipe.loaders.dali")
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali.pipeline import DataNode, Pipeline
from nvidia.dali.plugin.numba.fn.experimental import numba_function
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

__all__ = ["DaliLoader", "Replicas", "replicate", "sample_ids", "ArraySource", "REQUIRED", "OPTIONAL"]

#: outputs every pipeline must name in the iterator's ``output_map``
REQUIRED = ("images", "labels")
#: outputs the loader reads when present
OPTIONAL = ("ids", "theta", "affine", "photometric", "targets")


@dataclass(frozen=True)
class Replicas:
    """Pipeline outputs of :func:`replicate`, per sample.

    Attributes:
        images: ``(M, H, W, C)`` uint8 copies (layout ``FHWC``; ``H, W`` the chain's output size when it has a
            sized crop, else the sample's).
        affine: ``(M, 2, 3)`` float32 output -> input matrices in *pixel* coordinates (what ``warp_affine``
            ran with); the loader converts them with ``affine_from_pixels`` (same-size copies only).
        photometric: ``(M, 2)`` float32 brightness and contrast factors.
        uniforms: ``(M, P)`` float32 uniforms the parameters came from: ``augment.from_uniforms`` gives the
            same parameter records (``Augment.apply`` replays the copies).
        theta: ``(M, 2, 3)`` float32 output -> source matrices in regpipe's normalised convention (frame-size
            free, so right for copies of any size): name it ``theta`` in the output map.
    """

    images: DataNode
    affine: DataNode
    photometric: DataNode
    uniforms: DataNode
    theta: DataNode


@numba.njit
def _write_rois(theta: np.ndarray, roi_out: np.ndarray) -> None:
    """``(M, 2, 3)`` axis-aligned matrices -> ``(M, 4)`` relative regions of interest ``[y0, x0, y1, x1]`` of DALI's
    ``resize``: ``x_in = t00 x + t02`` (normalised) spans ``[(1 + t02 - t00) / 2, (1 + t02 + t00) / 2]`` (start >
    end for a flip: DALI's resize then mirrors), ``y`` alike."""
    for j in range(theta.shape[0]):
        roi_out[j, 0] = (1.0 + theta[j, 1, 2] - theta[j, 1, 1]) / 2.0
        roi_out[j, 1] = (1.0 + theta[j, 0, 2] - theta[j, 0, 0]) / 2.0
        roi_out[j, 2] = (1.0 + theta[j, 1, 2] + theta[j, 1, 1]) / 2.0
        roi_out[j, 3] = (1.0 + theta[j, 0, 2] + theta[j, 0, 0]) / 2.0


@numba.njit
def _write_params(pixels: np.ndarray, photo: np.ndarray, theta: np.ndarray, pixels_out: np.ndarray,
                  photo_out: np.ndarray, theta_out: np.ndarray) -> None:
    """Copy the float64 parameters into DALI's float32 outputs (the factors without their pivot)."""
    for j in range(theta.shape[0]):
        for r in range(2):
            for q in range(3):
                pixels_out[j, r, q] = pixels[j, r, q]
                theta_out[j, r, q] = theta[j, r, q]
        photo_out[j, 0] = photo[j, 0]
        photo_out[j, 1] = photo[j, 1]


def _params_fn(spec: np.ndarray, include_original: bool, out_size: tuple[int, int] | None, rois: bool):
    """numba run function: (uniforms (M, P), shape (3,)) -> pixel matrices (M, 2, 3), factors (M, 2), normalised
    matrices (M, 2, 3) by :func:`regpipe.loaders._kernels.chain_params`, and with ``rois`` the copies' regions of
    interest (M, 4) (:func:`_write_rois`: crops and flips only)."""
    params, write, write_rois = K.chain_params, _write_params, _write_rois
    sized = out_size is not None
    out_h, out_w = out_size if sized else (0, 0)

    def copies(u, shape):
        m = u.shape[0]
        theta, photo, pixels = np.empty((m, 2, 3)), np.empty((m, 3)), np.empty((m, 2, 3))
        height, width = shape[0], shape[1]
        oh, ow = (out_h, out_w) if sized else (height, width)
        params(u.astype(np.float64), spec, height, width, oh, ow, sized, include_original, theta, photo, pixels)
        return pixels, photo, theta

    compiled = numba.njit(copies)
    if not rois:
        def run(pixels_out, photo_out, theta_out, u, shape):
            pixels, photo, theta = compiled(u, shape)
            write(pixels, photo, theta, pixels_out, photo_out, theta_out)
        return run

    def run_with_rois(pixels_out, photo_out, theta_out, roi_out, u, shape):
        pixels, photo, theta = compiled(u, shape)
        write(pixels, photo, theta, pixels_out, photo_out, theta_out)
        write_rois(theta, roi_out)
    return run_with_rois


def _split_params_fn(spec: np.ndarray, include_original: bool, out_size: tuple[int, int], rows: int, uniforms: int):
    """numba run function of a chain split by :func:`regpipe.loaders._kernels.crop_split`: (uniforms (M, P),
    shape (3,)) -> the whole copies' pixel matrices (M, 2, 3), factors (M, 2) and normalised matrices (M, 2, 3),
    then the crop parts' regions of interest (M, 4) and the rest's pixel matrices at the output size (M, 2, 3),
    by :func:`regpipe.loaders._kernels.crop_rest_params`."""
    split, compose, to_pixels = K.crop_rest_params, K.compose_copies, K.pixel_matrices
    write, write_rois = _write_params, _write_rois
    out_h, out_w = out_size

    def run(pixels_out, photo_out, theta_out, roi_out, rest_out, u, shape):
        m = u.shape[0]
        crop, rest, rest_pixels = np.empty((m, 2, 3)), np.empty((m, 2, 3)), np.empty((m, 2, 3))
        photo, theta, pixels = np.empty((m, 3)), np.empty((m, 2, 3)), np.empty((m, 2, 3))
        height, width = shape[0], shape[1]
        split(u.astype(np.float64), spec, rows, uniforms, height, width, out_h, out_w, True, include_original, crop,
              rest, photo, rest_pixels)
        compose(crop, rest, theta)
        to_pixels(theta, height, width, out_h, out_w, pixels)
        write(pixels, photo, theta, pixels_out, photo_out, theta_out)
        write_rois(crop, roi_out)
        for j in range(m):
            for r in range(2):
                for q in range(3):
                    rest_out[j, r, q] = rest_pixels[j, r, q]
    return run


#: output kinds of the parameter functions (:func:`_setup_fn`)
_MATRICES, _FACTORS, _ROIS = 0, 1, 2


def _setup_fn(kinds: tuple[int, ...]):
    """numba setup function: output ``o`` of a sample with ``M`` copies is ``(M, 2, 3)`` (``_MATRICES``), ``(M, 2)``
    (``_FACTORS``) or ``(M, 4)`` (``_ROIS``), ``M`` read from the uniforms' shape."""
    def setup(outs, ins):
        for i in range(len(outs[0])):
            m = ins[0][i][0]
            for o in range(len(outs)):
                outs[o][i][0] = m
                if kinds[o] == _MATRICES:
                    outs[o][i][1] = 2
                    outs[o][i][2] = 3
                elif kinds[o] == _FACTORS:
                    outs[o][i][1] = 2
                else:
                    outs[o][i][1] = 4
    return setup


def _parameters(u: DataNode, shape: DataNode, run_fn: Any, kinds: tuple[int, ...]) -> tuple[DataNode, ...]:
    """The copies' parameters from their uniforms and the sample's shape: one CPU ``numba_function`` running
    ``run_fn``, float32 outputs of the ``kinds`` given (:func:`_setup_fn`)."""
    return numba_function(u, shape, run_fn=run_fn, setup_fn=_setup_fn(kinds), out_types=[types.FLOAT] * len(kinds),
                          in_types=[types.FLOAT, types.INT64], outs_ndim=[3 if k == _MATRICES else 2 for k in kinds],
                          ins_ndim=[2, 1], device="cpu")


def _roi_resizes(images: DataNode, roi: DataNode, m: int, size: tuple[int, int]) -> DataNode:
    """``M`` copies of each sample, copy ``j`` DALI's ``resize`` of its region of interest ``roi[j]`` (``(M, 4)``,
    :func:`_write_rois`; linear, antialiased, as ``fn.random_resized_crop``; a flip is a reversed ROI), stacked
    ``FHWC``."""
    copies = [fn.resize(images, size=list(size), roi_start=roi[j, 0:2], roi_end=roi[j, 2:4], roi_relative=True,
                        interp_type=types.INTERP_LINEAR) for j in range(m)]
    return fn.stack(*copies, axis_name="F")


def _colour(images: DataNode, photo: DataNode, m: int, pivot: float) -> DataNode:
    """Each copy's brightness ``b`` and contrast ``c`` (``photo`` ``(M, 2)``): ``b * (p + c * (x - p))`` with the
    pivot ``p`` fixed (DALI's ``brightness_contrast``) or each copy's mean (``MEAN_PIVOT``, as the torch op and
    the FFCV kernel: a per-frame mean, then the same formula in DALI's arithmetic, rounded and saturated to
    uint8 by the cast)."""
    if pivot > K.MEAN_PIVOT:
        return fn.brightness_contrast(images, brightness=fn.per_frame(photo[:, 0]),
                                      contrast=fn.per_frame(photo[:, 1]), contrast_center=pivot)
    gpu = images.device == "gpu"
    b, c = (fn.reshape(photo[:, i], shape=[m, 1, 1, 1]) for i in (0, 1))
    if gpu:  # arithmetic needs its tensor inputs on one device
        b, c = b.gpu(), c.gpu()
    centre = fn.reshape(fn.reductions.mean(images, axes=[1, 2, 3], dtype=types.FLOAT), shape=[m, 1, 1, 1])
    return fn.cast(b * (centre + c * (images - centre)), dtype=types.UINT8)


def replicate(images: DataNode, m: int, augment: Augment, include_original: bool = True,
              uniforms: DataNode | None = None) -> Replicas:
    """Inside a ``pipeline_def``: ``M`` augmented copies of each ``(H, W, C)`` uint8 sample, parameters recorded.

    The random draws are ``augment.num_uniforms`` uniforms per copy: ``uniforms`` when given, else
    ``fn.random.uniform`` (DALI's seeded generator). A numba kernel reads the transforms' draw tables (the
    one definition the torch op reads too) to turn them into the chain's matrices and colour factors; the
    ``M`` copies are one ``fn.stack`` and one ``warp_affine`` with per-frame matrices (linear, zeros
    outside), then the colour change with per-frame factors.

    With a sized crop in the chain (``RandomResizedCrop(size=(h, w))``: the ImageNet recipe, repeated
    augmentation of Hoffer et al. 2020) the samples may have any size (straight from
    ``fn.decoders.image``): every copy is its own random-resized crop of the decoded image at full
    resolution (windows in the source's pixel aspect, as torchvision), resized to ``(h, w)``, and
    ``theta`` records each copy's whole transform, crop included. How a copy is made:

    * crops and flips (the ImageNet recipe): DALI's own ``resize`` of the copy's region of interest
      (linear, antialiased, as ``fn.random_resized_crop``; a flip is a reversed ROI);
    * crops and flips followed by rotations, shears, scales or shifts (the ImageNet crop with a replication
      chain on top, :func:`regpipe.loaders._kernels.crop_split`): that ROI ``resize``, then one ``warp_affine``
      of the crops at the output size with the rest of the chain (bilinear, zeros outside the crop, as the
      device ``Replicate`` op warping a loader's crop); ``theta`` is the two composed;
    * any other chain: one ``warp_affine`` per copy with the composed matrix from the decoded image
      (bilinear, no antialiasing: the torch op's ``grid_sample``).

    Args:
        images: ``HWC`` uint8 samples (CPU or GPU), of one size or (with a sized crop) of any sizes.
        m: copies per sample, ``>= 1``.
        augment: the regpipe chain to draw (flip, resized crop, affine, brightness/contrast). A colour
            transform's contrast pivots at its ``center``, or at each copy's mean (``center=None``).
        include_original: copy 0 is the sample itself (with a sized crop: the whole image resized).
        uniforms: ``(M, augment.num_uniforms)`` float32 uniforms in ``[0, 1)`` per sample (CPU), e.g. counter-based
            ones of ``(seed, epoch, index)`` fed by ``fn.external_source`` so that a resumed run redraws an
            epoch's copies; ``None``: ``fn.random.uniform``.

    Raises:
        ValueError: ``m < 1``.
        TypeError: a transform DALI cannot run (named).
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (copies per sample) must be an integer >= 1, got {m!r}")
    spec, count = K.encode_augment(augment)
    pivot = K.colour_pivot(spec)
    size = K.output_size(augment)
    aligned = K.axis_aligned(spec)
    split = None if size is None or aligned else K.crop_split(spec)
    u = uniforms if uniforms is not None else \
        fn.random.uniform(range=[0.0, 1.0], shape=[m, max(count, 1)], dtype=types.FLOAT)
    shape = images.shape(dtype=types.INT64)
    if split is not None:
        # the ImageNet crop as DALI's ROI resize, then the rest of the chain warped at the output size
        pixels, photo, theta, roi, rest = _parameters(u, shape, _split_params_fn(spec, include_original, size, *split),
                                                      (_MATRICES, _FACTORS, _MATRICES, _ROIS, _MATRICES))
        out = fn.warp_affine(_roi_resizes(images, roi, m, size), matrix=fn.per_frame(rest), inverse_map=True,
                             fill_value=0, interp_type=types.INTERP_LINEAR)
    elif size is not None and aligned:  # crops and flips: DALI's own ROI resize of the decoded image
        pixels, photo, theta, roi = _parameters(u, shape, _params_fn(spec, include_original, size, rois=True),
                                                (_MATRICES, _FACTORS, _MATRICES, _ROIS))
        out = _roi_resizes(images, roi, m, size)
    else:
        pixels, photo, theta = _parameters(u, shape, _params_fn(spec, include_original, size, rois=False),
                                           (_MATRICES, _FACTORS, _MATRICES))
        frames = fn.stack(*([images] * m), axis_name="F")
        warp_args: dict[str, Any] = {} if size is None else {"size": list(size)}
        out = fn.warp_affine(frames, matrix=fn.per_frame(pixels), inverse_map=True, fill_value=0,
                             interp_type=types.INTERP_LINEAR, **warp_args)
    if pivot is not None:
        out = _colour(out, photo, m, pivot)
    return Replicas(images=out, affine=pixels, photometric=photo, uniforms=u, theta=theta)


def _ids_fn(index: FileIndex):
    hashes, ids, lookup = index.hashes, index.hash_ids, lookup_id

    def run(out, info):
        out[0] = lookup(info, hashes, ids)
    return run


def _ids_setup(outs, ins):
    for i in range(len(outs[0])):
        outs[0][i][0] = 1


def sample_ids(encoded: DataNode, index: FileIndex) -> DataNode:
    """Inside a ``pipeline_def``: each sample's dataset id, from the reader itself (never from its position).

    ``fn.readers.file`` outputs no index, but every sample it reads carries its *source info*, the path
    relative to ``file_root`` (``fn.get_property(encoded, key="source_info")``); a numba function looks
    its :func:`~regpipe.loaders.file_index.path_hash` up in ``index`` (built from the same ``file_root``)
    and returns the id: the path's position in the listing (classes in order, files sorted), the id
    :func:`~regpipe.loaders.ffcv.write_image_folder` gives the same file in a ``.beton``. A path
    missing from ``index`` gives -1, which :class:`DaliLoader` reports as an error.

    Args:
        encoded: the reader's encoded samples (before decoding; CPU).
        index: :class:`~regpipe.loaders.file_index.FileIndex` of the reader's ``file_root``.

    Returns:
        ``(1,)`` int64 per sample: name it ``ids`` in the output map.
    """
    if not isinstance(index, FileIndex):
        raise TypeError(f"index must be a regpipe FileIndex of the reader's file_root, got {type(index).__name__}")
    info = fn.get_property(encoded, key="source_info")
    return numba_function(info, run_fn=_ids_fn(index), setup_fn=_ids_setup, out_types=[types.INT64],
                          in_types=[types.UINT8], outs_ndim=[1], ins_ndim=[1], device="cpu")


class ArraySource:
    """An ``fn.external_source`` feed (``batch=True``, three outputs: ``HWC`` images, ``(1,)`` int64 labels, ``(1,)``
    int64 ids) over a map-style dataset, one epoch per ``iter()``.

    Args:
        dataset: yields ``(image (C, H, W) uint8 or float32 tensor, label, index)`` (e.g. ``regpipe.engine.data.ArrayDataset``;
            its batched ``__getitems__`` is used when present).
        batch_sampler: iterable of index lists, asked again every epoch (a torch ``BatchSampler``, a recipe's
            sampler, regpipe's ``LossOrderer``).
    """

    def __init__(self, dataset: Any, batch_sampler: Iterable[Sequence[int]]) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler

    def fetch(self, index: Sequence[int]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """The samples ``index`` as DALI wants them: lists of ``HWC`` images, ``(1,)`` labels and ``(1,)`` ids."""
        from torch.utils.data import default_collate

        getitems = getattr(self.dataset, "__getitems__", None)
        samples = getitems(list(index)) if getitems is not None else [self.dataset[i] for i in index]
        images, labels, ids = default_collate(samples)[:3]
        hwc = torch.as_tensor(images).permute(0, 2, 3, 1).contiguous().numpy()
        lab = torch.as_tensor(labels).long().reshape(-1, 1).numpy()
        ids = torch.as_tensor(ids).long().reshape(-1, 1).numpy()
        return list(hwc), list(lab), list(ids)

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]:
        for index in self.batch_sampler:
            yield self.fetch(index)

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]


class DaliLoader(BuilderAdapter):
    """Wrap a DALI pipeline (or a ``DALIGenericIterator``) so it yields regpipe :class:`Batch` es.

    Per DALI batch: images ``(S, H, W, C)`` (or ``(S, M, H, W, C)`` from :func:`replicate`) become
    ``(S*M, C, H, W)`` rows (seed-contiguous, declared as ``Batch.replicas = M``, so the mixing ops pair copies
    across seeds and the invariance loss finds each sample's copies), labels and ids are repeated per copy,
    recorded pixel matrices are converted with ``affine_from_pixels``; then the shared builder moves, normalises and
    checks as :class:`~regpipe.loaders.torch.TorchLoader` does (same errors for the same bad input)
    and runs ``ops`` on the tensors DALI handed over (CUDA tensors from a GPU pipeline, CPU ones
    otherwise; ``device`` is where the batch ends up).

    Args:
        pipeline: a built DALI ``Pipeline``, a list of them, or a ``DALIGenericIterator``.
        num_classes: ``K``.
        output_map: names of the pipeline's outputs in order (required with a pipeline). ``images`` and
            ``labels`` (or ``targets``) are required; ``ids`` (:func:`sample_ids`; required with copies: rows are
            never numbered by position then), ``theta`` (normalised ``(M, 2, 3)``, :attr:`Replicas.theta`),
            ``affine`` (pixel ``(M, 2, 3)`` or ``(2, 3)``, same-size copies), ``photometric`` and ``targets``
            (``(K,)`` soft targets per sample) are read when present.
        device, ops, mean, std, channels_last, non_blocking, keep_uint8, executor: as :class:`TorchLoader`.
        size, reader_name, last_batch_policy, auto_reset: passed to ``DALIGenericIterator``.

    Raises:
        ValueError: the output map lacks ``images`` or ``labels`` (both named), or an output has the wrong shape.
    """

    def __init__(self, pipeline: Any, num_classes: int, output_map: Sequence[str] | None = None, *,
                 device: torch.device | str = "cpu", ops: Sequence[Op] = (), mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, channels_last: bool = False, non_blocking: bool = True,
                 keep_uint8: bool = False, executor: str = "auto", size: int = -1, reader_name: str | None = None,
                 last_batch_policy: Any = None, auto_reset: bool = True) -> None:
        self.builder = BatchBuilder(num_classes, device=device, ops=ops, mean=mean, std=std,
                                    channels_last=channels_last, non_blocking=non_blocking, keep_uint8=keep_uint8,
                                    executor=executor)
        pipes = None
        if isinstance(pipeline, DALIGenericIterator):
            names = list(pipeline.output_map)
        else:
            if output_map is None:
                raise ValueError("give output_map: the names of the pipeline's outputs, e.g. ['images', 'labels']")
            names = list(output_map)
            pipes = pipeline if isinstance(pipeline, (list, tuple)) else [pipeline]
            for p in pipes:
                if not isinstance(p, Pipeline):
                    raise TypeError(f"pipeline must be a DALI Pipeline or DALIGenericIterator, got {type(p).__name__}")
        # checked once, before the iterator is built (building it builds the pipelines)
        check_outputs(names, ["images", "labels"] if "targets" not in names else ["images"], "the DALI pipeline")
        if pipes is None:
            self.iterator = pipeline
        else:
            kwargs: dict[str, Any] = {"auto_reset": auto_reset}
            if reader_name is not None:
                kwargs["reader_name"] = reader_name
            else:
                kwargs["size"] = size
            kwargs["last_batch_policy"] = last_batch_policy if last_batch_policy is not None else LastBatchPolicy.DROP
            self.iterator = DALIGenericIterator(list(pipes), names, **kwargs)
        self.names = names

    def __len__(self) -> int:
        return len(self.iterator)

    def to_batch(self, outputs: dict[str, torch.Tensor], position: int = 0, raw: bool = False) -> Batch:
        """One DALI output dict (name -> tensor) -> :class:`Batch` (no ops applied; ``raw``: uint8 images stay
        uint8 for the fused stage of :meth:`apply`)."""
        check_outputs(list(outputs), ["images"] + (["labels"] if "targets" not in outputs else []),
                      "the DALI iterator's output")
        images = outputs["images"]
        if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5):
            raise ValueError(f"DALI images must be (S, H, W, C) or (S, M, H, W, C) samples, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        check_decoded_images(images, "the DALI pipeline", self.builder.keep_uint8, self.builder.mean is not None)
        s = images.shape[0]
        m = images.shape[1] if images.dim() == 5 else 1
        height, width = images.shape[-3], images.shape[-2]
        x = images.reshape(s * m, height, width, images.shape[-1]).permute(0, 3, 1, 2)  # NCHW view of NHWC

        def per_seed(name: str) -> torch.Tensor | None:
            if name not in outputs:
                return None
            value = outputs[name].reshape(s, -1)
            if value.shape[1] != 1:
                raise ValueError(f"DALI output {name!r} must hold one value per sample, got shape "
                                 f"{tuple(outputs[name].shape)}")
            return value[:, 0].cpu().repeat_interleave(m)

        labels = per_seed("labels")
        ids = per_seed("ids")
        if ids is None and m > 1:
            raise ValueError("the DALI pipeline has no 'ids' output: the copies of a sample cannot be told apart "
                             "from other samples by position. Add ids=sample_ids(jpegs, "
                             "FileIndex(file_root)) (regpipe.loaders.dali) and name it 'ids' in the output map")
        if ids is not None and bool((ids < 0).any()):
            bad = int((ids < 0).sum()) // m
            raise ValueError(f"DALI output 'ids' is -1 for {bad} sample(s): their source_info is not in the FileIndex "
                             "given to sample_ids (build it from the reader's file_root)")
        affine = photometric = None
        if "theta" in outputs:
            affine = outputs["theta"].float().reshape(-1, 2, 3).cpu()
            if affine.shape[0] != s * m:
                raise ValueError(f"DALI output 'theta' has {affine.shape[0]} matrices for {s * m} rows")
        elif "affine" in outputs:
            a = outputs["affine"].float().reshape(-1, 2, 3)
            if a.shape[0] != s * m:
                raise ValueError(f"DALI output 'affine' has {a.shape[0]} matrices for {s * m} rows")
            affine = affine_from_pixels(a, height, width)
        if "photometric" in outputs:
            photometric = outputs["photometric"].float().reshape(-1, 2)
            if photometric.shape[0] != s * m:
                raise ValueError(f"DALI output 'photometric' has {photometric.shape[0]} rows for {s * m} images")
        targets = outputs["targets"].cpu().reshape(s, -1).repeat_interleave(m, 0) if "targets" in outputs else None
        # (S, M, H, W, C) images: M copies per sample, made by the pipeline (replicate): declared on the batch
        if m > 1:
            self.builder._log(self, f"replicate[dali] {m} copies per image")
        return self.builder.build(x, labels, ids, position, targets=targets, affine=affine,
                                  photometric=photometric, replicas=m, raw=raw)

    def apply(self, batch: Batch) -> Batch:
        """Run the ops on a batch."""
        return self.builder.apply(batch)

    def __iter__(self) -> Iterator[Batch]:
        position = 0
        for outputs in self.iterator:
            batch = self.to_batch(outputs[0], position, raw=True)
            position += batch.size
            yield self.apply(batch)
