"""The batches of one run: training batches through the chosen loader, evaluation and clean BatchNorm batches.

Every loader reads the same index lists (this rank's slice of every global batch,
:func:`~regpipe.engine.distributed.rank_order`), so ranks read disjoint shards whose union is the epoch:

* in-memory arrays: ``regpipe.loaders.make_train_loader`` (torch, DALI fed by ``external_source``, FFCV
  from a ``.beton`` written once per run in a temporary folder that is removed at the end);
* ``imagefolder:``: torch ``DataLoader`` workers decoding with Pillow (:class:`ImageFolderDataset`), DALI
  decoding and cropping the encoded files (:mod:`regpipe.engine.dali_files`), or FFCV reading ``.beton``
  files converted once into a cache folder (:mod:`regpipe.engine.ffcv_files`);
* ``beton:``: FFCV's JPEG decoders with its random-resized crop and flip.

With a recipe that replicates (``replicate``, ``invariance``, ``saliency``), DALI and FFCV reading files make
the copies at decode (:func:`decode_copier`): DALI's :func:`~regpipe.loaders.dali.replicate` and FFCV's
:class:`~regpipe.loaders.ffcv.ReplicatedCropDecoder` crop every copy from the image decoded once, and the
device ``Replicate`` op does not run; in-memory data and ``--loader torch`` keep the device op.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from regpipe.engine import distributed
from regpipe.engine.algorithms import Algorithm, Copies
from regpipe.engine.data import ArrayDataset
from regpipe.engine.datasets import ImageFolderDataset
from regpipe.engine.ffcv_files import BetonRef  # FFCV itself is imported only when a .beton is read
from regpipe.engine.splits import Splits, clean_view
from regpipe.loaders import make_train_loader
from regpipe.loaders.torch import TorchLoader

__all__ = ["decode_copier", "default_workers", "eval_loader", "clean_loader", "train_loader",
           "worker_start_method"]

#: the loaders that make a replicating recipe's copies at decode when they read files
DECODE_COPIES = ("dali", "ffcv")


def default_workers(streaming: bool, info: distributed.DistInfo) -> int:
    """DataLoader workers when ``--workers`` is not given: none for in-memory arrays (a batch is one
    indexing), else the machine's cores shared by the ranks on it, at most 8."""
    if not streaming:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // max(local, 1)))


def decode_copier(kind: str, splits: Splits, algorithms: Sequence[Algorithm]) -> Algorithm | None:
    """The algorithm whose in-batch copies (:meth:`~regpipe.engine.algorithms.Algorithm.copies`) the training loader
    makes at decode: DALI or FFCV reading files (``imagefolder:``, ``beton:``) decode each image once and crop
    its copies there. ``None`` for in-memory data (the loaders read arrays already cropped) and for
    ``--loader torch``: their batches go through the device op."""
    if not _decodes_copies(kind, splits):
        return None
    return next((alg for alg in algorithms if alg.copies() is not None), None)


def _decodes_copies(kind: str, splits: Splits) -> bool:
    """Whether the training loader ``kind`` makes a replicating recipe's copies at decode: DALI or FFCV reading
    files (``splits.spec`` is set for ``imagefolder:`` and ``beton:`` data)."""
    return splits.spec is not None and kind in DECODE_COPIES


def worker_start_method(kind: str) -> str | None:
    """How the torch ``DataLoader`` workers of a run whose training loader is ``kind`` start.

    DALI and FFCV run native threads in this process while the evaluation and BatchNorm loaders start their
    workers each pass; a child forked while such a thread holds a lock can crash ("DataLoader worker exited
    unexpectedly"). Those runs start workers from a fork server, a clean process that has imported torch and
    the dataset module once (a worker then starts in about 0.1 s). With the torch loader, workers are forked
    as torch does by default.
    """
    return "forkserver" if kind in ("dali", "ffcv") else None


def _torch_loader(dataset: Dataset, workers: int, device: torch.device, start_method: str | None = None,
                  **kwargs: Any) -> DataLoader:
    extra: dict[str, Any] = {"persistent_workers": False, "prefetch_factor": 4} if workers > 0 else {}
    if workers > 0 and start_method is not None:
        extra["multiprocessing_context"] = context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":  # takes effect when the server starts (the first such loader)
            context.set_forkserver_preload(["torch", "regpipe.engine.datasets"])
    # A generator of its own (unless given): each pass draws its workers' base seed from it, which must not
    # advance torch's global generator (a resumed epoch starts a pass the interrupted run did not).
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda", **extra, **kwargs)


