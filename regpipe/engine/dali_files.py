"""DALI reading an image folder: the files are decoded, cropped, resized and flipped inside DALI.

The index lists come from the run's sampler (this rank's slice of every global batch), fed through
``fn.external_source`` as the encoded bytes with the crop window and flip of each sample, drawn exactly as
the torch path draws them (:meth:`ImageFolderDataset.window`, counter-based in ``(seed, epoch, index)``), so
the three loaders crop a sample the same way and a resumed run reads what the interrupted one would have.
DALI then runs ``decoders.image_slice`` (only the window is decoded; ``device="mixed"``, i.e. nvJPEG, when
the run trains on a GPU), ``resize`` to ``size x size`` (linear, antialiased) and ``flip``.

A replicating recipe's copies are made here too (:class:`~regpipe.engine.algorithms.Copies`): the whole
image is decoded once and :func:`~regpipe.loaders.dali.replicate` crops each of its ``m`` copies (its own
random-resized crop and flip, the replication chain on top) from uniforms the feed draws from
``(seed, epoch, index)``, so a resumed run redraws an epoch's copies as well as its crops.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from regpipe.core.optional import require
from regpipe.engine.algorithms import Copies
from regpipe.engine.datasets import ImageFolderDataset, training_chain
from regpipe.loaders import EpochBatches, SizedLoader
from regpipe.loaders._kernels import counter_uniforms

__all__ = ["FileWindows", "dali_folder_loader"]

Feed = tuple[list[np.ndarray], ...]


class FileWindows:
    """``external_source`` feed (``batch=True``): encoded files (uint8 bytes), ``(1,)`` int64 labels, ``(1,)``
    int64 ids, then ``(2,)`` float32 crop anchors ``(x, y)``, ``(2,)`` float32 crop shapes ``(w, h)`` and
    ``(1,)`` int32 flips (six outputs), or, with ``copies = (m, p)``, the ``(m, p)`` float32 uniforms of the
    sample's ``m`` copies (four outputs). Both are drawn from ``(dataset.seed, epoch, index)``
    (:func:`~regpipe.loaders._kernels.counter_uniforms`, the generator of every loader's draws). One pass of
    ``batches`` per ``iter()``, counting epochs from ``start_epoch`` (DALI asks for the next pass before the
    loop's epoch begins, so the feed counts itself).
    """

    #: Batches remembered for :meth:`undecodable`: DALI has fed at most ``prefetch_queue_depth`` (2) batches past
    #: the one it fails on, so the failing batch is among the last few.
    RECENT = 4

    def __init__(self, dataset: ImageFolderDataset, batches: Iterable[Sequence[int]], start_epoch: int = 0,
                 copies: tuple[int, int] | None = None) -> None:
        self.dataset, self.batches, self.next_epoch, self.copies = dataset, batches, int(start_epoch), copies
        self.recent: collections.deque[list[int]] = collections.deque(maxlen=self.RECENT)

    @property
    def num_outputs(self) -> int:
        return 6 if self.copies is None else 4

    def fetch(self, index: Sequence[int], epoch: int) -> Feed:
        """The samples ``index`` of ``epoch`` as DALI wants them."""
        from PIL import Image, UnidentifiedImageError

        out: Feed = tuple([] for _ in range(self.num_outputs))
        self.recent.append([int(i) for i in index])
        for i in index:
            i = int(i)
            path = self.dataset.index.path(i)
            data = np.fromfile(path, dtype=np.uint8)
            try:
                with Image.open(io.BytesIO(data.tobytes())) as img:  # reads the header only
                    width, height = img.size
            except UnidentifiedImageError as err:  # its message shows the in-memory buffer, not the file
                raise ValueError(f"cannot read image {path}: not an image format Pillow recognises") from err
            except OSError as err:
                raise ValueError(f"cannot read image {path}: {err}") from err
            values: tuple[np.ndarray, ...] = (data, np.array([self.dataset.index.labels[i]], dtype=np.int64),
                                              np.array([i], dtype=np.int64))
            if self.copies is None:
                box, flip = self.dataset.window(i, width, height, epoch)
                values += (np.array(box[:2], dtype=np.float32),
                           np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float32),
                           np.array([int(flip)], np.int32))
            else:
                m, p = self.copies
                u = np.empty((m, p))
                counter_uniforms(self.dataset.seed, epoch, i, u)
                # float32 rounds values just below 1 up to 1.0: keep them in [0, 1) as the draws assume
                values += (np.minimum(u.astype(np.float32), np.float32(1.0 - 2.0 ** -24)),)
            for column, value in zip(out, values):
                column.append(value)
        return out

    def __iter__(self) -> Iterator[Feed]:
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        for index in self.batches:
            yield self.fetch(index, epoch)

    def undecodable(self) -> str | None:
        """``"cannot decode image PATH: reason"`` for the first file of the recently fed batches that Pillow
        cannot decode, or ``None``.

        DALI's decoders report a failure by the sample's position in its batch only ("Failed to decode
        sample #1"), and the feed runs batches ahead, so the file is found again here, after the failure:
        the recent batches' files are decoded with :meth:`ImageFolderDataset.load` (at most ``RECENT``
        batches, on the error path only).
        """
        for index in self.recent:
            for i in index:
                try:
                    self.dataset.load(i)
                except ValueError as err:
                    return str(err)
        return None

    def named(self, err: RuntimeError) -> Exception:
        """The error to raise for DALI's ``err``: a ``ValueError`` naming the file that does not decode, or
        ``err`` itself when Pillow decodes every recent file (then DALI's message is all there is)."""
        bad = self.undecodable()
        return err if bad is None else ValueError(f"{bad} (DALI's decoder failed on it)")


class _FolderBatches(SizedLoader):
    """The DALI loader's batches; a file DALI fails to decode is named (:meth:`FileWindows.undecodable`)."""

    def __init__(self, inner: Any, length: int, feed: FileWindows) -> None:
        super().__init__(inner, length)
        self.feed = feed

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.inner
        except RuntimeError as err:  # DALI's "Critical error in pipeline", the file not named
            raise self.feed.named(err) from err


def dali_folder_loader(dataset: ImageFolderDataset, batches: Iterable[Sequence[int]], num_classes: int, *,
                       seed: int, threads: int, device: torch.device, ops: Sequence[Any], mean: Sequence[float],
                       std: Sequence[float], channels_last: bool, start_epoch: int = 0,
                       copies: Copies | None = None) -> Iterable:
    """Training batches of an image folder decoded by DALI (CPU pipeline, or ``"mixed"`` decoding on CUDA): one
    crop per sample, or with ``copies`` the sample's ``copies.m`` copies (each its own crop and flip with
    ``copies.augment`` on top, :func:`~regpipe.loaders.dali.replicate`), declared in ``Batch.replicas``.

    Raises:
        ImportError: DALI is not installed (names the extra), or is installed but fails to import.
    """
    require("nvidia.dali", needed_by="--loader dali")
    from nvidia.dali import fn, pipeline_def, types

    from regpipe.loaders.dali import DaliLoader, replicate

    epochs = EpochBatches(batches)
    gpu = device.type == "cuda"
    size = dataset.size
    chain = None if copies is None else training_chain(size, copies.augment.transforms)
    feed = FileWindows(dataset, epochs, start_epoch, copies=None if chain is None else (copies.m, chain.num_uniforms))
    decoder = "mixed" if gpu else "cpu"

    @pipeline_def(batch_size=epochs.max_size, num_threads=threads, device_id=device.index or 0 if gpu else None,
                  seed=seed, prefetch_queue_depth=2)
    def pipe():
        if chain is not None:  # decoded once, m crops with the replication chain on top
            files, labels, ids, u = fn.external_source(source=feed, num_outputs=4, batch=True, cycle="raise",
                                                       dtype=[types.UINT8, types.INT64, types.INT64, types.FLOAT])
            images = fn.decoders.image(files, device=decoder, output_type=types.RGB)
            rep = replicate(images, copies.m, chain, include_original=False, uniforms=u)
            return rep.images, labels, ids, rep.theta, rep.photometric
        files, labels, ids, anchor, shape, flip = fn.external_source(
            source=feed, num_outputs=6, batch=True, cycle="raise",
            dtype=[types.UINT8, types.INT64, types.INT64, types.FLOAT, types.FLOAT, types.INT32])
        images = fn.decoders.image_slice(files, anchor, shape, device=decoder, output_type=types.RGB,
                                         axis_names="WH", normalized_anchor=False, normalized_shape=False)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.flip(images, horizontal=flip)
        return images, labels, ids

    names = ["images", "labels", "ids"] + ([] if chain is None else ["theta", "photometric"])
    try:  # DALI's iterator runs the first batches when it is made: a bad file may fail here already
        loader = DaliLoader(pipe(), num_classes, names, device=device, ops=ops, mean=mean, std=std,
                            channels_last=channels_last)
    except RuntimeError as err:
        raise feed.named(err) from err
    return _FolderBatches(loader, len(epochs), feed)
