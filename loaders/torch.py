"""Torch adapter: any iterable of ``(images, labels[, indices])`` -> regpipe :class:`~regpipe.Batch` es."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from regpipe.core.batch import Batch
from regpipe.functional.normalize import normalize
from regpipe.loaders.common import BatchBuilder, BuilderAdapter, Op

__all__ = ["TorchLoader", "Op", "normalize"]


class TorchLoader(BuilderAdapter):
    """Wrap a torch ``DataLoader`` (or any iterable) so it yields :class:`Batch` es with regpipe ops applied.

    Per batch: check labels on the host (range), move images/labels to ``device`` (``non_blocking``),
    optionally make the images channels_last, convert uint8 to float and normalise on the device, build
    the :class:`Batch` (one-hot targets, ``source_ids`` from the yielded indices, or from the running
    position within the pass when the iterable yields none), then apply ``ops`` in order.

    Args:
        iterable: yields ``(images, labels)`` or ``(images, labels, indices)``; images ``(N, C, H, W)``
            uint8 or float, labels ``(N,)`` int.
        num_classes: number of classes ``K``.
        device: where the batch goes (default: CPU).
        ops: callables ``Batch -> Batch`` applied in order.
        mean, std: per-channel normalisation in the 0..1 scale; ``None`` leaves values unnormalised
            (uint8 is still converted to float in 0..1 unless ``keep_uint8``).
        channels_last: convert the images to ``torch.channels_last``.
        keep_uint8: hand the raw uint8 images to the ops (the first mixing op converts, normalises and mixes).
        executor: who executes the mixing ops' plans: ``"auto"``, ``"fused"`` or ``"torch"``
            (:class:`~regpipe.loaders.common.BatchBuilder`).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from regpipe.loaders.torch import TorchLoader
        >>> from regpipe import SumMix
        >>> data = TensorDataset(torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 4)
        >>> loader = TorchLoader(DataLoader(data, batch_size=8), num_classes=4, ops=[SumMix(groups=2)])
        >>> [b.inputs.shape[0] for b in loader]
        [4, 4]
    """

    def __init__(self, iterable: Iterable, num_classes: int, device: torch.device | str = "cpu",
                 ops: Sequence[Op] = (), mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 channels_last: bool = False, non_blocking: bool = True, keep_uint8: bool = False,
                 executor: str = "auto") -> None:
        self.iterable = iterable
        self.builder = BatchBuilder(num_classes, device=device, ops=ops, mean=mean, std=std,
                                    channels_last=channels_last, non_blocking=non_blocking, keep_uint8=keep_uint8,
                                    executor=executor)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def to_batch(self, item: Sequence[torch.Tensor], position: int = 0, raw: bool = False) -> Batch:
        """Turn one yielded item into a :class:`Batch` on the device (no ops applied; ``raw``: uint8 images stay
        uint8 for the fused stage of :meth:`apply`)."""
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"the iterable must yield (images, labels) or (images, labels, indices), "
                             f"got {type(item).__name__} of length {len(item) if hasattr(item, '__len__') else '?'}")
        return self.builder.build(item[0], item[1], item[2] if len(item) == 3 else None, position, raw=raw)

    def apply(self, batch: Batch) -> Batch:
        """Run the ops on a batch."""
        return self.builder.apply(batch)

    def __iter__(self) -> Iterator[Batch]:
        position = 0
        for item in self.iterable:
            batch = self.to_batch(item, position, raw=True)
            position += batch.size
            yield self.apply(batch)
