"""The training state: everything a run changes as it trains, in one object that saves and restores whole.

:class:`TrainState` is what the loop's functions (:mod:`regpipe.engine.loop`) take and advance, and what
``OUT/state.pt`` holds (written atomically by :func:`regpipe.engine.resume.save_state`). A run rebuilt from
the same settings and given a saved state continues exactly where the saved one stopped:

* the position: epoch, optimizer steps in that epoch and in the run, whether the run has stopped;
* the model, the optimizer, the learning-rate schedule and the gradient scaler (``--amp fp16``);
* every algorithm's state (its ops' generators, the cascade, the gradual step count, the orderers), the
  plateau schedule;
* the epoch's running sums (loss, rows, per-step values, seconds) and the history of finished epochs;
* every random generator: torch's CPU and CUDA generators, numpy's and Python's global ones, and the
  generator of the clean BatchNorm re-estimation batches. The data order needs none: epoch ``e``'s batches
  are a function of ``(seed, e)`` (:mod:`regpipe.sampler.epoch_order`), and the loaders' crops are
  counter-based in ``(seed, epoch, sample index)``; a live sampler (the loss orderer) keeps its generator
  in its algorithm's state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from regpipe.engine.algorithms import Algorithm
from regpipe.engine.precision import Precision
from regpipe.engine.schedule import Plateau

__all__ = ["EpochTotals", "TrainState", "rng_state", "set_rng_state"]


@dataclass
class EpochTotals:
    """Running sums of the epoch in progress (reset at each epoch start).

    Attributes:
        loss_sum: sum of the per-step training losses (this rank's).
        images: training rows stepped on (this rank's).
        logged: per-step values the algorithms report, by key (loss terms, loss-delta scores).
        seconds: training time of the epoch so far (a resumed epoch adds to it).
        describe: the algorithms' state at the epoch's start (``{"k": 4}``), logged in its row.
    """

    loss_sum: float = 0.0
    images: int = 0
    logged: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    describe: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "images": self.images, "seconds": self.seconds,
                "logged": {k: list(v) for k, v in self.logged.items()}, "describe": dict(self.describe)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochTotals:
        return cls(loss_sum=float(state["loss_sum"]), images=int(state["images"]), seconds=float(state["seconds"]),
                   logged={k: list(v) for k, v in state["logged"].items()}, describe=dict(state["describe"]))


def rng_state() -> dict[str, Any]:
    """The global generators' states: torch CPU, every CUDA device, numpy, Python's ``random``."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state` output (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@dataclass
class TrainState:
    """One run's training state (see the module docstring for what it holds and why).

    The objects (model, optimizer, ...) are the run's own, updated in place by the loop; ``epoch``, ``step``
    and the rest are advanced by :func:`regpipe.engine.loop.train_one_epoch`.

    Attributes:
        model: the unwrapped model (not its DDP wrapper: the weights are the same on every rank).
        optimizer, scheduler, precision: the optimizer, its learning-rate schedule, the autocast/grad scaler.
        algorithms: the recipe's algorithms, in recipe order.
        bn_order: generator of the clean batches that re-estimate BatchNorm statistics.
        plateau: the plateau schedule (``--schedule plateau``), or ``None``.
        epoch: the epoch being trained, 0-based (after the last epoch: ``cfg.epochs``).
        step: optimizer steps taken in ``epoch``.
        global_step: optimizer steps taken in the run.
        stopped: an algorithm ended the run early (the cascade after its last stage).
        history: the rows of the finished epochs (``metrics.json``'s ``epochs``).
        totals: the running sums of ``epoch``.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    algorithms: list[Algorithm]
    bn_order: torch.Generator
    plateau: Plateau | None = None
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    stopped: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    totals: EpochTotals = field(default_factory=EpochTotals)

    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (``torch.save``-able); the generators' states are read now."""
        return {
            "epoch": self.epoch, "step": self.step, "global_step": self.global_step, "stopped": self.stopped,
            "history": [dict(row) for row in self.history], "totals": self.totals.state_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "precision": self.precision.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "algorithms": [a.state_dict() for a in self.algorithms],
            "bn_order": self.bn_order.get_state(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output into this run's objects.

        Raises:
            ValueError: the state does not fit the run (another number of algorithms, a plateau state
                missing for a plateau run): named.
        """
        if len(state["algorithms"]) != len(self.algorithms):
            raise ValueError(f"the saved state holds {len(state['algorithms'])} algorithm states for "
                             f"{len(self.algorithms)} algorithms")
        if self.plateau is not None and state.get("plateau") is None:
            raise ValueError("the saved state holds no plateau schedule state (it was saved by a cosine run)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state["precision"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        for alg, alg_state in zip(self.algorithms, state["algorithms"]):
            alg.load_state_dict(alg_state)
        self.bn_order.set_state(state["bn_order"])
        set_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.global_step, self.stopped = int(state["global_step"]), bool(state["stopped"])
        self.history = [dict(row) for row in state["history"]]
        self.totals = EpochTotals.from_state(state["totals"])
