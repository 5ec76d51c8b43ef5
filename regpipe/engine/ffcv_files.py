"""FFCV reading ``.beton`` files: ``--data beton:TRAIN.beton,VAL.beton``, and image folders converted once.

A ``.beton`` holds an ``image`` field (``RGBImageField``: JPEG or raw pixels) and a ``label`` field
(``IntField``), optionally an ``index`` field, as FFCV's ImageNet example writes them. Training decodes with
regpipe's :class:`~regpipe.loaders.ffcv.ReplicatedCropDecoder` with one copy: the random-resized crop of
Szegedy et al. 2015, section 6 (area fraction in ``[0.08, 1]``, aspect ratio log-uniform in ``[3/4, 4/3]``)
and a horizontal flip, resized by FFCV's own C resize as its ``RandomResizedCropRGBImageDecoder`` does, but
drawn from counter-based uniforms of ``(seed, epoch, sample index)`` rather than numpy's global generator in
FFCV's worker threads, so the crops of an epoch are the same in every run and a resumed run redraws them.
Evaluation decodes with ``CenterCropRGBImageDecoder`` (the centre ``size x size`` crop of the image resized so
that its shorter side is ``resize``: ``ratio = size / resize``). The order is the run's (this rank's slice of
every global batch), given to FFCV as a traversal order, so ranks read disjoint shards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regpipe.core.optional import require
from regpipe.engine import distributed
from regpipe.engine.algorithms import Copies
from regpipe.engine.datasets import training_chain
from regpipe.engine.splits import DataSpec, Splits
from regpipe.loaders import EpochBatches, ffcv_pass_loader

__all__ = ["BetonRef", "beton_eval_loader", "beton_splits", "beton_train_loader", "folder_beton"]

#: Longest side of the images kept when an image folder is converted (FFCV's ImageNet example: 256-512).
MAX_RESOLUTION = 512


def _ffcv() -> Any:
    return require("ffcv", needed_by="--loader ffcv")


class BetonRef:
    """A ``.beton`` file by reference: its path, size and labels (read from the file's metadata)."""

    def __init__(self, path: Path) -> None:
        _ffcv()
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader

        if not path.is_file():
            raise FileNotFoundError(f"FFCV file not found: {path}")
        try:
            reader = Reader(str(path))
        except Exception as err:  # FFCV raises assorted errors on a file that is not a .beton
            raise ValueError(f"{path} is not a readable FFCV .beton: {err}") from err
        fields = list(reader.field_names)
        for name, kind in (("image", RGBImageField), ("label", IntField)):
            if name not in reader.handlers or not isinstance(reader.handlers[name], kind):
                raise ValueError(f"{path} needs a field {name!r} of type {kind.__name__}; it has "
                                 f"{ {n: type(h).__name__ for n, h in reader.handlers.items()} }")
        self.path, self.fields = path, fields
        self.labels = np.asarray(reader.metadata[f"f{fields.index('label')}"], dtype=np.int64)
        self.has_index = "index" in reader.handlers and isinstance(reader.handlers["index"], IntField)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def beton_splits(spec: DataSpec, image_size: int, val_resize: int, seed: int, workers: int = 1) -> Splits:
    """:class:`Splits` of ``beton:TRAIN,VAL``; mean/std estimated on centre crops of 256 training images."""
    train, val = BetonRef(spec.train), BetonRef(spec.val)
    num_classes = int(max(train.labels.max(initial=0), val.labels.max(initial=0))) + 1
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:256])
    total = squares = None
    pixels = 0
    for images, *_ in _centre_loader(train.path, image_size, val_resize, 32, pick, workers):
        x = torch.as_tensor(np.asarray(images)).double().div_(255.0).reshape(-1, 3).T
        total = x.sum(1) if total is None else total + x.sum(1)
        squares = (x * x).sum(1) if squares is None else squares + (x * x).sum(1)
        pixels += x.shape[1]
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(1e-6).sqrt().clamp_min(1e-3)
    return Splits(train=train, holdout=None, test=val, num_classes=num_classes,
                  classes=tuple(str(i) for i in range(num_classes)), image_shape=(3, image_size, image_size),
                  mean=tuple(mean.tolist()), std=tuple(std.tolist()), spec=spec)


def _centre_loader(path: Path, size: int, resize: int, batch_size: int, indices: Sequence[int], workers: int,
                   drop_last: bool = False) -> Any:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    pipelines: dict[str, Any] = {name: None for name in BetonRef(path).fields}  # None: the field is not read
    pipelines.update(image=[CenterCropRGBImageDecoder((size, size), ratio=size / resize), ToTensor()],
                     label=[IntDecoder(), ToTensor()])
    threads = torch.get_num_threads()
    loader = Loader(str(path), batch_size=batch_size, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                    indices=[int(i) for i in indices], drop_last=drop_last, pipelines=pipelines)
    torch.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count: restore it
    return loader


