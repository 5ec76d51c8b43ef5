"""Evaluation: top-1 accuracy over a loader's batches, in eval mode or with BatchNorm statistics
re-estimated on clean batches while the training inputs are mixed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from regpipe.core.batch import Batch
from regpipe.engine import distributed
from regpipe.engine.bn import clean_bn_statistics
from regpipe.engine.data import ArrayDataset, ImageArrays
from regpipe.loaders.torch import TorchLoader
from regpipe.ops.tta import TestTimeSumAugmentation

__all__ = ["eval_batches", "eval_mode", "evaluate", "evaluation_model"]


def eval_batches(arrays: ImageArrays, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                 batch_size: int, info: distributed.DistInfo = distributed.DistInfo()) -> TorchLoader:
    """Normalised evaluation batches of this rank's shard (every ``world_size``-th sample from ``rank``)."""
    if info.distributed:
        arrays = arrays.subset(torch.arange(info.rank, len(arrays.labels), info.world_size))
    loader = DataLoader(ArrayDataset(arrays), batch_size=batch_size, shuffle=False)
    return TorchLoader(loader, arrays.num_classes, device=device, mean=mean, std=std)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], tta: TestTimeSumAugmentation | None = None,
             info: distributed.DistInfo = distributed.DistInfo()) -> float:
    """Top-1 accuracy of ``model`` (already in the mode wanted) over ``batches`` (summed over the ranks'
    shards under ``torchrun``); with ``tta``, of its test-time sum augmentation ensemble."""
    correct = total = 0
    for batch in batches:
        logits = model(batch.inputs) if tta is None else tta.predict(model, batch.inputs)
        correct += int((logits.argmax(dim=1) == batch.targets.argmax(dim=1)).sum())
        total += batch.size
    correct, total = distributed.all_reduce_sum([correct, total], info)
    return correct / max(total, 1)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block, its previous mode restored on exit."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def evaluation_model(model: torch.nn.Module, mixing: bool, clean: Iterable[Batch],
                     num_batches: int) -> contextlib.AbstractContextManager[torch.nn.Module]:
    """``model`` ready to evaluate: while the training inputs are ``mixing``, with its BatchNorm statistics
    re-estimated on ``num_batches`` clean batches (statistics of mixed inputs do not fit clean images);
    otherwise simply in eval mode."""
    if mixing:
        return clean_bn_statistics(model, [b.inputs for _, b in zip(range(num_batches), clean)])
    return eval_mode(model)
