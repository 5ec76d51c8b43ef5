"""Training algorithms: each method is an object acting at named events of the training loop.

After Composer's Algorithm/Event model, with the events written as methods. The loop (``engine.train``)
calls, in this order, for every algorithm of the recipe:

============================  =====================================================================
``training_set(dataset, ...)`` before the model: the rows the run trains on (SIGN adds its versions)
``attach(run)``               once the model, optimizer and budget exist: build ops, hooks, samplers
``ops()``                     the batch ops the loader applies, each at a :class:`Stage`
``copies()``                  the in-batch copies a decoding loader may make itself (:class:`Copies`)
``batch_order()``             the global batches of each epoch (replication: ``batch/m`` seeds)
``forward_loss(step)``        the whole forward and loss of a step (PatchUp mixes hidden layers)
``task_scale()``              factor on the task loss (the invariance objective's ``1 - alpha``)
``loss_terms(step)``          weighted terms added to the loss, read from the loop's forward pass
``run_epoch(batches, step)``  an epoch of its own that takes every optimizer step (loss delta)
``after_step()``              after each optimizer step (the gradual schedule advances)
``after_eval(metric, ...)``   after each validation; returns True to stop (the cascade)
``describe()``                its state, logged every epoch (``{"k": 4}``, ``{"t": 0.3}``)
``close()``                   always, in the loop's ``finally`` (removes the hooks on the model)
============================  =====================================================================

Who may combine with whom is declared, not coded: each algorithm :attr:`~Algorithm.owns` some
:class:`Resource` of the loop and :attr:`~Algorithm.uses` others. Two owners of one resource, or an
owner of a resource another algorithm uses, are refused when the run is built
(:func:`check_compatible`), naming both.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from regpipe.core.batch import Batch
from regpipe.core.op import Op
from regpipe.ops.augment import Augment
from regpipe.sampler.epoch_order import EpochOrder

__all__ = ["Algorithm", "ComposeError", "Copies", "DataContext", "Resource", "RunContext", "Stage", "StepInputs",
           "StepReport", "check_compatible", "staged_ops"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: One optimizer step as an epoch reports it: the batch, its loss and extra per-step log values.
StepReport = tuple[Batch, "torch.Tensor | float", dict[str, Any]]
#: The loop's plain step on one batch: returns its report (forward, loss, backward, optimizer step).
TakeStep = Callable[[Batch], StepReport]


class Resource(str, enum.Enum):
    """Parts of the training loop an algorithm may take over (own) or rely on (use)."""

    FORWARD = "the forward pass and loss"
    STEP = "the optimizer step"
    SAMPLER = "the batch sampler"
    BATCH_ORDER = "the order of batches"
    MIXING = "the input mixing schedule"
    TRAINING_SET = "the training set"


class Stage(enum.IntEnum):
    """Where an op runs in the loader's chain: rows are augmented, then copied, then mixed, then planned.

    The order is fixed so that ``gradual+invariance`` and ``invariance+gradual`` are the same run: the base
    augmentation (``--augment``) sees the loader's rows, replication the augmented seeds, mixing the copies,
    and a PatchUp plan the final rows it pairs.
    """

    AUGMENT = 0
    REPLICATE = 1
    MIX = 2
    PLAN = 3


@dataclass(frozen=True)
class Copies:
    """In-batch copies that a loader decoding files can make itself, instead of the device op of the
    :attr:`Stage.REPLICATE` stage: ``m`` views of each seed, each drawn from ``augment`` on top of the loader's
    own random-resized crop and flip (DALI's :func:`~regpipe.loaders.dali.replicate`, FFCV's
    :class:`~regpipe.loaders.ffcv.ReplicatedCropDecoder`).

    Attributes:
        m: views per seed, ``>= 2``.
        augment: the chain drawn per view after the crop (the replication chain).
    """

    m: int
    augment: Augment


class ComposeError(ValueError):
    """Two algorithms of a recipe cannot run together."""


@dataclass(frozen=True)
class DataContext:
    """What an algorithm may use before the model exists.

    Attributes:
        data: the run's split arrays (``engine.train.RunData``: train, val, test, mean, std).
        device: where the run trains.
        model_name: the run's model (a teacher must be that architecture).
        dataset_name: the run's dataset spec.
        teacher: checkpoint of a trained model, when an algorithm ``needs_teacher``; else ``None``.
    """

    data: Any
    device: torch.device
    model_name: str
    dataset_name: str
    teacher: Path | None = None


@dataclass
class RunContext:
    """What an algorithm may use from the run while it is built.

    Attributes:
        seed: the run's seed (every op's generator starts from it).
        epochs, batch_size, steps_per_epoch: the run's budget.
        model: the model as trained (possibly DDP-wrapped); hooks attach to it.
        optimizer: the run's optimizer.
        loss_fn: ``(logits, targets) -> scalar`` task loss.
        num_train: rows of the training set.
        train: the training arrays (``engine.data.ImageArrays``), for samplers that score samples.
        prepare: ``(images, labels, indices) -> Batch`` on the device, normalised (no ops applied).
        validation: returns the held-out validation set as one :class:`Batch` on the device.
        keep_mix_parent: mixing ops must keep the unmixed rows (an algorithm ``needs_mix_parent``).
        keep_mix_groups: mixing ops must keep a replicated batch's groups (an algorithm ``needs_groups``).
        eval_every: epochs between evaluations (``after_eval`` runs at epochs ``eval_every``,
            ``2 * eval_every``, ... and the last), so budgets counted in evaluations convert from epochs.
        grad_scaler: the loop's gradient scaler (``--amp fp16``), for an algorithm that rolls trial steps back.
        image_shape: ``(C, H, W)`` of the training inputs the model sees, so an algorithm can check its
            settings against it before the first step; ``(0, 0, 0)``: not given (the checks then run on the
            first batch).
    """

    seed: int
    epochs: int
    batch_size: int
    steps_per_epoch: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    num_train: int
    train: Any
    prepare: Callable[..., Batch]
    validation: Callable[[], Batch]
    keep_mix_parent: bool = False
    keep_mix_groups: bool = False
    eval_every: int = 1
    grad_scaler: Any = None
    image_shape: tuple[int, int, int] = (0, 0, 0)

    def known_image_shape(self) -> tuple[int, int, int] | None:
        """:attr:`image_shape`, or ``None`` when it was not given."""
        return self.image_shape if all(int(v) > 0 for v in self.image_shape) else None


@dataclass(frozen=True)
class StepInputs:
    """One step's forward pass, shared by the algorithms that add loss terms.

    Attributes:
        model: the model as trained.
        batch: the batch after every op.
        inputs: ``batch.inputs``, with ``requires_grad`` when an algorithm needs input gradients.
        logits: ``(N, K)`` the model's output on ``inputs`` (with its graph).
        loss_fn: the task loss.
    """

    model: torch.nn.Module
    batch: Batch
    inputs: torch.Tensor
    logits: torch.Tensor
    loss_fn: LossFn


class Algorithm:
    """Base class: every event is a no-op, every claim empty. Subclasses override what they do.

    Class attributes:
        name: the recipe word that selects it (``"gradual"``).
        owns: resources it takes over; at most one algorithm of a recipe owns each.
        uses: resources it needs in the loop's own form (no other algorithm may own them).
        needs_validation: ``after_eval`` reads the validation accuracy.
        needs_input_grad: ``loss_terms`` differentiates with respect to the inputs.
        needs_mix_parent: ``loss_terms`` reads the unmixed rows of a mixed batch (``batch.mixing.parent_*``);
            the mixing algorithms then keep them.
        needs_groups: ``loss_terms`` compares the rows of a batch's replica groups (``Batch.replicas``, e.g. the
            invariance loss); the mixing algorithms then mix the ``m`` copies of a seed with the same partner
            seeds and weights, so a mixed batch keeps its groups (``m`` views of one mixture).
        needs_teacher: ``training_set`` needs a trained model (the engine trains the baseline first when
            the algorithm's config names none).
        replays_epoch: an owner of the step whose state saved inside an epoch continues by replaying the
            epoch's batches from its start and skipping those it trained on (loss-delta); exact when no op
            draws per batch. Without it, a step owner's run resumes at epoch starts.
    """

    name: ClassVar[str] = ""
    owns: ClassVar[frozenset[Resource]] = frozenset()
    uses: ClassVar[frozenset[Resource]] = frozenset()
    needs_validation: ClassVar[bool] = False
    needs_input_grad: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False
    needs_mix_parent: ClassVar[bool] = False
    needs_groups: ClassVar[bool] = False
    replays_epoch: ClassVar[bool] = False

    def training_set(self, dataset: torch.utils.data.Dataset,
                     ctx: DataContext) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
        """The rows to train on and values for ``metrics.json``."""
        return dataset, {}

    def attach(self, run: RunContext) -> None:
        """Build what needs the model, optimizer or budget (ops, hooks, samplers)."""
        return None

    def ops(self) -> list[tuple[Stage, Op]]:
        return []

    def copies(self) -> Copies | None:
        """The copies its :attr:`Stage.REPLICATE` op makes, when a loader that decodes files may make them at decode
        time instead (the engine then leaves that op out of the loader's chain); ``None``: it makes none."""
        return None

    def batch_order(self) -> EpochOrder | torch.utils.data.Sampler | None:
        """The global batches (index lists) of each epoch, when the algorithm owns the sampler: an
        :class:`~regpipe.sampler.epoch_order.EpochOrder` (a function of the epoch: resumable inside an epoch),
        or a live batch sampler iterated once per epoch (resumable at epoch starts)."""
        return None

    def forward_loss(self, model: torch.nn.Module, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError(f"{self.name} does not own the forward pass")

    def task_scale(self) -> float:
        return 1.0

    def loss_terms(self, step: StepInputs) -> dict[str, torch.Tensor]:
        return {}

    def run_epoch(self, batches: Iterable[Batch], take_step: TakeStep) -> Iterator[StepReport]:
        raise NotImplementedError(f"{self.name} does not own the optimizer step")

    def after_step(self) -> None:
        return None

    def after_eval(self, metric: float, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        return False

    def mixing(self) -> bool:
        """True while the inputs are mixed (evaluation then re-estimates BatchNorm statistics)."""
        return False

    def describe(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"ops": [op.state_dict() for _, op in self.ops()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ops = self.ops()
        if len(state.get("ops", [])) != len(ops):
            raise ValueError(f"{self.name}: state holds {len(state.get('ops', []))} op states, the algorithm has "
                             f"{len(ops)} ops")
        for (_, op), op_state in zip(ops, state["ops"]):
            op.load_state_dict(op_state)

    def close(self) -> None:
        return None


def staged_ops(algorithms: Sequence[Algorithm], decode_copier: Algorithm | None = None) -> list[Op]:
    """Every algorithm's ops in :class:`Stage` order (rows are augmented, copied, mixed, then planned), in recipe
    order within a stage: a stable sort, so ``gradual+invariance`` and ``invariance+gradual`` run the same chain.

    ``decode_copier`` is the algorithm whose copies the loader makes at decode: its
    :attr:`Stage.REPLICATE` op is left out (the batch arrives replicated)."""
    staged = sorted(((stage, i, op) for i, alg in enumerate(algorithms) for stage, op in alg.ops()
                     if not (alg is decode_copier and stage == Stage.REPLICATE)),
                    key=lambda t: (t[0], t[1]))
    return [op for _, _, op in staged]


def check_compatible(algorithms: Sequence[Algorithm]) -> None:
    """Refuse a recipe whose algorithms claim the same part of the loop.

    Raises:
        ComposeError: two algorithms own one resource, or one owns what another uses; names both and
            the resource.
    """
    owner: dict[Resource, Algorithm] = {}
    for alg in algorithms:
        for resource in alg.owns:
            if resource in owner:
                raise ComposeError(f"{owner[resource].name!r} and {alg.name!r} both take over {resource.value}: "
                                   "they cannot run in one recipe")
            owner[resource] = alg
    for alg in algorithms:
        for resource in alg.uses:
            if resource in owner and owner[resource] is not alg:
                raise ComposeError(f"{alg.name!r} needs {resource.value} that {owner[resource].name!r} takes over: "
                                   "they cannot run in one recipe")
