"""Maximum loss delta orderer: train on the candidate batch whose step lowers the loss most.

The Maximum Loss Delta Orderer of the Perfect Ordering Approximation (Simionescu, "Deep Learning
Training Procedure Augmentations", 2020, section 2.4.2). For each of the ``K`` candidate batches
``B_j`` in a buffer, from the same (parameters, buffers, optimizer state)::

    theta_j' = one optimizer step from theta on B_j
    score_j  = L(theta; E_j) - L(theta_j'; E_j)                 (the loss drop)
    score_j  = (L(theta; E_j) - L(theta_j'; E_j)) / L(theta; E_j)   (relative variant)

with ``E_j = B_j`` (``variant="same"``, the thesis's Same Batch Loss Delta Variant) or an external
batch ``E`` (``variant="external"``, its Static External Batch Variant: 512 held-out samples redrawn
at each epoch start); the model and the optimizer state are rolled back after every trial. The thesis
ran the trials one after another, with the model weights and SGD momentum copied back after each.
The step of ``argmax_j score_j`` is committed -- its already computed state is copied back from a
second preallocated snapshot, not recomputed -- and the other candidates stay in the buffer; every
batch of the epoch is used exactly once and the buffer drains at the epoch end.

How the state is kept exact (all choices **(ours)**):

* A trial is a plain step: ``optimizer.zero_grad(); loss = loss_fn(model(x), y); loss.backward();
  optimizer.step()`` in the model's current mode, so its BatchNorm running-statistics update is the
  plain step's. The same-batch ``L(theta; B_j)`` is that forward's loss (train mode: batch statistics).
* The other score losses (``L(theta'; E_j)``, ``L(theta; E)``) run in the model's current mode under
  ``torch.no_grad()`` inside :func:`~regpipe.sampler.snapshot.frozen_running_stats`: in train mode they
  use batch statistics and update no running statistics, so they leave no trace in the state.
* Between trials the start state is restored in place (:class:`~regpipe.sampler.snapshot.StateSnapshot`);
  the best trial's post-step state is saved in a second snapshot and restored at the end (skipped when
  the last candidate wins: its state is already live). Afterwards parameters, buffers and optimizer
  state equal -- bitwise on deterministic kernels -- those of a plain step on the winner.
  With the exact commit ``.grad`` holds the last trial's gradients, not the winner's; the global RNG
  (dropout) has been advanced by every trial.
* Under DDP (any model with ``no_sync()``; ``commit="auto"``) trials run inside ``model.no_sync()``:
  each rank scores its own candidates on local gradients. The winner's local step is not the step
  DDP would take (DDP averages gradients over ranks), so an exact commit is impossible there: the
  start state is restored and the winner's step is recomputed through DDP with gradient sync.
  ``commit="recompute"`` forces that path on one process too.

``approximate=True`` is an **approximation (ours)**: ``score_j = sum_groups lr * <g(B_j), g(E_j)>``
with ``g(B) = grad_theta L(theta; B)``, the first-order Taylor term of
``L(theta - lr g(B_j); E_j) = L(theta; E_j) - lr <g(B_j), g(E_j)> + O(lr^2)``, i.e. the predicted loss
drop of a plain SGD step (for momentum or Adam it is only a proxy), with no trial step. Each
candidate costs one forward/backward; the winner's gradients and BatchNorm buffers are kept, and the
committed step is ``optimizer.step()`` on them -- the same state as a plain step.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from regpipe.core.batch import Batch
from regpipe.core.checks import NonFiniteLoss
from regpipe.sampler.snapshot import StateSnapshot, frozen_running_stats, tracked_parameters

__all__ = ["LossDeltaOrderer", "DeltaStep", "draw_external"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: The training loop's step on one batch: returns the (detached) loss it stepped on.
StepFn = Callable[[Batch], "torch.Tensor | float"]
ExternalSource = Batch | Callable[[torch.Generator], Batch]


@dataclass(frozen=True)
class DeltaStep:
    """What one committed step of :class:`LossDeltaOrderer` did (for training logs).

    Attributes:
        epoch, step: epoch index and step index within the epoch (0-based).
        loss: the committed batch's training loss before its step.
        score: the winner's score (``nan`` with no choice: one candidate, or a step between rescorings).
        scores: every candidate's score in buffer (arrival) order; empty when nothing was scored.
        winner, candidates: the winner's buffer position and the buffer size. rescored: scored now.
    """

    epoch: int
    step: int
    loss: float
    score: float
    scores: tuple[float, ...]
    winner: int
    candidates: int
    rescored: bool


def draw_external(pool: Batch, size: int, generator: torch.Generator) -> Batch:
    """Draw ``size`` rows of ``pool`` without replacement (the external batch ``E`` of the external variant).

    Args:
        pool: held-out rows, inputs ``(M, C, H, W)``, targets ``(M, K)``.
        size: rows to draw, ``1 <= size <= M``.
        generator: a CPU ``torch.Generator`` (the index draw is tiny; it is moved to the pool's device).

    Raises:
        ValueError: ``size`` is not in ``[1, M]`` (both numbers are named).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"external_size must be an int >= 1, got {size!r}")
    if pool.size < size:
        raise ValueError(f"the external set has {pool.size} rows, fewer than external_size={size}")
    idx = torch.randperm(pool.size, generator=generator)[:size].to(pool.device)
    return pool.rows(idx)


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(f"{type(optimizer).__name__}.step() requires a closure (it re-evaluates the loss, "
                        "e.g. LBFGS); the loss-delta orderer needs an optimizer whose step() takes none")


