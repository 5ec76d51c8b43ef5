"""Recipes: which ops a training run applies, and how their schedules follow the run.

A recipe turns a :class:`TrainConfig` and the run's :class:`RecipeContext` (model, optimizer, data)
into ops for the loader, optionally a batch sampler for the DataLoader, a training loss of its own
(``compute_loss``) or a whole epoch loop of its own (``run_epoch``, for samplers that take the
optimizer step themselves), and two callbacks: ``after_step`` (after each optimizer step) and
``after_eval`` (after each epoch's validation, may restore a checkpoint and stop the run). Later
issues add recipes to :data:`RECIPES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from regpipe.batch import Batch
from regpipe.cascade import Cascade
from regpipe.hooks.invariance import InvarianceLoss
from regpipe.hooks.patchup import PatchUpHook
from regpipe.hooks.saliency import ConsistencyObjective
from regpipe.ops.augment import Augment, RandomAffine, RandomBrightnessContrast, RandomFlip, Replicate
from regpipe.ops.patchup import PatchUp
from regpipe.ops.sum_mix import GradualSumMix, SumMix
from regpipe.sampler import LossDeltaOrderer, LossOrderer
from regpipe.sign_offline import sign_training_set

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: One training step's report: the batch, its loss (scalar tensor or float) and extra log values.
StepReport = tuple[Batch, "torch.Tensor | float", dict[str, Any]]

__all__ = ["Recipe", "RecipeContext", "RECIPES", "TRAINING_SETS", "build_recipe", "training_set"]


@dataclass
class RecipeContext:
    """What a recipe may use from the run.

    Attributes:
        steps_per_epoch: optimizer steps per epoch.
        model, optimizer, loss_fn: the run's model, optimizer and ``(logits, targets) -> scalar`` loss.
        train: the training arrays (``regpipe.data.ImageArrays``), for samplers that score samples.
        prepare: ``(images, labels, indices) tuple -> Batch`` on the device, normalised (no ops applied).
        validation: returns the held-out validation set as one :class:`Batch` on the device.
    """

    steps_per_epoch: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    train: Any
    prepare: Callable[..., Batch]
    validation: Callable[[], Batch]


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
        compute_loss: ``(model, batch, loss_fn) -> scalar`` training loss; ``None``: ``loss_fn(model(x), targets)``.
        batch_sampler: a ``torch.utils.data.Sampler`` of index lists for the training DataLoader, or ``None``
            (shuffled batches).
        run_epoch: ``batches -> iterator of (batch, loss, log)`` that takes every optimizer step itself;
            ``None``: the training loop's plain step.
        close: releases what the recipe attached to the model (hooks).
        step_log: values to log after each plain training step (e.g. the terms of a combined loss).
    """

    name: str
    ops: list[Callable[[Batch], Batch]] = field(default_factory=list)
    needs_validation: bool = False
    mixing: Callable[[], bool] = lambda: False
    after_step: Callable[[], None] = lambda: None
    after_eval: Callable[[float, torch.nn.Module, torch.optim.Optimizer], bool] = lambda metric, model, opt: False
    describe: Callable[[], dict[str, Any]] = dict
    compute_loss: Callable[[torch.nn.Module, Batch, LossFn], torch.Tensor] | None = None
    batch_sampler: Any | None = None
    run_epoch: Callable[[Iterable[Batch]], Iterator[StepReport]] | None = None
    close: Callable[[], None] = lambda: None
    step_log: Callable[[], dict[str, Any]] = dict


def _baseline(cfg: Any, ctx: RecipeContext) -> Recipe:
    return Recipe("baseline")


def _sum(cfg: Any, ctx: RecipeContext) -> Recipe:
    op = SumMix(groups=cfg.k, mode=cfg.mix_mode, seed=cfg.seed, drop_remainder=True)
    return Recipe("sum", ops=[op], mixing=lambda: op.groups > 1, describe=lambda: {"k": op.groups})


def _cascade(cfg: Any, ctx: RecipeContext) -> Recipe:
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
                  after_eval=after_eval, describe=lambda: {"k": op.groups})


