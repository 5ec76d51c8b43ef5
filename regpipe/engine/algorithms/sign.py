"""SIGN as a training algorithm, the paper's protocol: train on the samples plus their SIGN transforms
(the math is in :mod:`regpipe.functional.sign`); the training itself is plain."""

from __future__ import annotations

from typing import Any

import torch

from regpipe.engine.algorithms.base import Algorithm, DataContext, Resource
from regpipe.engine.config import SignConfig
from regpipe.engine.sign_dataset import sign_training_set

__all__ = ["Sign"]


class Sign(Algorithm):
    """``sign``: the training set becomes the samples plus one SIGN version per ``K`` in ``config.iters``,
    transformed with a teacher: ``config.teacher`` (a checkpoint), or the baseline trained by the engine
    first with the same settings and seed (the model ``regpipe compare`` reports as baseline)."""

    name = "sign"
    owns = frozenset({Resource.TRAINING_SET})
    needs_teacher = True

    def __init__(self, config: SignConfig) -> None:
        self.config = config

    def training_set(self, dataset: torch.utils.data.Dataset,
                     ctx: DataContext) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
        if ctx.teacher is None:
            raise ValueError("the sign algorithm needs a teacher checkpoint (the engine provides one)")
        return sign_training_set(self.config, ctx.data, ctx.teacher, ctx.model_name, ctx.dataset_name, ctx.device)

    def describe(self) -> dict[str, Any]:
        return {"sign_iters": ",".join(map(str, self.config.iters))}
