"""Recipes: which ops a training run applies, and how their schedules follow the run.

A recipe turns a :class:`TrainConfig` into ops for the loader plus two callbacks: ``after_step`` (after
each optimizer step) and ``after_eval`` (after each epoch's validation, may restore a checkpoint and
stop the run). Later issues add recipes to :data:`RECIPES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from regpipe.batch import Batch
from regpipe.cascade import Cascade
from regpipe.ops.sum_mix import GradualSumMix, SumMix

__all__ = ["Recipe", "RECIPES", "build_recipe"]


@dataclass
class Recipe:
    """What a recipe contributes to the training loop.

    Attributes:
        name: the recipe's name.
        ops: ``Batch -> Batch`` callables applied to every training batch, in order.
        needs_validation: whether ``after_eval`` reads a validation metric (held-out training data).
        mixing: returns True while the ops mix inputs (evaluation then re-estimates BN statistics).
        after_step: called after each optimizer step.
        after_eval: called with the validation accuracy, the model and optimizer after each epoch;
            returns True to stop training.
        describe: a short state for the logs (``{"k": 4}``, ``{"t": 0.3}``).
        state: objects with ``state_dict()`` to checkpoint with the run.
    """

    name: str
    ops: list[Callable[[Batch], Batch]] = field(default_factory=list)
    needs_validation: bool = False
    mixing: Callable[[], bool] = lambda: False
    after_step: Callable[[], None] = lambda: None
    after_eval: Callable[[float, torch.nn.Module, torch.optim.Optimizer], bool] = lambda metric, model, opt: False
    describe: Callable[[], dict[str, Any]] = dict
    state: dict[str, Any] = field(default_factory=dict)


def _baseline(cfg: Any, steps_per_epoch: int) -> Recipe:
    return Recipe("baseline")


def _sum(cfg: Any, steps_per_epoch: int) -> Recipe:
    op = SumMix(groups=cfg.k, mode=cfg.mix_mode, seed=cfg.seed, drop_remainder=True)
    return Recipe("sum", ops=[op], mixing=lambda: op.groups > 1, describe=lambda: {"k": op.groups},
                  state={"sum_mix": op})


def _cascade(cfg: Any, steps_per_epoch: int) -> Recipe:
    stages = tuple(cfg.stages)
    # The epoch budget is shared between the stages; a stage also ends early on a plateau.
    share = max(1, cfg.epochs // len(stages))
    budgets = [share] * (len(stages) - 1) + [max(1, cfg.epochs - share * (len(stages) - 1))]
    cascade = Cascade(stages=stages, patience=cfg.patience, stage_epochs=budgets, stop_at=cfg.stop_at)
    op = SumMix(groups=cascade.k, mode=cfg.mix_mode, seed=cfg.seed, drop_remainder=True)

    def after_eval(metric: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        event = cascade.report(metric, model, optimizer)
        op.groups = event.k
        return event.finished

    return Recipe("cascade", ops=[op], needs_validation=True, mixing=lambda: op.groups > 1,
                  after_eval=after_eval, describe=lambda: {"k": op.groups},
                  state={"cascade": cascade, "sum_mix": op})


def _gradual(cfg: Any, steps_per_epoch: int) -> Recipe:
    if not 0.0 <= cfg.fine_tune_frac < 1.0:
        raise ValueError(f"fine_tune_frac must be in [0, 1), got {cfg.fine_tune_frac}")
    gradual_epochs = max(1, round(cfg.epochs * (1.0 - cfg.fine_tune_frac)))
    op = GradualSumMix(k0=cfg.k0, gradual_steps=max(1, gradual_epochs * steps_per_epoch), mode=cfg.mix_mode,
                       seed=cfg.seed, drop_remainder=True)
    return Recipe("gradual", ops=[op], mixing=lambda: op.t < 1.0, after_step=op.step,
                  describe=lambda: {"t": round(op.t, 4)}, state={"gradual_sum_mix": op})


RECIPES: dict[str, Callable[[Any, int], Recipe]] = {
    "baseline": _baseline,
    "sum": _sum,
    "cascade": _cascade,
    "gradual": _gradual,
}


def build_recipe(cfg: Any, steps_per_epoch: int) -> Recipe:
    """The :class:`Recipe` named ``cfg.recipe``; ``ValueError`` listing the known names otherwise."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; choose from {sorted(RECIPES)}")
    return RECIPES[cfg.recipe](cfg, steps_per_epoch)