def _gradual(cfg: Any, ctx: RecipeContext) -> Recipe:
    if not 0.0 <= cfg.fine_tune_frac < 1.0:
        raise ValueError(f"fine_tune_frac must be in [0, 1), got {cfg.fine_tune_frac}")
    gradual_epochs = max(1, round(cfg.epochs * (1.0 - cfg.fine_tune_frac)))
    op = GradualSumMix(k0=cfg.k0, gradual_steps=max(1, gradual_epochs * ctx.steps_per_epoch), mode=cfg.mix_mode,
                       seed=cfg.seed, drop_remainder=True)
    return Recipe("gradual", ops=[op], mixing=lambda: op.t < 1.0, after_step=op.step,
                  describe=lambda: {"t": round(op.t, 4)})


def _patchup(mode: str) -> Callable[[Any, int, torch.nn.Module], Recipe]:
    def build(cfg: Any, ctx: RecipeContext) -> Recipe:
        # Official CIFAR setting (SPEC 2): layers {0: input, 1: after the stem conv, 2: after the first
        # residual stage}; gamma/prob per mode; lam ~ Beta(2, 2); BCE on softmax as the loss.
        layers = list(cfg.patchup_layers)
        op = PatchUp(mode=mode, candidate_layers=tuple(range(len(layers) + 1)), seed=cfg.seed)
        hook = PatchUpHook(ctx.model, layers)

        def compute_loss(net: torch.nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
            return hook.loss(hook.forward(batch), batch, kind=cfg.patchup_loss)

        return Recipe(f"patchup-{mode}", ops=[op], compute_loss=compute_loss, close=hook.close,
                      describe=lambda: {"prob": op.patchup_prob})
    return build


def _loss_delta(variant: str) -> Callable[[Any, RecipeContext], Recipe]:
    def build(cfg: Any, ctx: RecipeContext) -> Recipe:
        # SPEC 6.2: K candidate batches, each scored by the loss drop of one trial step (on itself, or
        # on a held-out external batch: here up to 512 rows of the validation split); the winner's
        # computed step is committed.
        external = None
        external_size = None
        if variant == "external":
            external = ctx.validation()
            external_size = min(512, external.size)
        holder: dict[str, LossDeltaOrderer] = {}

        def run_epoch(batches: Iterable[Batch]) -> Iterator[StepReport]:
            if "orderer" not in holder:
                holder["orderer"] = LossDeltaOrderer(
                    batches, ctx.model, ctx.loss_fn, ctx.optimizer, k=cfg.delta_k, variant=variant,
                    relative=cfg.delta_relative, external=external, external_size=external_size, seed=cfg.seed)
            for batch, info in holder["orderer"]:
                yield batch, info.loss, {"score": info.score}

        name = "loss-delta" if variant == "same" else "loss-delta-external"
        return Recipe(name, run_epoch=run_epoch, describe=lambda: {"K": cfg.delta_k})
    return build


def _loss_order(cfg: Any, ctx: RecipeContext) -> Recipe:
    # SPEC 6.1: per-sample loss ordering over a random pool of 4 batches, hardest first.
    sampler = LossOrderer(ctx.train, ctx.model, cfg.batch_size, order=cfg.order, drop_last=True,
                          prepare=ctx.prepare, seed=cfg.seed)
    return Recipe("loss-order", batch_sampler=sampler, describe=lambda: {"order": cfg.order})


def replication_augment(seed: int) -> Augment:
    """The augmentation of the replication recipes: flips, a mild affine, brightness/contrast."""
    return Augment([RandomFlip(horizontal=0.5), RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                    RandomBrightnessContrast((0.8, 1.2), (0.8, 1.2))], seed=seed)


def _seed_sampler(cfg: Any, ctx: RecipeContext) -> torch.utils.data.BatchSampler:
    """Batches of ``batch_size / m`` seeds, ``steps_per_epoch`` of them per epoch: after replication a step
    sees ``batch_size`` rows and an epoch as many rows as the baseline's (equal compute; each epoch
    draws a fresh random ``1/m`` of the training set, so every seed is seen ``epochs / m`` times in
    ``m`` views)."""
    m = cfg.replicas
    if cfg.batch_size % m:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by replicas={m}")
    seeds = cfg.batch_size // m
    sampler = torch.utils.data.RandomSampler(range(len(ctx.train.labels)), num_samples=ctx.steps_per_epoch * seeds,
                                             generator=torch.Generator().manual_seed(cfg.seed))
    return torch.utils.data.BatchSampler(sampler, seeds, drop_last=True)


def _replicated(kind: str) -> Callable[[Any, RecipeContext], Recipe]:
    def build(cfg: Any, ctx: RecipeContext) -> Recipe:
        if isinstance(cfg.replicas, bool) or cfg.replicas < 2:
            raise ValueError(f"replicas must be >= 2 for the {kind!r} recipe, got {cfg.replicas}")
        op = Replicate(cfg.replicas, replication_augment(cfg.seed), include_original=True)
        recipe = Recipe(kind, ops=[op], batch_sampler=_seed_sampler(cfg, ctx), describe=lambda: {"m": op.m})
        if kind == "invariance":
            # SPEC 3.2: (1 - alpha) * task + sum_l alpha_l L_inv^l, alpha_l exponential in depth.
            hook = InvarianceLoss(ctx.model, cfg.inv_layers, alpha=cfg.inv_alpha, ratio=cfg.inv_ratio)
            recipe.compute_loss, recipe.close = hook, hook.close
            recipe.step_log = lambda: {"invariance": hook.last["invariance"]}
        elif kind in ("saliency", "class+inv+sal"):
            # SPEC 4: alpha * class + beta * inv + gamma * sal; saliency alone has beta = 0.
            alpha, beta, gamma = cfg.loss_weights
            objective = ConsistencyObjective(ctx.model, inv_layers=cfg.inv_layers, alpha=alpha,
                                             beta=beta if kind == "class+inv+sal" else 0.0, gamma=gamma,
                                             inv_ratio=cfg.inv_ratio)
            recipe.compute_loss, recipe.close = objective, objective.close
            recipe.step_log = lambda: {k: v for k, v in objective.last.items() if k in ("invariance", "saliency")}
        return recipe
    return build


def _sign(cfg: Any, ctx: RecipeContext) -> Recipe:
    # SPEC 5, the paper's protocol: the training set already holds the samples and their SIGN versions
    # (TRAINING_SETS["sign"] built it before the run); the training itself is plain.
    return Recipe("sign")


#: Recipes that train on a training set of their own, built before the model: ``(cfg, RunData, device) ->
#: (dataset yielding (image, label, index), values for metrics.json)``.
TRAINING_SETS: dict[str, Callable[[Any, Any, torch.device], tuple[torch.utils.data.Dataset, dict[str, Any]]]] = {
    "sign": sign_training_set,
}


def training_set(cfg: Any, data: Any, device: torch.device) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    """The dataset a run trains on: the recipe's own (:data:`TRAINING_SETS`) or the training samples."""
    build = TRAINING_SETS.get(cfg.recipe)
    if build is None:
        from regpipe.data import ArrayDataset
        return ArrayDataset(data.train), {}
    return build(cfg, data, device)


RECIPES: dict[str, Callable[[Any, RecipeContext], Recipe]] = {
    "baseline": _baseline,
    "sum": _sum,
    "cascade": _cascade,
    "gradual": _gradual,
    "patchup-soft": _patchup("soft"),
    "patchup-hard": _patchup("hard"),
    "loss-delta": _loss_delta("same"),
    "loss-delta-external": _loss_delta("external"),
    "loss-order": _loss_order,
    "replicate": _replicated("replicate"),
    "invariance": _replicated("invariance"),
    "saliency": _replicated("saliency"),
    "class+inv+sal": _replicated("class+inv+sal"),
    "sign": _sign,
}


def build_recipe(cfg: Any, ctx: RecipeContext) -> Recipe:
    """The :class:`Recipe` named ``cfg.recipe``; ``ValueError`` listing the known names otherwise."""
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; choose from {sorted(RECIPES)}")
    return RECIPES[cfg.recipe](cfg, ctx)
