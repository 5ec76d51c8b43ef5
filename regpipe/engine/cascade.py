"""Cascading Sum Augmentation controller: stage k, plateau patience, best-checkpoint restore.

Simionescu (2020), section 3.4: train with ``k`` summed inputs for stages ``k = 8, 4, 2, 1`` (any
strictly decreasing list); after each evaluation keep the best validation checkpoint; when the metric
has not improved for ``patience`` evaluations (or the stage's budget is spent), restore the best
checkpoint and go to the next stage. The last stage, ``k = 1``, fine-tunes on clean data (``stop_at=2``
ends at ``k = 2`` for test-time sum augmentation, as the thesis does).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["Cascade", "CascadeEvent"]


@dataclass(frozen=True)
class CascadeEvent:
    """What :meth:`Cascade.report` decided after one evaluation."""

    improved: bool
    advanced: bool  # moved to the next stage (the best checkpoint was restored first)
    finished: bool  # the last stage ended: stop training
    k: int  # the stage's k from now on


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    """Deep copy of a state dict with every tensor moved to the CPU (a checkpoint that survives training)."""
    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {key: move(v) for key, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(move(v) for v in value)
        return copy.deepcopy(value)
    return move(state)


def _normal(value: Any) -> Any:
    """Sequences as lists and numbers as floats, so a state that went through JSON or ``torch.save``
    compares equal to the live settings."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


