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
    replays_epoch = True  # the orderer's state names the batches it read and which still wait

    def __init__(self, variant: Literal["same", "external"], config: LossDeltaConfig) -> None:
        self.name = "loss-delta" if variant == "same" else "loss-delta-external"  # type: ignore[misc]
        self.variant, self.config = variant, config

    def attach(self, run: RunContext) -> None:
        self.run = run
        self.external = run.validation() if self.variant == "external" else None
        self.orderer: LossDeltaOrderer | None = None
        self._pending_state: dict[str, Any] | None = None

    def run_epoch(self, batches: Iterable[Batch], take_step: TakeStep) -> Iterator[StepReport]:
        # Every trial and committed step is the loop's own step (its forward, autocast and gradient scaling).
        def step(batch: Batch) -> torch.Tensor:
            return take_step(batch)[1]

        if self.orderer is None:  # built on the first epoch: it re-iterates `batches` every epoch
            external_rows = None if self.external is None else min(self.config.external_rows, self.external.size)
            self.orderer = LossDeltaOrderer(
                batches, self.run.model, self.run.loss_fn, self.run.optimizer, k=self.config.k, variant=self.variant,
                relative=self.config.relative, external=self.external, external_size=external_rows, seed=self.run.seed,
                step=step, scaler=self.run.grad_scaler)
            if self._pending_state is not None:  # a resumed run: continue the interrupted epoch where it stopped
                self.orderer.load_state_dict(self._pending_state)
                self._pending_state = None
        self.orderer.step_fn = step
        for batch, info in self.orderer:
            yield batch, info.loss, {"score": info.score}

    def describe(self) -> dict[str, Any]:
        return {"K": self.config.k}

    def state_dict(self) -> dict[str, Any]:
        """The orderer's state (its generator, the epoch's ranking and position), once it exists."""
        orderer = self.orderer.state_dict() if self.orderer is not None else self._pending_state
        return {**super().state_dict(), "orderer": orderer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # The orderer is built on the first epoch (it needs the loader): keep the state until then.
        self._pending_state = state.get("orderer")
        if self.orderer is not None and self._pending_state is not None:
            self.orderer.load_state_dict(self._pending_state)
            self._pending_state = None


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

    def batch_order(self) -> torch.utils.data.Sampler:
        return self.sampler  # live: it scores with the model as the epoch runs

    def describe(self) -> dict[str, Any]:
        return {"order": self.config.order}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sampler.load_state_dict(state["sampler"])
