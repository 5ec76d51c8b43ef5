"""Sum Augmentation as training algorithms: fixed ``k`` (``sum``), Cascading (``cascade``) and Gradually
Cascading (``gradual``) schedules. The math is in :mod:`regpipe.functional.sum_mix`."""

from __future__ import annotations

from typing import Any

import torch

from regpipe.core.op import Op
from regpipe.engine.algorithms.base import Algorithm, Resource, RunContext, Stage
from regpipe.engine.cascade import Cascade
from regpipe.engine.config import CascadeConfig, GradualConfig, SumConfig
from regpipe.ops.sum_mix import GradualSumMix, SumMix

__all__ = ["CascadeSum", "GradualSum", "FixedSum"]


def _check_divides(mode: str, k: int, batch_size: int, name: str) -> None:
    """Group mode mixes ``batch_size / k`` groups: refuse a ``k`` that would leave rows unread."""
    if mode == "group" and batch_size % k:
        raise ValueError(f"{name}={k} does not divide batch_size={batch_size}: group mixing would never read "
                         f"{batch_size % k} rows of every batch; choose a batch size that is a multiple of {k}")


class FixedSum(Algorithm):
    """``sum``: every batch mixed with ``k`` equal weights (group mode: ``N`` rows -> ``N / k``)."""

    name = "sum"
    owns = frozenset({Resource.MIXING})

    def __init__(self, config: SumConfig) -> None:
        self.config = config

    def attach(self, run: RunContext) -> None:
        config = self.config
        _check_divides(config.mode, config.k, run.batch_size, "sum.k")
        # drop_remainder only ever trims a short last batch: the batch size is a multiple of k (checked above).
        self.op = SumMix(groups=config.k, mode=config.mode, seed=run.seed, drop_remainder=True,
                         keep_parent=run.keep_mix_parent, keep_groups=run.keep_mix_groups)

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.MIX, self.op)]

    def mixing(self) -> bool:
        return self.op.groups > 1

    def describe(self) -> dict[str, Any]:
        return {"k": self.op.groups}


class CascadeSum(Algorithm):
    """``cascade``: stages of decreasing ``k``; each ends when the validation accuracy has not improved for
    ``patience`` evaluations or its share of the epochs is spent, and the best checkpoint is restored at
    each switch (Cascading Sum Augmentation)."""

    name = "cascade"
    owns = frozenset({Resource.MIXING})
    needs_validation = True

    def __init__(self, config: CascadeConfig) -> None:
        self.config = config

    def attach(self, run: RunContext) -> None:
        config = self.config
        stages = tuple(k for k in config.stages if k >= config.stop_at)
        for k in stages:
            _check_divides(config.mode, k, run.batch_size, "cascade.stages")
        # The epoch budget is shared between the stages (so the last, clean stage is always reached); a stage
        # also ends early on a plateau. The cascade counts evaluations, one every run.eval_every epochs.
        share = max(1, run.epochs // len(stages))
        epochs = [share] * (len(stages) - 1) + [max(1, run.epochs - share * (len(stages) - 1))]
        budgets = [max(1, e // run.eval_every) for e in epochs]
        self.cascade = Cascade(stages=stages, patience=config.patience, stage_epochs=budgets,
                               stop_at=config.stop_at)
        self.op = SumMix(groups=self.cascade.k, mode=config.mode, seed=run.seed, drop_remainder=True,
                         keep_parent=run.keep_mix_parent, keep_groups=run.keep_mix_groups)

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.MIX, self.op)]

    def after_eval(self, metric: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        event = self.cascade.report(metric, model, optimizer)
        self.op.groups = event.k
        return event.finished

    def mixing(self) -> bool:
        return self.op.groups > 1

    def describe(self) -> dict[str, Any]:
        return {"k": self.op.groups}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cascade": self.cascade.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.cascade.load_state_dict(state["cascade"])


class GradualSum(Algorithm):
    """``gradual``: Gradually Cascading Sum Augmentation; ``t`` runs from 0 to 1 over the first
    ``1 - fine_tune_frac`` of the optimizer steps, then the batches pass clean (the fine-tune)."""

    name = "gradual"
    owns = frozenset({Resource.MIXING})

    def __init__(self, config: GradualConfig) -> None:
        self.config = config

    def attach(self, run: RunContext) -> None:
        config = self.config
        _check_divides(config.mode, config.k0, run.batch_size, "gradual.k0")
        gradual_epochs = max(1, round(run.epochs * (1.0 - config.fine_tune_frac)))
        self.op = GradualSumMix(k0=config.k0, gradual_steps=max(1, gradual_epochs * run.steps_per_epoch),
                                mode=config.mode, seed=run.seed, drop_remainder=True,
                                keep_parent=run.keep_mix_parent, keep_groups=run.keep_mix_groups)

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.MIX, self.op)]

    def after_step(self) -> None:
        self.op.step()

    def mixing(self) -> bool:
        return self.op.t < 1.0

    def describe(self) -> dict[str, Any]:
        return {"t": round(self.op.t, 4)}