def train_loader(kind: str, splits: Splits, batches: Iterable[Sequence[int]], *, seed: int, device: torch.device,
                 ops: Sequence[Any], channels_last: bool, workers: int, start_epoch: int = 0,
                 work_dir: Path | None = None, cache_dir: str | None = None, info: distributed.DistInfo = distributed.DistInfo(),
                 val_resize: int = 256, copies: Copies | None = None) -> Iterable:
    """The training :class:`~regpipe.Batch` es of ``splits.train`` read by ``kind`` in the order of ``batches``.

    Args:
        kind: ``"torch"``, ``"dali"`` or ``"ffcv"``.
        batches: this rank's index lists, one pass per epoch from ``start_epoch`` on
            (:class:`~regpipe.sampler.epoch_order.EpochPasses`).
        workers: DataLoader workers / DALI threads / FFCV workers.
        start_epoch: the first pass's epoch (a resumed run's), for the loaders that key their draws by epoch.
        work_dir: where the in-memory FFCV path writes its ``.beton`` (removed by the caller).
        cache_dir: where ``imagefolder:`` data converted for FFCV is kept between runs.
        copies: the copies DALI or FFCV make at decode (:func:`decode_copier`; ``ops`` then holds no op of the
            replication stage).

    Raises:
        ValueError: ``copies`` for a loader that reads arrays or decodes with torch (they go through the device op).
    """
    if copies is not None and not _decodes_copies(kind, splits):
        raise ValueError(f"--loader {kind} does not make copies at decode"
                         f"{' from in-memory arrays' if splits.spec is None else ''}: give the replication op instead")
    common = dict(device=device, ops=ops, mean=splits.mean, std=splits.std, channels_last=channels_last)
    if splits.spec is None:
        return make_train_loader(kind, splits.train, batches, splits.num_classes, seed=seed, work_dir=work_dir,
                                 start_epoch=start_epoch, **common)
    if splits.spec.kind == "beton" or kind == "ffcv":
        from regpipe.engine.ffcv_files import beton_train_loader, folder_beton

        path = splits.spec.train if splits.spec.kind == "beton" else \
            folder_beton(splits, cache_dir, val_resize=val_resize, info=info, workers=workers)
        if kind != "ffcv":
            raise ValueError(f"--data beton:... is read by FFCV: use --loader ffcv, not {kind!r}")
        return beton_train_loader(path, batches, splits.num_classes, size=splits.image_shape[1], seed=seed,
                                  workers=workers, start_epoch=start_epoch, copies=copies, **common)
    if kind == "dali":
        from regpipe.engine.dali_files import dali_folder_loader

        return dali_folder_loader(splits.train, batches, splits.num_classes, seed=seed, threads=max(1, workers),
                                  start_epoch=start_epoch, copies=copies, **common)
    loader = _torch_loader(splits.train, workers, device, batch_sampler=batches)
    return TorchLoader(loader, splits.num_classes, **common)


def _shard(dataset: Dataset, info: distributed.DistInfo) -> Dataset:
    """This rank's share of an evaluation set: every ``world_size``-th row from ``rank``."""
    if not info.distributed:
        return dataset
    rows = range(info.rank, len(dataset), info.world_size)
    if isinstance(dataset, ArrayDataset):
        return ArrayDataset(dataset.arrays.subset(torch.as_tensor(rows, dtype=torch.int64)))
    return Subset(dataset, list(rows))


def eval_loader(splits: Splits, dataset: Dataset, batch_size: int, device: torch.device, workers: int,
                info: distributed.DistInfo = distributed.DistInfo(), resize: int = 256,
                start_method: str | None = None) -> Iterable:
    """Normalised evaluation batches (no ops) of this rank's shard of ``dataset`` (a ``.beton`` through FFCV);
    DataLoader workers start by ``start_method`` (:func:`worker_start_method`)."""
    if isinstance(dataset, BetonRef):
        from regpipe.engine.ffcv_files import beton_eval_loader

        return beton_eval_loader(dataset.path, splits.num_classes, size=splits.image_shape[1], batch_size=batch_size,
                                 workers=workers, device=device, mean=splits.mean, std=splits.std, info=info,
                                 resize=resize)
    loader = _torch_loader(_shard(dataset, info), workers if isinstance(dataset, ImageFolderDataset) else 0, device,
                           start_method, batch_size=batch_size, shuffle=False)
    return TorchLoader(loader, splits.num_classes, device=device, mean=splits.mean, std=splits.std)


def clean_loader(splits: Splits, batch_size: int, generator: torch.Generator, device: torch.device,
                 workers: int, count: int, resize: int = 256, start_method: str | None = None) -> Iterable:
    """Shuffled clean (unaugmented) training batches, for re-estimating BatchNorm statistics (``count`` rows
    per pass of a ``.beton``); DataLoader workers start by ``start_method`` (:func:`worker_start_method`)."""
    if isinstance(splits.train, BetonRef):
        from regpipe.engine.ffcv_files import beton_clean_loader

        return beton_clean_loader(splits.train.path, splits.num_classes, size=splits.image_shape[1], resize=resize,
                                  batch_size=batch_size, count=count, generator=generator, workers=workers,
                                  device=device, mean=splits.mean, std=splits.std)
    dataset = clean_view(splits.train)
    loader = _torch_loader(dataset, workers if isinstance(dataset, ImageFolderDataset) else 0, device,
                           start_method, batch_size=batch_size, shuffle=True, generator=generator)
    return TorchLoader(loader, splits.num_classes, device=device, mean=splits.mean, std=splits.std)
