"""Reduce-on-plateau learning-rate schedule (``--schedule plateau``).

Simionescu (2020) reduces the learning rate when learning stagnates; here the rule is stated in
evaluations of the validation metric: after every evaluation, call :meth:`Plateau.report` with the
validation accuracy (higher is better). The metric improves when it exceeds the best seen so far by
more than ``min_delta``; after ``patience`` evaluations in a row without an improvement the scale is
multiplied by ``factor`` (never below ``min_scale``) and the count starts again. The learning rate of
every step is ``base_lr * scale``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Plateau"]


def check_plateau(factor: float, patience: int, min_delta: float = 0.0, min_scale: float = 0.0) -> None:
    """Raise ``ValueError`` naming the bad value of a plateau schedule's settings."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor < 1.0:
        raise ValueError(f"plateau factor must be a number in (0, 1), got {factor!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"plateau patience must be an integer >= 1, got {patience!r}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not (
            math.isfinite(min_delta) and min_delta >= 0):
        raise ValueError(f"plateau min_delta must be a finite number >= 0, got {min_delta!r}")
    if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float)) or not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"plateau min_scale must be a number in [0, 1], got {min_scale!r}")


class Plateau:
    """The learning-rate scale of a reduce-on-plateau schedule (pure: no optimizer inside).

    Args:
        factor: multiplier of the scale at each reduction, in (0, 1).
        patience: evaluations without improvement before a reduction, >= 1.
        min_delta: an improvement must exceed the best metric by more than this.
        min_scale: the scale is never reduced below this.

    Raises:
        ValueError: a setting out of range (named with its value).

    Example:
        >>> plateau = Plateau(factor=0.5, patience=2)
        >>> [plateau.report(m) for m in (0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7)]
        [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    """

    def __init__(self, factor: float = 0.1, patience: int = 3, min_delta: float = 0.0, min_scale: float = 0.0):
        check_plateau(factor, patience, min_delta, min_scale)
        self.factor, self.patience, self.min_delta, self.min_scale = float(factor), patience, float(min_delta), \
            float(min_scale)
        self.scale = 1.0
        self.best = -math.inf
        self.bad_evals = 0
        self.reductions = 0

    def report(self, metric: float) -> float:
        """Record one evaluation's validation metric (higher is better); return the scale from now on.

        Raises:
            ValueError: ``metric`` is not a finite number.
        """
        if isinstance(metric, bool) or not isinstance(metric, (int, float)) or not math.isfinite(metric):
            raise ValueError(f"plateau schedule: the validation metric must be a finite number, got {metric!r}")
        if metric > self.best + self.min_delta:
            self.best, self.bad_evals = float(metric), 0
        else:
            self.bad_evals += 1
            if self.bad_evals >= self.patience:
                self.scale = max(self.scale * self.factor, self.min_scale)
                self.bad_evals = 0
                self.reductions += 1
        return self.scale

    def state_dict(self) -> dict[str, Any]:
        """The settings and the running state (plain Python values)."""
        return {"factor": self.factor, "patience": self.patience, "min_delta": self.min_delta,
                "min_scale": self.min_scale, "scale": self.scale, "best": self.best, "bad_evals": self.bad_evals,
                "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: the state was saved with other settings (named with both values).
        """
        for key in ("factor", "patience", "min_delta", "min_scale"):
            if float(state[key]) != float(getattr(self, key)):
                raise ValueError(f"plateau state was saved with {key}={state[key]!r}, this schedule has "
                                 f"{key}={getattr(self, key)!r}")
        self.scale, self.best = float(state["scale"]), float(state["best"])
        self.bad_evals, self.reductions = int(state["bad_evals"]), int(state["reductions"])
