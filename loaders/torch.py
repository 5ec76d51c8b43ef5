"""Torch adapter: any iterable of ``(images, labels[, indices])`` -> regpipe :class:`~regpipe.Batch` es."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from regpipe.batch import Batch, labels_to_targets

__all__ = ["TorchLoader", "Op", "normalize"]

Op = Callable[[Batch], Batch]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` in 0..255 (or float in 0..1) -> ``(x / 255 - mean) / std`` in ``dtype``.

    ``mean``/``std`` are ``(C,)`` in the 0..1 scale. The memory format of ``images`` is kept.
    """
    if images.dtype == torch.uint8:
        x = images.to(dtype).div_(255.0)
    else:
        x = images.to(dtype, copy=True)  # the in-place ops below must not touch the caller's tensor
    c = x.shape[1]
    if mean.numel() != c or std.numel() != c:
        raise ValueError(f"mean/std have {mean.numel()}/{std.numel()} values for {c} channels")
    return x.sub_(mean.to(x.device, dtype).view(1, c, 1, 1)).div_(std.to(x.device, dtype).view(1, c, 1, 1))


class TorchLoader:
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
        keep_uint8: hand the raw uint8 images to the ops (they mix in float themselves).

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
                 channels_last: bool = False, non_blocking: bool = True, keep_uint8: bool = False) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.iterable = iterable
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.ops = list(ops)
        self.mean = torch.tensor(mean, dtype=torch.float32) if mean is not None else None
        self.std = torch.tensor(std, dtype=torch.float32) if std is not None else None
        self.channels_last = channels_last
        self.non_blocking = non_blocking and self.device.type == "cuda"
        self.keep_uint8 = keep_uint8

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def to_batch(self, item: Sequence[torch.Tensor], position: int = 0) -> Batch:
        """Turn one yielded item into a :class:`Batch` on the device (no ops applied)."""
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"the iterable must yield (images, labels) or (images, labels, indices), "
                             f"got {type(item).__name__} of length {len(item) if hasattr(item, '__len__') else '?'}")
        images, labels = item[0], item[1]
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        n = images.shape[0]
        labels = torch.as_tensor(labels)
        if labels.shape != (n,):
            raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}")
        # Range check on the host tensor, before the transfer: it costs no device sync.
        targets = labels_to_targets(labels, self.num_classes)
        if len(item) == 3:
            ids = torch.as_tensor(item[2]).long()
            if ids.shape != (n,):
                raise ValueError(f"indices must be (N,) = ({n},), got {tuple(ids.shape)}")
        else:
            ids = torch.arange(position, position + n)
        x = images.to(self.device, non_blocking=self.non_blocking)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.keep_uint8:
            if self.mean is not None:
                x = normalize(x, self.mean, self.std)
            elif x.dtype == torch.uint8:
                x = x.float().div_(255.0)
        return Batch(inputs=x, targets=targets.to(self.device, non_blocking=self.non_blocking),
                     source_ids=ids.to(self.device, non_blocking=self.non_blocking))

    def apply(self, batch: Batch) -> Batch:
        """Run the ops on a batch."""
        for op in self.ops:
            batch = op(batch)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        position = 0
        for item in self.iterable:
            batch = self.to_batch(item, position)
            position += batch.size
            yield self.apply(batch)
