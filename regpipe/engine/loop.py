"""The training loop as functions with explicit arguments: build the run, take a step, train one epoch,
evaluate, close the epoch, finish.

:class:`Run` holds what a run is built from and reads (settings, data, loaders, the model as trained);
:class:`~regpipe.engine.state.TrainState` holds everything that changes. Each function takes both and
advances the state, so a loop can be driven piece by piece (as timm's ``train_one_epoch``/``validate`` or
Composer's ``State``), tested with a hand-made state, and resumed from a saved one.

The recipe's algorithms (:mod:`regpipe.engine.algorithms`) act at the loop's events; the loop owns what no
algorithm may forget: the order of the events, non-finite losses (:class:`~regpipe.core.checks.NonFiniteLoss`,
naming the epoch and step, raised before the step reaches the weights), and the one step function that
every algorithm taking the steps itself (loss-delta) calls, so mixed precision and fp16 loss scaling hold
for all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from regpipe.core.batch import Batch
from regpipe.core.checks import NonFiniteLoss
from regpipe.engine import distributed
from regpipe.engine.algorithms import Algorithm, Resource, StepInputs, StepReport
from regpipe.engine.algorithms.base import LossFn
from regpipe.engine.config import TrainConfig
from regpipe.engine.evaluation import evaluate, evaluation_model
from regpipe.engine.splits import Splits
from regpipe.engine.state import EpochTotals, TrainState

__all__ = ["Preempted", "ResumeMode", "Run", "close_epoch", "describe", "evaluate_epoch", "evaluation_due", "loss_of",
           "owner", "step_loss", "train_one_epoch", "train_step"]

#: How a state saved inside an epoch continues: ``"skip"`` the batches already trained on (the data order is
#: recomputed), ``"replay"`` the epoch from its start (the step owner skips what it trained on: loss-delta),
#: or only ``"epoch"`` starts (the order depends on the model as it trains: the loss orderer).
ResumeMode = Literal["skip", "replay", "epoch"]


class Preempted(Exception):
    """The run was asked to stop (SIGTERM) and stopped after a step; ``saved`` says whether the state of that
    step was written (else the last saved state, at the latest the epoch's start, is where ``--resume``
    continues)."""

    def __init__(self, epoch: int, step: int, saved: bool, where: str) -> None:
        self.epoch, self.step, self.saved = epoch, step, saved
        at = f"epoch {epoch + 1} step {step}"
        super().__init__(f"stopped by SIGTERM at {at}; " + (f"state saved in {where}" if saved else
                         f"this recipe resumes at epoch starts: {where} holds the start of epoch {epoch + 1}")
                         + "; continue with --resume")


def owner(algorithms: Iterable[Algorithm], resource: Resource) -> Algorithm | None:
    """The algorithm that takes over ``resource``, or ``None`` (the loop's own form)."""
    return next((a for a in algorithms if resource in a.owns), None)


@dataclass
class Run:
    """What one run is built from and reads while it trains (nothing here changes as it trains).

    Attributes:
        cfg: the settings.
        device, info: where it trains; this process's rank.
        splits: the data (train/holdout/test, classes, mean/std).
        model: the model as trained (the DDP wrapper under ``torchrun``; ``TrainState.model`` is unwrapped).
        algorithms: the recipe's algorithms (the same objects as ``TrainState.algorithms``).
        loss_fn: the task loss ``(logits, targets) -> scalar``.
        batches: the training loader (one pass per epoch, from the state's epoch on).
        steps_per_epoch: optimizer steps of a full epoch.
        resume_mode: how a state saved inside an epoch continues (:data:`ResumeMode`).
        bn_batches: clean training batches for re-estimating BatchNorm statistics.
        test_batches: the whole evaluation set; epoch_test_batches: the per-epoch (maybe subset) one.
        val_batches: the held-out validation batches, or ``None``.
        num_samples: training samples before an algorithm added rows.
        expansion: values an algorithm's training set reports for ``metrics.json`` (SIGN's versions).
    """

    cfg: TrainConfig
    device: torch.device
    info: distributed.DistInfo
    splits: Splits
    model: torch.nn.Module
    algorithms: list[Algorithm]
    loss_fn: LossFn
    batches: Iterable[Batch]
    steps_per_epoch: int
    resume_mode: ResumeMode
    bn_batches: Iterable[Batch]
    test_batches: Iterable[Batch]
    epoch_test_batches: Iterable[Batch]
    val_batches: Iterable[Batch] | None
    num_samples: int
    expansion: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_validation(self) -> bool:
        return self.cfg.schedule == "plateau" or any(a.needs_validation for a in self.algorithms)

    def mixing(self) -> bool:
        """Whether evaluation re-estimates BatchNorm statistics (an algorithm mixes the inputs now)."""
        return self.cfg.bn_recalibration and any(a.mixing() for a in self.algorithms)


def describe(algorithms: Iterable[Algorithm], recipe: str) -> dict[str, Any]:
    """The algorithms' state for the log (``{"k": 4, "m": 4}``).

    Raises:
        ValueError: two algorithms log the same key (named).
    """
    state: dict[str, Any] = {}
    for alg in algorithms:
        for key, value in alg.describe().items():
            if key in state:
                raise ValueError(f"two algorithms of {recipe!r} log the same key {key!r}")
            state[key] = value
    return state


def step_loss(algorithms: Sequence[Algorithm], model: torch.nn.Module, batch: Batch,
              loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss on ``batch`` (after the ops): the forward owner's (PatchUp), or
    ``prod_a task_scale_a * loss_fn(model(x), targets) + sum_a sum(loss_terms_a)``; and the terms for the log
    (each term and, when there are terms, ``task``: the task loss before the scale), detached.

    The one place a step's loss is made: the loop (:func:`loss_of`) and the Lightning integration
    (:mod:`regpipe.integrations.lightning`) both call it, so a recipe trains the same objective in either.
    """
    forward_owner = owner(algorithms, Resource.FORWARD)
    if forward_owner is not None:
        return forward_owner.forward_loss(model, batch, loss_fn)
    needs_input_grad = any(a.needs_input_grad for a in algorithms)
    x = batch.inputs.detach().requires_grad_(True) if needs_input_grad else batch.inputs
    logits = model(x)
    task = loss_fn(logits, batch.targets)
    step = StepInputs(model=model, batch=batch, inputs=x, logits=logits, loss_fn=loss_fn)
    total, log = math.prod(a.task_scale() for a in algorithms) * task, {}
    for alg in algorithms:
        for name, term in alg.loss_terms(step).items():
            total = total + term
            log[name] = term.detach()
    if log:
        log["task"] = task.detach()
    return total, log


def loss_of(run: Run, state: TrainState, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss on ``batch`` under the run's autocast (:func:`step_loss`)."""
    with state.precision.autocast():
        return step_loss(run.algorithms, run.model, batch, run.loss_fn)


def train_step(run: Run, state: TrainState, batch: Batch) -> StepReport:
    """The loop's step: loss, then ``zero_grad``, backward and optimizer step through the gradient scaler.

    Raises:
        NonFiniteLoss: the loss is not finite; nothing was stepped (the message names the epoch and step).
    """
    loss, log = loss_of(run, state, batch)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"training loss became {loss.item()} at epoch {state.epoch + 1} step {state.step + 1} "
                            f"(recipe {run.cfg.recipe!r}); lower --lr or check the data")
    state.optimizer.zero_grad(set_to_none=True)
    state.precision.backward_and_step(loss, state.optimizer)
    return batch, loss.detach(), log


def _steps(run: Run, state: TrainState) -> Iterable[StepReport]:
    """The epoch's steps: the step owner's epoch (it calls :func:`train_step`), or one step per batch."""
    step_owner = owner(run.algorithms, Resource.STEP)
    if step_owner is None:
        return (train_step(run, state, batch) for batch in run.batches)

    def owned() -> Iterable[StepReport]:
        with state.precision.autocast():  # the owner's own forward passes (its scores)
            yield from step_owner.run_epoch(run.batches, lambda batch: train_step(run, state, batch))
    return owned()


def train_one_epoch(run: Run, state: TrainState, *, observe: Callable[[int, Batch], None] | None = None,
                    checkpoint: Callable[[TrainState], None] | None = None,
                    stop_requested: Callable[[], bool] | None = None, progress: Any = None) -> dict[str, Any]:
    """Train the rest of epoch ``state.epoch`` (all of it, or from ``state.step`` for a resumed state).

    After every step: the schedule and the algorithms' ``after_step``, the epoch's totals, ``observe(epoch,
    batch)``, and every ``cfg.checkpoint_every`` global steps ``checkpoint(state)`` (inside the epoch only
    where the run can resume there: ``run.resume_mode != "epoch"``).

    Args:
        observe: called with every batch trained on (after the ops).
        checkpoint: writes the state (``None``: nothing is written).
        stop_requested: polled after every step; when it returns True the state is checkpointed (where the
            run can resume inside the epoch) and :class:`Preempted` is raised.
        progress: a tqdm bar advanced per step (or ``None``).

    Returns:
        The epoch's row without accuracies: ``epoch`` (1-based), ``train_loss`` (mean over steps and ranks),
        ``steps``, ``images`` (global), ``rows_per_step``, ``images_per_s``, ``lr`` and the algorithms' state
        at the epoch's start.
    """
    cfg, info = run.cfg, run.info
    if state.step == 0:
        state.totals = EpochTotals(describe=describe(run.algorithms, cfg.recipe))
    set_epoch = getattr(run.splits.train, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(state.epoch)  # the epoch's crops (counter-based draws, any worker)
    run.model.train()
    totals = state.totals
    tick = time.perf_counter()
    for batch, loss, log in _steps(run, state):
        state.scheduler.step()
        for alg in run.algorithms:
            alg.after_step()
        totals.loss_sum += float(loss)
        totals.images += batch.size
        state.step += 1
        state.global_step += 1
        for key, value in log.items():
            if math.isfinite(float(value)):  # a step without a choice reports nan
                totals.logged.setdefault(key, []).append(float(value))
        if observe is not None:
            observe(state.epoch, batch)
        if progress is not None:
            progress.update(1)
            if progress.n % 10 == 0 or state.step == run.steps_per_epoch:
                elapsed = totals.seconds + time.perf_counter() - tick
                progress.set_postfix(loss=f"{float(loss):.3f}",
                                     img_s=f"{totals.images * info.world_size / max(elapsed, 1e-9):.0f}")
        inside = state.step < run.steps_per_epoch and run.resume_mode != "epoch"
        due = bool(cfg.checkpoint_every) and state.global_step % cfg.checkpoint_every == 0
        stop = stop_requested is not None and stop_requested()
        if checkpoint is not None and inside and (due or stop):
            totals.seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            checkpoint(state)
        if stop and state.step < run.steps_per_epoch:  # at the epoch's last step: close the epoch, then stop
            raise Preempted(state.epoch, state.step, saved=checkpoint is not None and inside,
                            where=f"{cfg.out}/state.pt")
    totals.seconds += time.perf_counter() - tick
    loss_sum, images = distributed.all_reduce_sum([totals.loss_sum, totals.images], info)
    steps = state.step  # optimizer steps, the same on every rank
    return {"epoch": state.epoch + 1, "train_loss": loss_sum / max(steps * info.world_size, 1), "steps": int(steps),
            "images": int(images), "rows_per_step": images / max(steps, 1),
            "images_per_s": images / max(totals.seconds, 1e-9), "lr": state.scheduler.get_last_lr()[0],
            **totals.describe}


def evaluate_epoch(run: Run, state: TrainState) -> tuple[float, float | None]:
    """Top-1 accuracy on the per-epoch test batches, and on the validation batches when an algorithm or the
    schedule decides from them (else ``None``); summed over ranks, so the decisions agree on every rank.
    BatchNorm statistics are re-estimated on clean batches while the inputs are mixed."""
    with evaluation_model(state.model, run.mixing(), run.bn_batches, run.cfg.bn_batches) as net:
        test = evaluate(net, run.epoch_test_batches, info=run.info)
        val = evaluate(net, run.val_batches, info=run.info) \
            if run.needs_validation and run.val_batches is not None else None
    return test, val


def close_epoch(run: Run, state: TrainState, row: dict[str, Any], test_acc: float | None,
                val_acc: float | None) -> dict[str, Any]:
    """Finish epoch ``state.epoch``: complete its row (accuracies, the epoch means of the algorithms' per-step
    values), append it to the history, let the algorithms and the plateau schedule decide from the
    validation accuracy, and move the state to the next epoch's start. Returns the row."""
    if test_acc is not None:
        row["test_accuracy"] = test_acc
    row.update({f"mean_{key}": sum(v) / len(v) for key, v in state.totals.logged.items() if v})
    if val_acc is not None:
        row["val_accuracy"] = val_acc
    state.history.append(row)
    if val_acc is not None and any([a.after_eval(val_acc, run.model, state.optimizer) for a in run.algorithms]):
        state.stopped = True
    if state.plateau is not None and val_acc is not None:
        # after the cascade, which may load an older optimizer state: the new scale holds from the next step
        scale = state.plateau.report(val_acc)
        for group, base in zip(state.optimizer.param_groups, state.scheduler.base_lrs):
            group["lr"] = base * scale
    state.epoch += 1
    state.step = 0
    state.totals = EpochTotals()
    return row


def evaluation_due(cfg: TrainConfig, epoch: int) -> bool:
    """Epochs ``eval_every``, ``2 * eval_every``, ... and the last evaluate (``epoch`` 0-based)."""
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