def beton_train_loader(path: Path, batches: Iterable[Sequence[int]], num_classes: int, *, size: int, seed: int,
                       workers: int, device: torch.device, ops: Sequence[Any], mean: Sequence[float],
                       std: Sequence[float], channels_last: bool, start_epoch: int = 0,
                       copies: Copies | None = None) -> Iterable:
    """Training batches of a ``.beton``: each image decoded and randomly resized-cropped to ``size x size`` and
    flipped (:class:`~regpipe.loaders.ffcv.ReplicatedCropDecoder` with one copy: the crop and flip of FFCV's
    ``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip``, drawn from ``(seed, epoch, index)``
    instead of numpy's global generator, so a pass of epoch ``e`` is the same in every run, and a resumed
    run starts at ``start_epoch``). The crops are recorded in ``Batch.affine``.

    With ``copies`` (a replicating recipe) the decoder makes ``copies.m`` copies of each decoded image, each its
    own crop and flip with ``copies.augment`` on top (FFCV's resize of the crop, then one warp at ``size`` for
    the chain's rotations and shifts), and the batch declares them (``Batch.replicas``).

    Raises:
        ValueError: the index lists have different sizes (FFCV batches have one size).
    """
    _ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor

    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder, WithIndices

    ref = BetonRef(path)
    epochs = EpochBatches(batches)
    # the ImageNet crop (area 0.08-1, aspect 3/4-4/3, as FFCV's decoder) and a horizontal flip with probability 1/2,
    # then the copies' chain when the loader makes them
    chain = training_chain(size, copies.augment.transforms if copies else ())
    decoder = ReplicatedCropDecoder(copies.m if copies else 1, chain, seed=seed)
    pipelines: dict[str, Any] = {name: None for name in ref.fields}  # None: the field is not read
    # the crops are keyed by each row's index: from the index field, else from the labels' WithIndices
    pipelines.update(image=[decoder, ToTensor()],
                     label=[IntDecoder(), ToTensor()] if ref.has_index else [IntDecoder(), WithIndices(), ToTensor()])
    if ref.has_index:
        pipelines["index"] = [IntDecoder(), ToTensor()]
    loader = ffcv_pass_loader(path, epochs, num_workers=max(1, workers), seed=seed, pipelines=pipelines)
    return FfcvLoader(loader, num_classes, replicate=decoder, index_field="index", device=device, ops=ops, mean=mean,
                      std=std, channels_last=channels_last, start_epoch=start_epoch)


class _EvalBatches:
    """This rank's share of a ``.beton``'s centre crops, as normalised batches (a fresh FFCV pass per iter)."""

    def __init__(self, path: Path, rows: Sequence[int], num_classes: int, size: int, resize: int, batch_size: int,
                 workers: int, device: torch.device, mean: Sequence[float], std: Sequence[float]) -> None:
        from regpipe.loaders.common import BatchBuilder

        self.path, self.rows, self.size, self.resize = path, list(rows), size, resize
        self.batch_size, self.workers = batch_size, workers
        self.builder = BatchBuilder(num_classes, device=device, mean=mean, std=std)

    def pass_rows(self) -> list[int]:
        return self.rows

    def __iter__(self) -> Iterator[Any]:
        rows = self.pass_rows()
        if not rows:
            return
        for images, labels in _centre_loader(self.path, self.size, self.resize, self.batch_size, rows,
                                             self.workers):
            x = torch.as_tensor(images).clone().permute(0, 3, 1, 2)
            yield self.builder.build(x, torch.as_tensor(labels).reshape(-1).clone())


def beton_eval_loader(path: Path, num_classes: int, *, size: int, batch_size: int, workers: int,
                      device: torch.device, mean: Sequence[float], std: Sequence[float],
                      info: distributed.DistInfo = distributed.DistInfo(), resize: int = 256) -> Iterable:
    """Evaluation batches (centre crops) of this rank's rows of a ``.beton`` (every ``world_size``-th)."""
    n = len(BetonRef(path))
    return _EvalBatches(path, range(info.rank, n, info.world_size), num_classes, size, resize, batch_size, workers,
                        device, mean, std)


class _CleanBatches(_EvalBatches):
    """Centre crops of a random ``rows`` of the training ``.beton`` per pass, drawn from ``generator``."""

    def __init__(self, *args: Any, count: int, generator: torch.Generator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count, self.generator = count, generator

    def pass_rows(self) -> list[int]:
        pick = torch.randperm(len(self.rows), generator=self.generator)[:self.count]
        return sorted(self.rows[int(i)] for i in pick)


def beton_clean_loader(path: Path, num_classes: int, *, size: int, resize: int, batch_size: int, count: int,
                       generator: torch.Generator, workers: int, device: torch.device, mean: Sequence[float],
                       std: Sequence[float]) -> Iterable:
    """Clean (centre-cropped) batches of ``count`` random training rows per pass, for BatchNorm re-estimation."""
    return _CleanBatches(path, range(len(BetonRef(path))), num_classes, size, resize, batch_size, workers, device,
                         mean, std, count=count, generator=generator)


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "regpipe"


def folder_beton(splits: Splits, cache_dir: str | None, val_resize: int, info: distributed.DistInfo,
                 workers: int = 1) -> Path:
    """The training ``.beton`` of an image folder (``splits.train``'s files in order), converted once and kept
    in ``cache_dir`` (keyed by the file list, labels and resolution; rank 0 writes, the other ranks wait)."""
    max_resolution = max(MAX_RESOLUTION, 2 * val_resize)
    index = splits.train.index
    key = hashlib.sha1(str(Path(index.root).resolve()).encode() + index.names.tobytes()
                       + index.labels.tobytes() + str(max_resolution).encode()).hexdigest()[:16]
    path = _cache_root(cache_dir) / "betons" / f"{Path(index.root).name}-{key}.beton"
    if info.is_main and not path.is_file():
        _ffcv()
        from regpipe.loaders.ffcv import write_image_folder

        write_image_folder(index, path, max_resolution=max_resolution, num_workers=max(1, workers), index_field=True)
    if info.distributed:
        torch.distributed.barrier()
    return path
