"""Replication and the two consistency losses as training algorithms: ``replicate``, ``invariance``,
``saliency`` (the math is in :mod:`regpipe.functional.invariance` and :mod:`regpipe.functional.saliency`).

``invariance`` and ``saliency`` train on replicated batches, so each recipe word brings
:class:`Replication` with it (once, however many words ask for it): ``invariance+saliency`` is the
paper's ``alpha * class + beta * inv + gamma * sal`` objective with no code of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from regpipe.core.op import Op
from regpipe.engine.algorithms.base import Algorithm, Copies, Resource, RunContext, Stage, StepInputs
from regpipe.engine.config import InvarianceConfig, ReplicationConfig, SaliencyConfig
from regpipe.functional.saliency import saliency_from_logits
from regpipe.hooks.invariance import InvarianceLoss
from regpipe.hooks.saliency import SaliencyLoss
from regpipe.ops.augment import Augment, RandomAffine, RandomBrightnessContrast, RandomFlip, Replicate
from regpipe.sampler.epoch_order import ShuffledBatches

__all__ = ["Invariance", "Replication", "Saliency", "replication_augment"]


def replication_augment(seed: int) -> Augment:
    """The augmentation of the replication recipes: flips, a mild affine, brightness/contrast."""
    return Augment([RandomFlip(horizontal=0.5), RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                    RandomBrightnessContrast((0.8, 1.2), (0.8, 1.2))], seed=seed)


class Replication(Algorithm):
    """``replicate``: each batch holds ``batch_size / m`` seeds and ``m`` views of each, so a step sees
    ``batch_size`` rows and an epoch as many rows as the baseline's (equal compute; each epoch draws a fresh
    random ``1/m`` of the training set).

    Where the views are made depends on the loader. On the device (in-memory data, ``--loader torch``):
    :class:`~regpipe.ops.augment.Replicate` warps the loader's one crop of each seed ``m - 1`` times with
    :func:`replication_augment`, the crop itself the first view. At decode (``--loader dali|ffcv`` reading
    files, :meth:`copies`): each image is decoded once and each of its ``m`` views is its own ImageNet crop
    (random-resized crop and flip) with :func:`replication_augment` on top, counter-based in
    ``(seed, epoch, index)`` (repeated augmentation, Hoffer et al. 2020, with the replication chain).
    """

    name = "replicate"
    owns = frozenset({Resource.SAMPLER})

    def __init__(self, config: ReplicationConfig) -> None:
        self.config = config

    def attach(self, run: RunContext) -> None:
        m = self.config.replicas
        if run.batch_size % m:
            raise ValueError(f"batch_size={run.batch_size} is not divisible by replicas={m}")
        self.op = Replicate(m, replication_augment(run.seed), include_original=True)
        # as many steps as the baseline, each of batch_size / m seeds: a fresh random 1/m of the set per epoch
        self.order = ShuffledBatches(run.num_train, run.batch_size // m, run.steps_per_epoch, seed=run.seed)

    def ops(self) -> list[tuple[Stage, Op]]:
        return [(Stage.REPLICATE, self.op)]

    def copies(self) -> Copies:
        return Copies(self.config.replicas, self.op.augment)

    def batch_order(self) -> ShuffledBatches:
        return self.order

    def describe(self) -> dict[str, Any]:
        return {"m": self.config.replicas}


class Invariance(Algorithm):
    """``invariance`` (Hernández-García, König & Kietzmann, 2019): ``(1 - alpha) * task + sum_l alpha_l * L_inv^l`` on the tapped ``layers``,
    ``alpha_l`` growing exponentially with depth (``alpha_last / alpha_first = ratio``, ``sum_l alpha_l =
    alpha``). The activations come from the loop's own forward pass."""

    name = "invariance"
    uses = frozenset({Resource.FORWARD, Resource.STEP})
    needs_groups = True

    def __init__(self, config: InvarianceConfig) -> None:
        self.config = config
        self.hook: InvarianceLoss | None = None

    def attach(self, run: RunContext) -> None:
        self.hook = InvarianceLoss(run.model, self.config.layers, alpha=self.config.alpha, ratio=self.config.ratio)

    def task_scale(self) -> float:
        return 1.0 - self.config.alpha

    def loss_terms(self, step: StepInputs) -> dict[str, torch.Tensor]:
        assert self.hook is not None  # attach() ran: the loop attaches before the first step
        # groups of Batch.replicas rows: the copies of a seed (after a mix that kept them: the copies of a mixture)
        return {"invariance": self.hook.invariance(step.batch.replicas)}

    def close(self) -> None:
        if self.hook is not None:
            self.hook.close()
            self.hook = None


class Saliency(Algorithm):
    """``saliency``: ``+ weight * L_sal``, the saliency-map consistency term. Replicated rows: each copy's
    map, warped back by its recorded affine, should match its seed's original map. Mixed rows (with a
    mixing algorithm, e.g. ``sum+saliency``): the expected map is the same mix of the components' maps,
    computed on the rows before mixing (the mixing op keeps them in ``batch.mixing``)."""

    name = "saliency"
    uses = frozenset({Resource.FORWARD, Resource.STEP})
    needs_input_grad = True
    needs_mix_parent = True

    def __init__(self, config: SaliencyConfig) -> None:
        self.config = config
        self.loss = SaliencyLoss()

    def loss_terms(self, step: StepInputs) -> dict[str, torch.Tensor]:
        maps = saliency_from_logits(step.logits, step.inputs, step.batch.targets, create_graph=True)
        # A mixed batch carries its unmixed rows (the mixing op keeps them: needs_mix_parent).
        value = self.loss.from_maps(maps, step.batch, step.model)
        return {"saliency": self.config.weight * value}
