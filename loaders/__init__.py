"""Loader adapters (installed as ``regpipe.loaders``): turn a loader's output into regpipe ``Batch`` es.

``regpipe.loaders.torch`` (always), ``regpipe.loaders.dali`` (the ``dali`` extra) and
``regpipe.loaders.ffcv`` (the ``ffcv`` extra); :func:`make_train_loader` builds the training batches
of ``regpipe train --loader {torch,dali,ffcv}``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch as th  # `torch` is the name of the sibling module regpipe.loaders.torch

from regpipe.core.optional import require
from regpipe.loaders.common import BatchBuilder, Op
from regpipe.loaders.torch import TorchLoader, normalize

__all__ = ["TorchLoader", "normalize", "BatchBuilder", "EpochBatches", "LOADERS", "SizedLoader", "ffcv_pass_loader",
           "make_train_loader", "sampler_order"]

LOADERS = ("torch", "dali", "ffcv")
#: the optional library each loader other than torch's reads with
_LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv"}


class EpochBatches:
    """A batch sampler's index lists, one pass per epoch, the first pass drawn at construction (so the DALI and
    FFCV pipelines can be sized from it without an extra pass that would shift the sampler's randomness).

    ``len()`` is the sampler's own length when it has one (a full epoch: the first pass of a resumed run may
    be shorter), else the first pass's.

    Attributes:
        first: the first epoch's index lists.
        sizes: the batch sizes of the first epoch, sorted.
        max_size: the largest batch of the first epoch.
    """

    def __init__(self, batch_sampler: Iterable[Sequence[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.first: list[list[int]] | None = [[int(i) for i in b] for b in batch_sampler]
        if not self.first:
            raise ValueError("the batch sampler yields no batches")
        self.sizes = sorted({len(b) for b in self.first})
        self.max_size = self.sizes[-1]
        self.length = len(batch_sampler) if hasattr(batch_sampler, "__len__") else len(self.first)

    def __len__(self) -> int:
        return self.length

    def one_size(self) -> int:
        """The size every batch of the first epoch has (FFCV's ``Loader`` takes one batch size).

        Raises:
            ValueError: batches of different sizes (the sizes are named).
        """
        if len(self.sizes) != 1:
            raise ValueError(f"--loader ffcv needs batches of one size, the sampler gives sizes {self.sizes}; "
                             "use --loader torch for this recipe")
        return self.sizes[0]

    def __iter__(self) -> Iterator[list[int]]:
        if self.first is not None:
            first, self.first = self.first, None
            return iter(first)
        return ([int(i) for i in b] for b in self.batch_sampler)


def make_train_loader(kind: str, dataset: Any, batch_sampler: Iterable[Sequence[int]], num_classes: int, *,
                      seed: int = 0, device: th.device | str = "cpu", ops: Sequence[Op] = (),
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      channels_last: bool = False, work_dir: str | Path | None = None,
                      start_epoch: int = 0, executor: str = "auto") -> Iterable:
    """The training batch iterable of ``regpipe train --loader KIND``.

    Every kind reads the same index lists from ``batch_sampler`` (shuffled batches, a recipe's seed batches
    or the loss orderer; asked again every epoch) and yields the same :class:`~regpipe.Batch` es:
    ``(image, label, index)`` rows of ``dataset`` moved to ``device``, normalised, then ``ops`` (the
    recipe's) applied on the device. torch: ``DataLoader(dataset, batch_sampler=)``; DALI: a CPU pipeline
    fed by ``fn.external_source``; FFCV: the dataset written once to a ``.beton`` and read in a
    traversal order made of the flattened lists (FFCV batches have one size: a sampler with batches of
    different sizes is an error that says to use ``--loader torch``).

    Args:
        kind: ``"torch"``, ``"dali"`` or ``"ffcv"``.
        dataset: map-style, yields ``(image (C, H, W) uint8 or float32, label, index)`` (``ArrayDataset``).
        batch_sampler: iterable of index lists.
        work_dir: where FFCV's ``.beton`` goes (default: a fresh temporary folder).
        start_epoch: the epoch of the first pass (a resumed run's), for the adapters that count epochs.
        executor: who executes the mixing ops' plans (:class:`~regpipe.loaders.common.BatchBuilder`).

    Raises:
        ValueError: an unknown ``kind`` (the known ones are listed).
        ImportError: the library is not installed (names the extra), or is installed but fails to import.
    """
    if kind not in LOADERS:
        raise ValueError(f"unknown loader {kind!r}; choose from {list(LOADERS)}")
    common = dict(device=device, ops=ops, mean=mean, std=std, channels_last=channels_last, executor=executor)
    if kind == "torch":
        from torch.utils.data import DataLoader

        # its own generator: the worker base seed it draws per epoch must not advance torch's global generator
        return TorchLoader(DataLoader(dataset, batch_sampler=batch_sampler, generator=th.Generator().manual_seed(seed)),
                           num_classes, **common)
    threads = max(1, th.get_num_threads())
    # the library, before any work: not installed and installed-but-broken are said apart
    require(_LIBRARY[kind], needed_by=f"--loader {kind}")
    if kind == "dali":
        from nvidia.dali import fn, pipeline_def

        from regpipe.loaders.dali import ArraySource, DaliLoader

        epochs = EpochBatches(batch_sampler)
        source = ArraySource(dataset, epochs)

        @pipeline_def(batch_size=epochs.max_size, num_threads=threads, device_id=None, seed=seed,
                      prefetch_queue_depth=1)
        def pipe():
            x, y, ids = fn.external_source(source=source, num_outputs=3, batch=True, cycle="raise",
                                           layout=["HWC", "", ""])
            return x, y, ids

        return SizedLoader(DaliLoader(pipe(), num_classes, ["images", "labels", "ids"], **common), len(epochs))
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.transforms import ToTensor

    from regpipe.loaders.ffcv import FfcvLoader, write_rows

    folder = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="regpipe-ffcv-"))
    path = write_rows(folder / "train.beton", dataset)
    loader = ffcv_pass_loader(path, EpochBatches(batch_sampler), num_workers=threads, seed=seed,
                              pipelines={"image": [NDArrayDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()],
                                         "index": [IntDecoder(), ToTensor()]})
    return FfcvLoader(loader, num_classes, start_epoch=start_epoch, **common)


class SizedLoader:
    """An iterable with a fixed ``len`` (DALI's iterator over an external source does not know its length);
    other attributes are the wrapped loader's."""

    def __init__(self, inner: Any, length: int) -> None:
        self.inner, self.length = inner, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator:
        return iter(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def ffcv_pass_loader(path: str | Path, epochs: EpochBatches, **kwargs: Any) -> Any:
    """An FFCV ``Loader`` of ``path`` that reads the passes of ``epochs`` in order (batches of one size,
    ``drop_last``); ``kwargs`` go to ``Loader`` (``num_workers``, ``seed``, ``pipelines``...).

    Raises:
        ValueError: batches of different sizes (FFCV takes one batch size).
    """
    from ffcv.loader import Loader

    threads = th.get_num_threads()
    loader = Loader(str(path), batch_size=epochs.one_size(), order=sampler_order(epochs), drop_last=True, **kwargs)
    th.set_num_threads(threads)  # FFCV sets torch's thread count to its worker count: restore it
    # FFCV sizes every epoch by the order it drew when built (``Loader.__len__``, and ``__iter__`` cuts each
    # epoch's order to that many batches). A resumed run's first pass is shorter, so size it by a whole epoch.
    loader.first_traversal_order = np.zeros(len(epochs) * epochs.one_size(), dtype=np.uint64)
    return loader


def sampler_order(epochs: EpochBatches) -> Any:
    """An FFCV traversal order (``Loader(order=...)``) that flattens the index lists, one sampler pass per epoch
    (FFCV needs a fixed batch size: check that the lists have one size first)."""
    from ffcv.traversal_order.base import TraversalOrder

    class SamplerOrder(TraversalOrder):
        # FFCV calls an order *instance* with the loader (`order(loader)`), then `sample_order(epoch)`; the
        # loader asks for epoch 0 twice (its length, then the first pass): cache per epoch.
        def __init__(self) -> None:
            self.cache: dict[int, np.ndarray] = {}

        def __call__(self, loader: Any) -> "SamplerOrder":
            TraversalOrder.__init__(self, loader)
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            if epoch not in self.cache:
                self.cache = {epoch: np.asarray([i for batch in epochs for i in batch], dtype=np.uint64)}
            return self.cache[epoch]

    return SamplerOrder()
