"""The splits a run trains and evaluates on, whether held in memory or streamed from disk.

In memory (``fashion-mnist``, ``npz:``, ``folder:``): :func:`prepare_data`'s arrays.
By reference (``imagefolder:ROOT``, ``beton:TRAIN,VAL``): files read sample by sample by the chosen loader;
``ROOT/val`` (or ``VAL.beton``) is the evaluation set, and a held-out validation set for the algorithms
that decide from it (the cascade) is carved from the training split only when one of them asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from regpipe.engine.data import ArrayDataset, ImageArrays, load_dataset, split_train_val, stratified_indices
from regpipe.engine.datasets import ImageFolderDataset
from regpipe.loaders.file_index import FileIndex

__all__ = ["DataSpec", "RunData", "Splits", "array_splits", "channel_stats", "folder_splits", "parse_data_spec",
           "prepare_data"]

StreamKind = Literal["imagefolder", "beton"]
#: Images decoded to estimate the per-channel mean/std of a streamed training set.
STATS_IMAGES = 256


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` reference to files read while training.

    Attributes:
        kind: ``"imagefolder"`` or ``"beton"``.
        train, val: the training and evaluation split (folders or ``.beton`` files).
    """

    kind: StreamKind
    train: Path
    val: Path


def parse_data_spec(spec: str) -> DataSpec | None:
    """``"imagefolder:ROOT"`` -> ``ROOT/train``, ``ROOT/val``; ``"beton:TRAIN.beton,VAL.beton"``; anything
    else (an in-memory dataset spec) -> ``None``. Only the form is checked here, not the files.

    Raises:
        ValueError: a malformed ``imagefolder:`` or ``beton:`` spec (the spec is named).
    """
    kind, _, arg = spec.partition(":")
    if kind == "imagefolder":
        if not arg:
            raise ValueError(f"data spec {spec!r} names no folder: use imagefolder:ROOT with ROOT/train/<class>/* "
                             "and ROOT/val/<class>/*")
        return DataSpec("imagefolder", Path(arg) / "train", Path(arg) / "val")
    if kind == "beton":
        parts = arg.split(",")
        if len(parts) != 2 or not all(parts) or not all(p.endswith(".beton") for p in parts):
            raise ValueError(f"data spec {spec!r}: use beton:TRAIN.beton,VAL.beton (two FFCV files, comma-separated)")
        return DataSpec("beton", Path(parts[0]), Path(parts[1]))
    return None


@dataclass(frozen=True)
class RunData:
    """The run's splits (uint8 arrays) and the training set's per-channel mean/std (0..1 scale)."""

    train: ImageArrays
    val: ImageArrays
    test: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]


