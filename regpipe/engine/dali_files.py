"""DALI reading an image folder: the files are decoded, cropped, resized and flipped inside DALI.

The index lists come from the run's sampler (this rank's slice of every global batch), fed through
``fn.external_source`` as the encoded bytes with the crop window and flip of each sample, drawn exactly as
the torch path draws them (:meth:`ImageFolderDataset.window`, counter-based in ``(seed, epoch, index)``), so
the three loaders crop a sample the same way and a resumed run reads what the interrupted one would have.
DALI then runs ``decoders.image_slice`` (only the window is decoded; ``device="mixed"``, i.e. nvJPEG, when
the run trains on a GPU), ``resize`` to ``size x size`` (linear, antialiased) and ``flip``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from regpipe.core.optional import require
from regpipe.engine.datasets import ImageFolderDataset
from regpipe.loaders import EpochBatches, SizedLoader

__all__ = ["FileWindows", "dali_folder_loader"]

Feed = tuple[list[np.ndarray], ...]


class FileWindows:
    """``external_source`` feed (``batch=True``, six outputs): encoded files (uint8 bytes), ``(1,)`` int64
    labels, ``(1,)`` int64 ids, ``(2,)`` float32 crop anchors ``(x, y)``, ``(2,)`` float32 crop shapes
    ``(w, h)`` and ``(1,)`` int32 flips. One pass of ``batches`` per ``iter()``, counting epochs from
    ``start_epoch`` (DALI asks for the next pass before the loop's epoch begins, so the feed counts itself).
    """

    def __init__(self, dataset: ImageFolderDataset, batches: Iterable[Sequence[int]], start_epoch: int = 0) -> None:
        self.dataset, self.batches, self.next_epoch = dataset, batches, int(start_epoch)

    def fetch(self, index: Sequence[int], epoch: int) -> Feed:
        """The samples ``index`` of ``epoch`` as DALI wants them."""
        from PIL import Image

        out: Feed = ([], [], [], [], [], [])
        for i in index:
            i = int(i)
            path = self.dataset.index.path(i)
            data = np.fromfile(path, dtype=np.uint8)
            try:
                with Image.open(io.BytesIO(data.tobytes())) as img:  # reads the header only
                    width, height = img.size
            except OSError as err:
                raise ValueError(f"cannot read image {path}: {err}") from err
            box, flip = self.dataset.window(i, width, height, epoch)
            values = (data, np.array([self.dataset.index.labels[i]], dtype=np.int64), np.array([i], dtype=np.int64),
                      np.array(box[:2], dtype=np.float32),
                      np.array([box[2] - box[0], box[3] - box[1]], dtype=np.float32), np.array([int(flip)], np.int32))
            for column, value in zip(out, values):
                column.append(value)
        return out

    def __iter__(self) -> Iterator[Feed]:
        epoch, self.next_epoch = self.next_epoch, self.next_epoch + 1
        for index in self.batches:
            yield self.fetch(index, epoch)


def dali_folder_loader(dataset: ImageFolderDataset, batches: Iterable[Sequence[int]], num_classes: int, *,
                       seed: int, threads: int, device: torch.device, ops: Sequence[Any], mean: Sequence[float],
                       std: Sequence[float], channels_last: bool, start_epoch: int = 0) -> Iterable:
    """Training batches of an image folder decoded by DALI (CPU pipeline, or ``"mixed"`` decoding on CUDA).

    Raises:
        ImportError: DALI is not installed (names the extra), or is installed but fails to import.
    """
    require("nvidia.dali", needed_by="--loader dali")
    from nvidia.dali import fn, pipeline_def, types

    from regpipe.loaders.dali import DaliLoader

    epochs = EpochBatches(batches)
    feed = FileWindows(dataset, epochs, start_epoch)
    gpu = device.type == "cuda"
    size = dataset.size

    @pipeline_def(batch_size=epochs.max_size, num_threads=threads, device_id=device.index or 0 if gpu else None,
                  seed=seed, prefetch_queue_depth=2)
    def pipe():
        files, labels, ids, anchor, shape, flip = fn.external_source(
            source=feed, num_outputs=6, batch=True, cycle="raise",
            dtype=[types.UINT8, types.INT64, types.INT64, types.FLOAT, types.FLOAT, types.INT32])
        images = fn.decoders.image_slice(files, anchor, shape, device="mixed" if gpu else "cpu",
                                         output_type=types.RGB, axis_names="WH", normalized_anchor=False,
                                         normalized_shape=False)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.flip(images, horizontal=flip)
        return images, labels, ids

    loader = DaliLoader(pipe(), num_classes, ["images", "labels", "ids"], device=device, ops=ops, mean=mean,
                        std=std, channels_last=channels_last)
    return SizedLoader(loader, len(epochs))