class Cascade:
    """Decides the number of sum groups ``k`` stage by stage.

    Train at ``stages[stage]``; after every evaluation call :meth:`report` with the validation metric.
    An improvement stores a checkpoint (model and, if given, optimizer state, on the CPU). When the
    metric has not improved for ``patience`` evaluations, or the stage has used ``stage_epochs``
    evaluations, the best checkpoint is loaded back into the model (and optimizer) and the next stage
    starts. After the last stage (``k = 1``, clean fine-tune; or ``stop_at=2`` for test-time sum
    augmentation) :attr:`finished` is set.

    Args:
        stages: strictly decreasing numbers of sum groups, e.g. ``(8, 4, 2, 1)``.
        patience: evaluations without improvement before the stage ends.
        stage_epochs: optional cap on evaluations per stage (an int for all, or one per stage).
        mode: ``"max"`` (accuracy) or ``"min"`` (loss).
        stop_at: drop the stages below this k (``2`` skips the clean fine-tune).
        min_delta: an improvement must exceed the best by more than this.

    Example:
        >>> cascade = Cascade(stages=(4, 2, 1), patience=1)
        >>> [cascade.report(m).k for m in (0.5, 0.4, 0.6, 0.6)]
        [4, 2, 2, 1]
    """

    def __init__(self, stages: Sequence[int] = (8, 4, 2, 1), patience: int = 3,
                 stage_epochs: int | Sequence[int] | None = None, mode: Literal["max", "min"] = "max",
                 stop_at: int = 1, min_delta: float = 0.0) -> None:
        stages = tuple(int(k) for k in stages)
        if not stages or any(k < 1 for k in stages) or any(a <= b for a, b in zip(stages, stages[1:])):
            raise ValueError(f"stages must be a non-empty strictly decreasing sequence of k >= 1, got {stages}")
        stages = tuple(k for k in stages if k >= stop_at)
        if not stages:
            raise ValueError(f"stop_at={stop_at} leaves no stage")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if isinstance(stage_epochs, int) or stage_epochs is None:
            budgets = (stage_epochs,) * len(stages)
        else:
            budgets = tuple(stage_epochs)
            if len(budgets) != len(stages):
                raise ValueError(f"stage_epochs has {len(budgets)} entries for {len(stages)} stages {stages}")
        if any(b is not None and b < 1 for b in budgets):
            raise ValueError(f"stage_epochs must be >= 1, got {budgets}")
        self.stages, self.patience, self.stage_epochs = stages, patience, budgets
        self.mode, self.min_delta = mode, float(min_delta)
        self.stage = 0
        self.best = -math.inf if mode == "max" else math.inf
        self.evals_since_best = 0
        self.evals_in_stage = 0
        self.finished = False
        self.history: list[dict[str, Any]] = []
        self._best_checkpoint: dict[str, Any] | None = None

    @property
    def k(self) -> int:
        """Number of sum groups of the current stage."""
        return self.stages[self.stage]

    def _better(self, metric: float) -> bool:
        if self.mode == "max":
            return metric > self.best + self.min_delta
        return metric < self.best - self.min_delta

    def report(self, metric: float, model: torch.nn.Module | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> CascadeEvent:
        """Take one evaluation's metric; may restore the best checkpoint into ``model``/``optimizer``."""
        metric = float(metric)
        if not math.isfinite(metric):
            # inf would stay the best metric forever (nothing improves on it) and NaN never compares:
            # either way the schedule would be decided by a broken evaluation.
            raise ValueError(f"the validation metric must be finite, got {metric} (stage k={self.k}, "
                             f"evaluation {self.evals_in_stage + 1} of the stage)")
        if self.finished:
            raise RuntimeError("the cascade has finished; no more stages to train")
        self.evals_in_stage += 1
        improved = self._better(metric)
        if improved:
            self.best, self.evals_since_best = metric, 0
            if model is not None:
                self._best_checkpoint = _cpu_copy({
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else None})
        else:
            self.evals_since_best += 1
        budget = self.stage_epochs[self.stage]
        stage_over = self.evals_since_best >= self.patience or (budget is not None and self.evals_in_stage >= budget)
        advanced = False
        if stage_over:
            self.restore_best(model, optimizer)
            if self.stage + 1 < len(self.stages):
                self.stage += 1
                advanced = True
            else:
                self.finished = True
            self.evals_since_best = 0
            self.evals_in_stage = 0
        self.history.append({"metric": metric, "k": self.k, "improved": improved, "advanced": advanced})
        return CascadeEvent(improved=improved, advanced=advanced, finished=self.finished, k=self.k)

    def restore_best(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Load the best checkpoint into ``model`` (and ``optimizer``); False when there is none yet."""
        if model is None or self._best_checkpoint is None:
            return False
        model.load_state_dict(self._best_checkpoint["model"])
        if optimizer is not None and self._best_checkpoint["optimizer"] is not None:
            # load a copy: the optimizer adopts the given CPU tensors as its state, and later steps
            # would otherwise overwrite the stored best checkpoint
            optimizer.load_state_dict(_cpu_copy(self._best_checkpoint["optimizer"]))
        return True

    def _settings(self) -> dict[str, Any]:
        """What decides the schedule; a state is only loaded into a cascade with the same settings."""
        return {"stages": list(self.stages), "patience": self.patience, "stage_epochs": list(self.stage_epochs),
                "mode": self.mode, "min_delta": self.min_delta}

    def state_dict(self) -> dict[str, Any]:
        """Position (stage, best metric, counters, history), best checkpoint, and the settings that decide
        the schedule (checked by :meth:`load_state_dict`)."""
        return {**self._settings(), "stage": self.stage, "best": self.best,
                "evals_since_best": self.evals_since_best, "evals_in_stage": self.evals_in_stage,
                "finished": self.finished, "history": copy.deepcopy(self.history),
                "best_checkpoint": self._best_checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output.

        Raises:
            ValueError: the state was saved by a cascade with other settings (stages, patience, stage
                budgets, mode, min_delta: each differing one is named). States saved before the settings
                were recorded carry only ``stages``; the others are then not checked.
        """
        mine = self._settings()
        differ = [f"{key}: {state[key]!r} in the state vs {mine[key]!r} here" for key in mine
                  if key in state and _normal(state[key]) != _normal(mine[key])]
        if differ:
            raise ValueError("the cascade state was saved with other settings (" + "; ".join(differ)
                             + "): loading it would silently change the schedule")
        self.stage, self.best = int(state["stage"]), float(state["best"])
        self.evals_since_best, self.evals_in_stage = int(state["evals_since_best"]), int(state["evals_in_stage"])
        self.finished = bool(state["finished"])
        self.history = copy.deepcopy(state["history"])
        self._best_checkpoint = state["best_checkpoint"]