def prepare_data(dataset: str, seed: int, val_per_class: int, samples_per_class: int | None,
                 data_dir: str | None = None, shape: str = "cifar") -> RunData:
    """Load an in-memory dataset and split it: a stratified validation set of ``val_per_class`` per class is
    carved first (seeded), then the optional ``samples_per_class`` training subset is drawn from the rest, so
    every recipe with the same seed trains on the same samples whether it reads the validation set or not."""
    full = load_dataset(dataset, "train", data_dir=data_dir, shape=shape)
    test = load_dataset(dataset, "test", data_dir=data_dir, shape=shape)
    val_idx = stratified_indices(full.labels, val_per_class, seed=seed + 10_000)
    if samples_per_class is not None:
        # a stratified draw disjoint from the validation set (split_train_val's job, used the other way round)
        train_idx = split_train_val(full.labels, samples_per_class, seed=seed, exclude=val_idx)
    else:
        keep = torch.ones(len(full.labels), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = keep.nonzero().squeeze(1)
    train = full.subset(train_idx)
    pixels = train.images.float().div_(255.0)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return RunData(train=train, val=full.subset(val_idx), test=test, mean=mean, std=std)


@dataclass
class Splits:
    """The run's splits as map-style datasets yielding ``(image (C, H, W) uint8, label, index)``.

    Attributes:
        train: the rows the run trains on.
        holdout: validation rows for algorithm decisions (``None`` when no algorithm reads them).
        test: the evaluation rows (``metrics.json``'s ``test_accuracy``).
        num_classes, classes: the label space.
        image_shape: ``(C, H, W)`` of the model's inputs.
        mean, std: per-channel normalisation, 0..1 scale.
        arrays: the in-memory arrays (:class:`RunData`), or ``None`` when streaming.
        spec: the streamed files, or ``None`` in memory.
    """

    train: Dataset
    holdout: Dataset | None
    test: Dataset
    num_classes: int
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    arrays: Any = None
    spec: DataSpec | None = None

    @property
    def streaming(self) -> bool:
        return self.spec is not None


def array_splits(data: Any) -> Splits:
    """:class:`Splits` over :class:`RunData` (in-memory uint8 arrays)."""
    return Splits(train=ArrayDataset(data.train), holdout=ArrayDataset(data.val), test=ArrayDataset(data.test),
                  num_classes=data.train.num_classes, classes=data.train.classes,
                  image_shape=tuple(int(v) for v in data.train.images.shape[1:]), mean=data.mean, std=data.std,
                  arrays=data)


def channel_stats(dataset: Dataset, count: int = STATS_IMAGES, seed: int = 0, workers: int = 0) -> tuple[
        tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation (0..1 scale) over ``count`` images drawn without replacement
    (seeded), pooling every pixel: ``mean_c = sum x / P``, ``std_c = sqrt(sum x^2 / P - mean_c^2)``.

    Raises:
        ValueError: an empty dataset.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot estimate channel statistics of an empty dataset")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values.tolist()
    loader = DataLoader(torch.utils.data.Subset(dataset, pick), batch_size=32, num_workers=workers)
    total = squares = None
    pixels = 0
    for images, *_ in loader:
        x = images.double().div_(255.0).transpose(0, 1).flatten(1)  # (C, P)
        total = x.sum(1) if total is None else total + x.sum(1)
        squares = (x * x).sum(1) if squares is None else squares + (x * x).sum(1)
        pixels += x.shape[1]
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(1e-6).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def folder_splits(spec: DataSpec, image_size: int, val_resize: int, seed: int, val_per_class: int | None,
                  workers: int = 0) -> Splits:
    """:class:`Splits` of an ``imagefolder:`` spec: ``train`` with the training augmentation, ``test`` =
    ``ROOT/val`` with resize + centre crop, and (``val_per_class`` given) a stratified, seeded holdout of
    that many training images per class, removed from ``train``.

    Raises:
        FileNotFoundError, ValueError: a missing split folder, a class without images, splits whose classes
            differ (:class:`~regpipe.loaders.file_index.FileIndex`).
    """
    train_index = FileIndex(spec.train)
    test_index = FileIndex(spec.val, classes=train_index.classes)
    holdout = None
    if val_per_class is not None:
        held = stratified_indices(torch.from_numpy(train_index.labels), val_per_class, seed=seed + 10_000).numpy()
        keep = np.ones(len(train_index), dtype=bool)
        keep[held] = False
        holdout = ImageFolderDataset(train_index.subset(held), image_size, train=False, resize=val_resize)
        train_index = train_index.subset(np.flatnonzero(keep))
    train = ImageFolderDataset(train_index, image_size, train=True, resize=val_resize, seed=seed)
    clean = ImageFolderDataset(train_index, image_size, train=False, resize=val_resize)
    mean, std = channel_stats(clean, seed=seed, workers=workers)
    return Splits(train=train, holdout=holdout, test=ImageFolderDataset(test_index, image_size, train=False,
                                                                        resize=val_resize),
                  num_classes=train_index.num_classes, classes=train_index.classes,
                  image_shape=(3, image_size, image_size), mean=mean, std=std, spec=spec)


def clean_view(dataset: Dataset) -> Dataset:
    """The training rows without augmentation (for re-estimating BatchNorm statistics on clean batches)."""
    if isinstance(dataset, ImageFolderDataset):
        return ImageFolderDataset(dataset.index, dataset.size, train=False, resize=dataset.resize)
    return dataset


def file_index(dataset: Dataset) -> FileIndex | None:
    """The :class:`FileIndex` behind a streamed dataset, else ``None``."""
    return dataset.index if isinstance(dataset, ImageFolderDataset) else None