class LossDeltaOrderer:
    """Reorder a batch stream by loss delta and take the training steps (Simionescu 2020, section 2.4.2).

    Iterating the orderer runs one epoch over ``batches`` and yields ``(batch, DeltaStep)`` *after* the
    batch's optimizer step was taken -- the loop only logs, steps schedulers, evaluates.

    Args:
        batches: re-iterable source of :class:`~regpipe.Batch` es (a ``TorchLoader``, DALI or FFCV
            adapter), iterated once per epoch.
        model: the model (``nn.Module``; DDP-wrapped is fine). Its mode is left to the caller.
        loss_fn: ``loss_fn(logits (N, K), targets (N, K)) -> scalar`` (e.g. ``soft_target_cross_entropy``).
        optimizer: any ``torch.optim.Optimizer`` whose ``step()`` needs no closure.
        k: buffer size ``K >= 1``; ``K = 1`` is plain training in arrival order.
        variant: ``"same"`` (``E_j = B_j``) or ``"external"`` (``E_j = E``).
        relative: divide the score by ``L(theta; E_j)``.
        external: for ``"external"``: a held-out :class:`~regpipe.Batch` (``external_size`` rows are
            redrawn from it at each epoch start; used whole when ``external_size`` is ``None`` or equal
            to its size) or a callable ``generator -> Batch`` called at each epoch start.
        external_size: rows of the external batch (the thesis: 512), or ``None``.
        approximate: first-order **approximate** scores (see the module docstring).
        seed: seeds the CPU generator of the external draws.
        rescore_every: score the buffer every ``r`` steps; in between, hand out the remaining
            candidates of the last scoring in score order (then arrival order) with plain steps.
        commit: ``"exact"`` (restore the winner's computed state), ``"recompute"`` (restore the start
            state and redo the winner's step, through DDP's gradient sync), ``"auto"``: recompute when
            ``model`` has ``no_sync`` (DDP), else exact.
        step: the training loop's own step, ``step(batch) -> loss`` (detached): ``zero_grad``, forward,
            backward and optimizer step, raising :class:`~regpipe.core.checks.NonFiniteLoss` before stepping
            on a non-finite loss. Every trial and plain step goes through it, so the loop's forward (a
            PatchUp forward), mixed precision and gradient scaling apply. Default: the plain step
            ``loss_fn(model(x), targets)`` with ``optimizer.step()``. Not with ``approximate``.
        scaler: the ``torch.amp.GradScaler`` that ``step`` uses (``--amp fp16``): its scale and growth
            tracker are rolled back with the model after each trial, as the optimizer state is.

    Attributes:
        last_step: the :class:`DeltaStep` of the latest step. last_scores: its scores, ``(n,)`` float64
            CPU tensor, or ``None`` when nothing was scored. external_batch: this epoch's ``E``.

    Raises:
        ValueError: ``k`` or ``rescore_every`` < 1, an unknown ``variant``/``commit``, ``external``
            missing for ``"external"`` (or given for ``"same"``), an external set with fewer rows than
            ``external_size`` (at construction for a Batch, at the epoch start for a callable),
            ``commit="exact"`` on a DDP model. While iterating: a non-finite training loss of a candidate or
            of a plain step, or non-finite scores for every candidate (the epoch and step are named, and
            the model and optimizer keep their state before that step, so they can be saved).
        TypeError: an optimizer that is not a ``torch.optim.Optimizer`` or whose step needs a closure;
            ``batches`` yielding something other than a :class:`~regpipe.Batch`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from regpipe import Batch
        >>> from regpipe.functional.losses import soft_target_cross_entropy
        >>> from regpipe.sampler import LossDeltaOrderer
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                       nn.Linear(4, 2))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> batches = [Batch.from_labels(torch.randn(8, 3, 6, 6), torch.arange(8) % 2, 2, torch.arange(8) + 8 * i)
        ...            for i in range(5)]
        >>> orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, optimizer, k=4)
        >>> for epoch in range(2):
        ...     used = []
        ...     for batch, info in orderer:  # the step on `batch` is already taken
        ...         used.append(int(batch.source_ids[0]))  # log info.loss, info.score, info.scores here
        >>> sorted(used)
        [0, 8, 16, 24, 32]
        >>> orderer.last_step.candidates, orderer.last_step.scores  # the drained buffer's last batch: no choice
        (1, ())
    """

    def __init__(self, batches: Iterable[Batch], model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                 k: int = 4, variant: Literal["same", "external"] = "same", relative: bool = False,
                 external: ExternalSource | None = None, external_size: int | None = 512,
                 approximate: bool = False, seed: int = 0, rescore_every: int = 1,
                 commit: Literal["auto", "exact", "recompute"] = "auto", step: StepFn | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if isinstance(rescore_every, bool) or not isinstance(rescore_every, int) or rescore_every < 1:
            raise ValueError(f"rescore_every must be an int >= 1, got {rescore_every!r}")
        if variant not in ("same", "external"):
            raise ValueError(f"variant must be 'same' or 'external', got {variant!r}")
        if commit not in ("auto", "exact", "recompute"):
            raise ValueError(f"commit must be 'auto', 'exact' or 'recompute', got {commit!r}")
        if variant == "external" and external is None:
            raise ValueError("variant='external' needs an external Batch or a callable returning one")
        if variant == "same" and external is not None:
            raise ValueError("external was given but variant='same' does not use it; pass variant='external'")
        if external_size is not None and (isinstance(external_size, bool) or not isinstance(external_size, int)
                                          or external_size < 1):
            raise ValueError(f"external_size must be an int >= 1 or None, got {external_size!r}")
        if isinstance(external, Batch) and external_size is not None and external.size < external_size:
            raise ValueError(f"the external set has {external.size} rows, fewer than external_size={external_size}")
        if external is not None and not isinstance(external, Batch) and not callable(external):
            raise TypeError(f"external must be a Batch or a callable, got {type(external).__name__}")
        _check_optimizer(optimizer)
        if approximate and step is not None:
            raise ValueError("approximate=True scores gradients without a trial step, so it cannot take the "
                             "trials through step=; pass one or the other")
        if commit == "exact" and hasattr(model, "no_sync"):
            raise ValueError("commit='exact' with a DDP model would commit unsynchronised local steps and let "
                             "the ranks diverge; use commit='auto' or 'recompute'")
        self.batches, self.model, self.loss_fn, self.optimizer = batches, model, loss_fn, optimizer
        self.k, self.variant, self.relative, self.approximate = k, variant, bool(relative), bool(approximate)
        self.external, self.external_size = external, external_size
        self.seed, self.rescore_every = seed, rescore_every
        self.recompute = commit == "recompute" or (commit == "auto" and hasattr(model, "no_sync"))
        self.step_fn = step
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.external_batch: Batch | None = None
        self.last_step: DeltaStep | None = None
        self.last_scores: torch.Tensor | None = None
        self._params = tracked_parameters(model, optimizer)
        self._progress: dict[str, Any] | None = None  # where the running epoch stands (state_dict)
        self._resume: dict[str, Any] | None = None  # a loaded mid-epoch position, used by the next __iter__
        self._where = (0, 0)  # (epoch, step) of the step being taken, for error messages
        self._plain_buffers = StateSnapshot(model, None, params=False, buffers=True)
        # Rollback after each trial: one snapshot of the start state, one of the best trial's state (exact);
        # approximate mode keeps buffers (+ the best trial's gradients) only.
        if approximate:
            self._start = StateSnapshot(model, None, params=False, buffers=True, scaler=self.scaler)
            self._best = StateSnapshot(model, None, params=False, buffers=True, grads=True, scaler=self.scaler)
        else:
            self._start = StateSnapshot(model, optimizer, scaler=self.scaler)
            self._best = StateSnapshot(model, optimizer, scaler=self.scaler)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    # -- epoch loop ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Batch, DeltaStep]]:
        resume, self._resume = self._resume, None
        if resume is None:
            epoch = self.epoch
            self.epoch += 1
            generator_at_start = self.generator.get_state()
            step, pulled, ranking = 0, 0, []  # ranking: buffer positions in stale score order, between rescorings
        else:  # the epoch a mid-epoch state was saved in (load_state_dict)
            epoch, step, pulled = resume["epoch"], resume["step"], resume["pulled"]
            ranking = list(resume["ranking"])
            generator_at_start = resume["generator_at_start"]
            self.generator.set_state(generator_at_start)  # redraws this epoch's external batch
        if self.variant == "external":
            self.external_batch = self._draw_external()
        source = iter(self.batches)
        buffer: list[tuple[int, Batch]] = []  # (arrival index in the epoch, batch)
        if resume is not None:
            kept: dict[int, Batch] = {}
            for arrival in range(pulled):  # the source replays the epoch: skip what was already trained on
                try:
                    batch = next(source)
                except StopIteration:
                    raise ValueError(f"the batches of epoch {epoch + 1} ran out after {arrival} while resuming: the "
                                     f"saved state had read {pulled}; resume with the same batch stream") from None
                if arrival in resume["pending"]:
                    kept[arrival] = self._checked(batch)
            buffer = [(a, kept[a]) for a in resume["pending"]]
        exhausted = False
        while True:
            while not exhausted and len(buffer) < self.k:
                try:
                    batch = next(source)
                except StopIteration:
                    exhausted = True
                    break
                buffer.append((pulled, self._checked(batch)))
                pulled += 1
            if not buffer:
                self._progress = None
                return
            self._where = (epoch, step)
            batches = [b for _, b in buffer]
            if len(buffer) == 1 or (step % self.rescore_every and ranking):
                winner = ranking.pop(0) if ranking and len(buffer) > 1 else 0
                loss = self._plain_step(batches[winner])
                info = DeltaStep(epoch, step, loss, math.nan, (), winner, len(buffer), False)
                self.last_scores = None
            else:
                winner, loss, scores = self._score_and_commit(batches)
                # stale ranking for the steps until the next rescoring: best first, non-finite last
                order = sorted(range(len(buffer)), key=lambda j: -scores[j] if math.isfinite(scores[j]) else math.inf)
                ranking = [j for j in order if j != winner]
                info = DeltaStep(epoch, step, loss, scores[winner], tuple(scores), winner, len(buffer), True)
                self.last_scores = torch.tensor(scores, dtype=torch.float64)
            _, chosen = buffer.pop(winner)
            ranking = [j - (j > winner) for j in ranking if j != winner]  # positions shift after the pop
            self.last_step = info
            step += 1
            # What a state_dict() taken now must hold to resume right after this step.
            # (None after the epoch's last step: a state taken then starts the next epoch.)
            self._progress = None if exhausted and not buffer else {
                "epoch": epoch, "step": step, "pulled": pulled, "pending": [a for a, _ in buffer],
                "ranking": list(ranking), "generator_at_start": generator_at_start}
            yield chosen, info

    @staticmethod
    def _checked(batch: Any) -> Batch:
        if not isinstance(batch, Batch):
            raise TypeError(f"batches must yield regpipe Batch objects, got {type(batch).__name__}")
        return batch

    def _non_finite(self, what: str, value: float, batch: Batch) -> ValueError:
        """The error for a non-finite loss, naming the epoch, the step and the batch (1-based, as the
        training loop counts)."""
        epoch, step = self._where
        return ValueError(f"loss-delta: {what} became {value} at epoch {epoch + 1} step {step + 1} (batch with "
                          f"source ids starting {batch.source_ids[:4].tolist()}); the model was left in its state "
                          "before this step. Check the inputs, or lower the learning rate")

    def _draw_external(self) -> Batch:
        source = self.external
        if isinstance(source, Batch):
            if self.external_size is None or self.external_size == source.size:
                return source
            return draw_external(source, self.external_size, self.generator)
        assert source is not None
        batch = source(self.generator)
        if not isinstance(batch, Batch):
            raise TypeError(f"the external callable must return a Batch, got {type(batch).__name__}")
        if self.external_size is not None and batch.size < self.external_size:
            raise ValueError(f"the external set has {batch.size} rows, fewer than external_size={self.external_size}")
        return batch

    # -- steps -----------------------------------------------------------------------------------------
    def _forward_loss(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model(batch.inputs), batch.targets)

    def _plain_step(self, batch: Batch) -> float:
        """``zero_grad; forward; backward; step`` -- the reference step (through DDP's sync if wrapped), or the
        loop's ``step``.

        Raises:
            ValueError: a non-finite loss (the step is not taken, the model keeps its state).
        """
        self._plain_buffers.save()  # BatchNorm running statistics: a non-finite forward has updated them
        if self.step_fn is not None:
            try:
                return float(self.step_fn(batch))
            except NonFiniteLoss:
                self._plain_buffers.restore()
                raise
        self.optimizer.zero_grad()
        loss = self._forward_loss(batch)
        # Read before the step (the value was read after it anyway, for the log): a non-finite loss must
        # not reach the parameters. Under DDP every rank raises on its own loss, before the gradient sync.
        value = float(loss.detach())
        if not math.isfinite(value):
            self._plain_buffers.restore()
            raise self._non_finite("the training loss", value, batch)
        loss.backward()
        self.optimizer.step()
        return value

    def _trial(self, batch: Batch, j: int) -> torch.Tensor:
        """Candidate ``j``'s trial step (gradients only when approximate); returns its detached loss.

        Raises:
            ValueError: a non-finite loss; the start state is restored first.
        """
        with self._trial_context():
            if self.step_fn is not None:
                try:
                    return torch.as_tensor(self.step_fn(batch)).detach()
                except NonFiniteLoss as err:
                    self._start.restore()
                    raise NonFiniteLoss(f"{err} (loss-delta candidate {j})") from err
            self.optimizer.zero_grad()
            loss = self._forward_loss(batch)
            loss.backward()
            if not self.approximate:
                self.optimizer.step()
        loss = loss.detach()
        if not math.isfinite(float(loss)):  # float(loss) was read below for the log anyway
            self._start.restore()
            raise self._non_finite(f"the training loss of candidate {j}", float(loss), batch)
        return loss

    def _score_loss(self, batch: Batch) -> torch.Tensor:
        """A score loss: current mode, no grad, running statistics untouched."""
        with torch.no_grad(), frozen_running_stats(self.model):
            return self._forward_loss(batch).detach()

    def _trial_context(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def _score_and_commit(self, buffer: list[Batch]) -> tuple[int, float, list[float]]:
        n = len(buffer)
        external = self.external_batch if self.variant == "external" else None
        self._start.save()
        grads_e: list[torch.Tensor | None] | None = None
        before_e: torch.Tensor | None = None
        if external is not None:
            if self.approximate:
                grads_e, before_e = self._external_gradient(external)
            else:
                before_e = self._score_loss(external)
        scores: list[float] = []
        losses: list[float] = []
        best = -1
        for j, batch in enumerate(buffer):
            if j:
                self._start.restore()
            loss = self._trial(batch, j)
            before = before_e if before_e is not None else loss
            if self.approximate:
                drop = self._predicted_drop(grads_e)
            else:
                drop = before - self._score_loss(external if external is not None else batch)
            score = float(drop / before if self.relative else drop)  # relative variant: drop / L(theta; E_j)
            scores.append(score)
            losses.append(float(loss))
            if not math.isfinite(score):
                warnings.warn(f"loss-delta score of candidate {j} (source ids starting "
                              f"{batch.source_ids[:4].tolist()}) is {score}; it is not chosen", RuntimeWarning)
            better = best < 0 or (math.isfinite(score) and (not math.isfinite(scores[best]) or score > scores[best]))
            if better:
                best = j
                if j < n - 1 and not self.recompute:
                    self._best.save()
        if not any(math.isfinite(s) for s in scores):
            # Every trial step made the score non-finite (e.g. the loss after the step is nan): committing
            # any of them would poison the parameters.
            self._start.restore()
            epoch, step = self._where
            raise ValueError(f"loss-delta: the scores of all {n} candidate batches are non-finite ({scores}) at "
                             f"epoch {epoch + 1} step {step + 1}: every trial step diverged; the model was left "
                             "in its state before this step. Lower the learning rate or check the inputs")
        self._commit(buffer[best], last=best == n - 1)
        return best, losses[best], scores

    def _commit(self, winner: Batch, last: bool) -> None:
        if self.recompute:  # DDP: redo the winner's step with gradient sync (module docstring)
            self._start.restore()
            self._plain_step(winner)
            return
        if not last:
            self._best.restore()
        if self.approximate:  # gradients and BN buffers of the winner's forward are live now
            self.optimizer.step()

    # -- first-order approximation -------------------------------------------------------------------------
    def _external_gradient(self, external: Batch) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        self.optimizer.zero_grad()
        with frozen_running_stats(self.model), self._trial_context():
            loss = self._forward_loss(external)
            loss.backward()
        grads = [p.grad.detach().clone() if p.grad is not None else None for p in self._params]
        return grads, loss.detach()

    def _predicted_drop(self, grads_e: list[torch.Tensor | None] | None) -> torch.Tensor:
        """``sum_groups lr * <g_B, g_E>`` over the live gradients (``g_E = g_B`` when ``grads_e`` is None)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        total = torch.zeros((), dtype=torch.float64)
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                g = p.grad
                other = g if grads_e is None else grads_e[index[id(p)]]
                if g is not None and other is not None:
                    total = total + lr * torch.dot(g.reshape(-1).double(), other.reshape(-1).double()).cpu()
        return total

    # -- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, RNG state and, when taken inside an epoch, where that epoch stands.

        A state taken between the steps of an epoch (inside the ``for batch, info in orderer`` loop, after
        the step of ``batch``) records the steps taken, how many batches were read from the source and
        which of them still wait in the buffer (their arrival positions, not their tensors). After
        :meth:`load_state_dict` the next iteration resumes that epoch: it iterates ``batches`` again,
        skips the batches already trained on, refills the buffer with the waiting ones and goes on, so
        the rest of the interrupted epoch is trained as it would have been. The source must yield the same
        batches for that epoch again (a list does; a loader must be restored to the epoch's start).
        """
        return {"epoch": self.epoch, "seed": self.seed, "generator": self.generator.get_state(),
                "k": self.k, "variant": self.variant, "relative": self.relative,
                "approximate": self.approximate, "rescore_every": self.rescore_every,
                "in_epoch": None if self._progress is None else {
                    **self._progress, "pending": list(self._progress["pending"]),
                    "ranking": list(self._progress["ranking"]),
                    "generator_at_start": self._progress["generator_at_start"].clone()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (configuration keys are checked, not applied); a state saved
        inside an epoch makes the next iteration resume that epoch.

        Raises:
            ValueError: the state was saved by an orderer with another configuration (the key is named).
        """
        for key in ("k", "variant", "relative", "approximate", "rescore_every"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={state[key]!r}, this orderer has {getattr(self, key)!r}")
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])
        progress = state.get("in_epoch")
        self._progress = None
        self._resume = None if progress is None else {
            **progress, "pending": [int(a) for a in progress["pending"]],
            "ranking": [int(j) for j in progress["ranking"]]}
