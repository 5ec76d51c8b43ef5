"""CutMix, CutOut and MixUp as training algorithms: ``cutmix``, ``cutout``, ``mixup``.

Each runs one op of :mod:`regpipe.ops.cutmix` at :attr:`~regpipe.engine.algorithms.base.Stage.MIX` and owns
:attr:`~regpipe.engine.algorithms.base.Resource.MIXING`, so it combines with the consistency losses
(``cutmix+saliency``, ``cutout+invariance``, ``mixup+saliency``: the saliency paper's augmentation table,
Al-afandi et al. 2022) but not with another mixing method. With ``saliency`` the op keeps the rows before
it, whose maps make each row's expected map. Evaluation uses the BatchNorm statistics as trained (these
papers do; :meth:`~Algorithm.mixing` is False), unlike Sum Augmentation's re-estimation.
"""

from __future__ import annotations

from typing import Any

from regpipe.core.op import Op
from regpipe.engine.algorithms.base import Algorithm, Resource, RunContext, Stage
from regpipe.engine.config import CutMixConfig, CutOutConfig, MixUpConfig
from regpipe.ops.cutmix import CutMix, CutOut, MixUp

__all__ = ["CutMixAlgorithm", "CutOutAlgorithm", "MixUpAlgorithm"]


class _MixStage(Algorithm):
    """One op at the MIX stage, built in :meth:`attach` from the run's seed."""

    owns = frozenset({Resource.MIXING})
    op: Op

    def __init__(self, config: CutMixConfig | CutOutConfig | MixUpConfig) -> None:
        self.config = config

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.MIX, self.op)]


class CutMixAlgorithm(_MixStage):
    """``cutmix``: :class:`~regpipe.ops.cutmix.CutMix` on every batch (with probability ``prob``)."""

    name = "cutmix"

    def attach(self, run: RunContext) -> None:
        self.op = CutMix(alpha=self.config.alpha, prob=self.config.prob, seed=run.seed,
                         keep_parent=run.keep_mix_parent, keep_groups=run.keep_mix_groups)

    def describe(self) -> dict[str, Any]:
        return {"cutmix_alpha": self.config.alpha, "cutmix_prob": self.config.prob}


class CutOutAlgorithm(_MixStage):
    """``cutout``: :class:`~regpipe.ops.cutmix.CutOut` holes of side ``length`` in every row."""

    name = "cutout"

    def attach(self, run: RunContext) -> None:
        """Build the op and, when the run gives its image shape, refuse a hole as large as the images before
        the first step (:meth:`~regpipe.ops.cutmix.CutOut.check_image_size`)."""
        self.op = CutOut(length=self.config.length, prob=self.config.prob, seed=run.seed,
                         keep_parent=run.keep_mix_parent)
        shape = run.known_image_shape()
        if shape is not None:
            self.op.check_image_size(shape[1], shape[2])

    def describe(self) -> dict[str, Any]:
        return {"cutout_length": self.config.length}


class MixUpAlgorithm(_MixStage):
    """``mixup``: :class:`~regpipe.ops.cutmix.MixUp`, pairs blended with ``lam ~ Beta(alpha, alpha)``."""

    name = "mixup"

    def attach(self, run: RunContext) -> None:
        self.op = MixUp(alpha=self.config.alpha, seed=run.seed, keep_parent=run.keep_mix_parent,
                        keep_groups=run.keep_mix_groups)

    def describe(self) -> dict[str, Any]:
        return {"mixup_alpha": self.config.alpha}
