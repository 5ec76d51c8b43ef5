"""The scoring samplers as training algorithms: loss-delta batch selection and per-sample loss ordering
(the math is in :mod:`regpipe.sampler`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from regpipe.core.batch import Batch
from regpipe.engine.algorithms.base import Algorithm, Resource, RunContext, StepReport, TakeStep
from regpipe.engine.config import LossDeltaConfig, LossOrderConfig
from regpipe.sampler import LossDeltaOrderer, LossOrderer

__all__ = ["LossDelta", "LossOrder"]


class LossDelta(Algorithm):
    """``loss-delta`` / ``loss-delta-external``: of ``k`` candidate batches, commit the step of the one whose
    trial step lowers the loss most, measured on the batch itself (``same``) or on held-out rows
    (``external``: up to ``external_rows`` of the validation split). It takes every optimizer step."""

    owns = frozenset({Resource.STEP, Resource.BATCH_ORDER})

    def __init__(self, variant: Literal["same", "external"], config: LossDeltaConfig) -> None:
        self.name = "loss-delta" if variant == "same" else "loss-delta-external"  # type: ignore[misc]
        self.variant, self.config = variant, config

    def attach(self, run: RunContext) -> None:
        self.run = run
        self.external = run.validation() if self.variant == "external" else None
        self.orderer: LossDeltaOrderer | None = None

    def run_epoch(self, batches: Iterable[Batch], take_step: TakeStep) -> Iterator[StepReport]:
        if self.orderer is None:  # built on the first epoch: it re-iterates `batches` every epoch
            external_rows = None if self.external is None else min(self.config.external_rows, self.external.size)
            self.orderer = LossDeltaOrderer(
                batches, self.run.model, self.run.loss_fn, self.run.optimizer, k=self.config.k, variant=self.variant,
                relative=self.config.relative, external=self.external, external_size=external_rows, seed=self.run.seed)
        for batch, info in self.orderer:
            yield batch, info.loss, {"score": info.score}

    def describe(self) -> dict[str, Any]:
        return {"K": self.config.k}


class LossOrder(Algorithm):
    """``loss-order``: batches handed out by per-sample loss over a random pool of batches (hardest first by
    default)."""

    name = "loss-order"
    owns = frozenset({Resource.SAMPLER, Resource.BATCH_ORDER})

    def __init__(self, config: LossOrderConfig) -> None:
        self.config = config

    def attach(self, run: RunContext) -> None:
        self.sampler = LossOrderer(run.train, run.model, run.batch_size, order=self.config.order, drop_last=True,
                                   prepare=run.prepare, seed=run.seed)

    def batch_sampler(self) -> torch.utils.data.Sampler:
        return self.sampler

    def describe(self) -> dict[str, Any]:
        return {"order": self.config.order}
