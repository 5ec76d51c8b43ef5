"""The base augmentation of every recipe (``--augment``): the standard CIFAR pad-and-crop and horizontal flip.

The papers compared here train every method, and the baseline, on inputs augmented with a random crop of the
image padded by 4 black pixels and a horizontal flip; each method's own ops act on top of it. In memory this
is :class:`BaseAugmentation`'s device op, at :attr:`~regpipe.engine.algorithms.base.Stage.AUGMENT`, the
first stage, so replication copies and mixing see augmented rows. Data streamed from disk is augmented by
its loader's random-resized crop and flip instead (the ImageNet protocol), and gets no op.
"""

from __future__ import annotations

import torch

from regpipe.core.batch import Batch
from regpipe.core.op import Op
from regpipe.engine.algorithms.base import Algorithm, RunContext, Stage
from regpipe.engine.config import augment_words
from regpipe.ops.augment import Augment, AugmentParams, RandomFlip, RandomPadCrop, RandomTransform

__all__ = ["BaseAugmentation", "FilledAugment", "base_augment"]


class FilledAugment(Augment):
    """An :class:`~regpipe.ops.augment.Augment` chain whose pixels from outside the frame are ``fill`` instead of 0.

    The engine's ops see normalised float images, where 0 is the dataset's mean colour; the CIFAR crop pads
    with black, whose normalised value is ``-mean / std`` per channel. Warping ``x - fill`` and adding
    ``fill`` back gives exactly that padding (a uint8 batch is warped as it is: its 0 is black already).

    Args:
        transforms, seed: as :class:`~regpipe.ops.augment.Augment`.
        fill: ``(C,)`` float, the value of an outside pixel in each channel.
    """

    def __init__(self, transforms: list[RandomTransform], fill: torch.Tensor, seed: int = 0) -> None:
        super().__init__(transforms, seed=seed)
        if fill.dim() != 1 or not fill.dtype.is_floating_point:
            raise ValueError(f"fill must be a (C,) float tensor, got {tuple(fill.shape)} {fill.dtype}")
        self.fill = fill

    def apply(self, batch: Batch, params: AugmentParams) -> Batch:
        x = batch.inputs
        if x.dtype == torch.uint8:
            return super().apply(batch, params)
        if x.shape[1] != self.fill.shape[0]:
            raise ValueError(f"fill has {self.fill.shape[0]} channels, the batch {x.shape[1]}")
        fill = self.fill.to(device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        out = super().apply(batch.replace(inputs=x - fill), params)
        return out.replace(inputs=out.inputs + fill)


def base_augment(words: tuple[str, ...], pad: int, seed: int, fill: torch.Tensor | None = None) -> Augment:
    """The base chain of ``words`` (:func:`~regpipe.engine.config.augment_words`): ``crop`` a
    :class:`~regpipe.ops.augment.RandomPadCrop` of ``pad`` pixels, ``flip`` a horizontal
    :class:`~regpipe.ops.augment.RandomFlip` (p = 0.5), in that order, with its own generator seeded ``seed``;
    with ``fill`` (``(C,)``) a :class:`FilledAugment` padding with it.

    Raises:
        ValueError: no words (there is no chain to build).
    """
    if not words:
        raise ValueError("the base augmentation needs at least one of crop, flip")
    made = {"crop": lambda: RandomPadCrop(pad), "flip": lambda: RandomFlip(horizontal=0.5)}
    transforms = [made[w]() for w in words]
    return Augment(transforms, seed=seed) if fill is None else FilledAugment(transforms, fill, seed=seed)


class BaseAugmentation(Algorithm):
    """``--augment crop,flip`` (or ``crop``, ``flip``) on in-memory data: one op that draws every row's crop offset
    and flip from its own generator (seeded with the run's seed, reseeded per rank and saved with the run's state
    like every op), before any other op of the recipe. The crop pads with black: the normalised value of a zero
    image, read through the run's own ``prepare``.

    It is not a recipe word: :func:`~regpipe.engine.algorithms.build_algorithms` adds it to every recipe whose
    config asks for a base augmentation on in-memory data.
    """

    name = "augment"

    def __init__(self, augment: str, pad: int) -> None:
        self.words = augment_words(augment)
        self.pad = pad

    def attach(self, run: RunContext) -> None:
        shape = run.known_image_shape()
        if shape is None:
            raise ValueError("the base augmentation needs the training images' shape (RunContext.image_shape)")
        if "crop" in self.words and self.pad >= min(shape[1:]):
            raise ValueError(f"--augment-pad {self.pad} must be less than the images' height and width "
                             f"({shape[1]} x {shape[2]}): a larger shift leaves no pixel of the image")
        index = torch.zeros(1, dtype=torch.long)
        black = run.prepare((torch.zeros(1, *shape), index, index))  # a zero image, normalised as the rows are
        # kept on the run's device: no per-batch host -> device copy
        self.op = base_augment(self.words, self.pad, run.seed, fill=black.inputs[0, :, 0, 0].float())

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.AUGMENT, self.op)]
