"""The base augmentation of every recipe (``--augment``): the standard CIFAR pad-and-crop and horizontal flip.

The papers compared here train every method, and the baseline, on inputs augmented with a random crop of the
image padded by 4 zero pixels and a horizontal flip; each method's own ops act on top of it. In memory this
is :class:`BaseAugmentation`'s device op, at :attr:`~regpipe.engine.algorithms.base.Stage.AUGMENT`, the
first stage, so replication copies and mixing see augmented rows. Data streamed from disk is augmented by
its loader's random-resized crop and flip instead (the ImageNet protocol), and gets no op.
"""

from __future__ import annotations

from regpipe.core.op import Op
from regpipe.engine.algorithms.base import Algorithm, RunContext, Stage
from regpipe.engine.config import augment_words
from regpipe.ops.augment import Augment, RandomFlip, RandomPadCrop, RandomTransform

__all__ = ["BaseAugmentation", "base_augment"]


def base_augment(words: tuple[str, ...], pad: int, seed: int) -> Augment:
    """The base chain of ``words`` (:func:`~regpipe.engine.config.augment_words`): ``crop`` a
    :class:`~regpipe.ops.augment.RandomPadCrop` of ``pad`` pixels, ``flip`` a horizontal
    :class:`~regpipe.ops.augment.RandomFlip` (p = 0.5), in that order, with its own generator seeded ``seed``.

    Raises:
        ValueError: no words (there is no chain to build).
    """
    made: dict[str, RandomTransform] = {"crop": RandomPadCrop(pad), "flip": RandomFlip(horizontal=0.5)}
    if not words:
        raise ValueError("the base augmentation needs at least one of crop, flip")
    return Augment([made[w] for w in words], seed=seed)


class BaseAugmentation(Algorithm):
    """``--augment crop,flip`` (or ``crop``, ``flip``) on in-memory data: one :class:`~regpipe.ops.augment.Augment`
    op that draws every row's crop offset and flip from its own generator (seeded with the run's seed, reseeded
    per rank and saved with the run's state like every op), before any other op of the recipe.

    It is not a recipe word: :func:`~regpipe.engine.algorithms.build_algorithms` adds it to every recipe whose
    config asks for a base augmentation on in-memory data.
    """

    name = "augment"

    def __init__(self, augment: str, pad: int) -> None:
        self.words = augment_words(augment)
        self.pad = pad

    def attach(self, run: RunContext) -> None:
        shape = run.known_image_shape()
        if shape is not None and "crop" in self.words and self.pad >= min(shape[1:]):
            raise ValueError(f"--augment-pad {self.pad} must be less than the images' height and width "
                             f"({shape[1]} x {shape[2]}): a larger shift leaves no pixel of the image")
        self.op = base_augment(self.words, self.pad, run.seed)

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.AUGMENT, self.op)]
