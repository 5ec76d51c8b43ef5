"""regpipe's recipes inside PyTorch Lightning: the ops, loss terms and schedules of any supported recipe in an
existing ``LightningModule`` and ``DataModule``.

Two pieces, each where Lightning puts that kind of work:

* :class:`RegpipeCallback`, a ``lightning.Callback`` built from a recipe and its algorithms' config
  dataclasses. It maps the algorithms' events (:mod:`regpipe.engine.algorithms.base`) onto Lightning's hooks:

  ============================  ======================================================================
  regpipe event                 Lightning hook
  ============================  ======================================================================
  ``attach(run)``               the first training batch (the model, the optimizer, the budget from
                                ``trainer.estimated_stepping_batches`` and the batch's size and shape)
  ``ops()``                     ``on_after_batch_transfer``: on the device, after Lightning's transfer
  ``task_scale``/``loss_terms``  :meth:`RegpipeCallback.training_loss`, called by ``training_step``
  ``after_step()``              ``on_train_batch_end``, once per optimizer step (``trainer.global_step``:
                                with gradient accumulation, not once per batch)
  ``after_eval(metric, ...)``   ``on_validation_end``, with the logged ``monitor`` metric averaged over the
                                processes; ``True`` (the cascade ended) sets ``trainer.should_stop``
  ``describe()``                logged every step as ``regpipe/<key>`` (``regpipe/t``, ``regpipe/k``)
  ``state_dict()``              the callback's ``state_dict``/``load_state_dict``: in every checkpoint, so
                                ``Trainer.fit(ckpt_path=...)`` continues the schedule where it stopped
  ``close()``                   ``teardown`` and ``on_exception`` (the model's hooks come off)
  ============================  ======================================================================

* :class:`RegpipeModule`, a ``LightningModule`` base (use it as a mixin) that holds the callback as
  ``self.regpipe``, registers it (``configure_callbacks``) and runs the device stage in the module's
  ``on_before_batch_transfer``/``on_after_batch_transfer``.

Why the batch hooks live on the module: a ``Callback`` sees the batch but cannot replace it, and the
``DataModule``'s hooks would tie the data to one model, while the ops belong to the model they train: a
PatchUp plan is read by hooks on this model, the invariance loss groups this batch's copies by seed. The
transfer hooks are where Lightning runs device-side augmentation: ``on_before_batch_transfer`` checks the
labels and pixels on the host (no device synchronisation, as regpipe's own loaders), and
``on_after_batch_transfer`` builds the :class:`~regpipe.core.batch.Batch` on the device and runs the ops
(uint8 batches through the fused normalise + mix). Validation, test and predict batches keep their
structure; only their images are converted as the training images are (uint8 to 0..1, ``mean``/``std``).

What Lightning keeps, and so what this refuses when the callback is built (naming the algorithm): the
optimizer step (loss-delta takes it over), the order of batches (loss-order) and the training set (SIGN):
they belong to ``Trainer.fit`` and your ``DataModule``. Replication (``replicate``, ``invariance``,
``saliency``) runs: your DataLoader's batch holds the seeds, and each step trains on ``m`` copies of each.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from regpipe.core.batch import Batch
from regpipe.core.checks import NonFiniteLoss
from regpipe.core.optional import require
from regpipe.engine import distributed
from regpipe.engine.algorithms import Algorithm, Resource, RunContext, build_algorithms, staged_ops
from regpipe.engine.algorithms.consistency import Replication
from regpipe.engine.bn import clean_bn_statistics
from regpipe.engine.config import TrainConfig
from regpipe.engine.loop import describe, step_loss
from regpipe.functional.losses import multi_hot_bce, soft_target_cross_entropy
from regpipe.loaders.common import BatchBuilder
from regpipe.loaders.torch import TorchLoader

L = require("lightning.pytorch", needed_by="regpipe.integrations.lightning")
is_overridden = require("lightning.pytorch.utilities.model_helpers",
                        needed_by="regpipe.integrations.lightning").is_overridden

__all__ = ["LIGHTNING_KEEPS", "RegpipeCallback", "RegpipeModule", "algorithm_config_names"]

#: The parts of the loop that ``Trainer.fit`` and the DataModule keep; an algorithm owning one is refused.
LIGHTNING_KEEPS = MappingProxyType({
    Resource.STEP: "Trainer.fit takes every optimizer step",
    Resource.BATCH_ORDER: "your DataLoader orders the batches",
    Resource.TRAINING_SET: "your DataModule defines the training set",
})


def algorithm_config_names() -> tuple[str, ...]:
    """The :class:`TrainConfig` fields that hold an algorithm's settings (``gradual``, ``invariance``, ...):
    the keyword arguments :class:`RegpipeCallback` takes."""
    defaults = TrainConfig()
    return tuple(f.name for f in fields(TrainConfig) if is_dataclass(getattr(defaults, f.name)))


def _refuse_unsupported(algorithms: Sequence[Algorithm], recipe: str) -> None:
    """Refuse an algorithm that takes over a part of the loop Lightning keeps (:data:`LIGHTNING_KEEPS`), or a
    batch sampler other than replication's (whose batches the DataLoader's batches of seeds stand for)."""
    for alg in algorithms:
        kept = [resource for resource in LIGHTNING_KEEPS if resource in alg.owns]
        if kept:
            raise ValueError(f"recipe {recipe!r}: {alg.name!r} takes over {kept[0].value}, but under Lightning "
                             f"{LIGHTNING_KEEPS[kept[0]]}; use `regpipe train` for it")
        if Resource.SAMPLER in alg.owns and not isinstance(alg, Replication):
            raise ValueError(f"recipe {recipe!r}: {alg.name!r} takes over {Resource.SAMPLER.value}, but under "
                             "Lightning your DataLoader draws the batches; use `regpipe train` for it")


class _HostBatch(NamedTuple):
    """A training batch checked on the host, as Lightning moves it: images (uint8 or float, not yet
    normalised), ``(N, K)`` one-hot targets and ``(N,)`` int64 source ids."""

    images: torch.Tensor
    targets: torch.Tensor
    source_ids: torch.Tensor


def _no_holdout() -> Batch:
    raise ValueError("under Lightning regpipe carves no held-out batch: an algorithm that scores against one "
                     "(loss-delta-external) runs with `regpipe train`")


class RegpipeCallback(L.Callback):
    """A regpipe recipe as a Lightning callback (see the module docstring for the hook each event maps to).

    Args:
        recipe: ``+``-joined words (``"gradual+invariance"``); see ``regpipe.engine.algorithms.RECIPE_WORDS``.
        num_classes: classes ``K`` of the integer labels your DataLoader yields.
        seed: seed of every op's generator (processes > 0 of a DDP run draw from ``rank_seed(seed, rank)``).
        mean, std: per-channel normalisation in the 0..1 pixel scale applied on the device (training and
            evaluation batches alike), or ``None`` when your pipeline normalises already.
        loss: ``"ce"`` (soft-target cross-entropy) or ``"bce"`` (the Sum Augmentation thesis's multi-hot BCE).
        monitor: the validation metric an algorithm that decides from validation (the cascade) reads: log it
            in ``validation_step`` (``self.log("val_acc", ...)``).
        bn_batches: while a recipe mixes its inputs, validation runs with BatchNorm statistics re-estimated
            on the last ``bn_batches`` clean training batches (kept on the device as loaded, e.g. uint8, only
            while mixing), as ``regpipe train`` does; 0 turns it off.
        channels_last: make the images ``torch.channels_last`` on the device.
        **configs: the algorithms' settings by :class:`TrainConfig` field name (:func:`algorithm_config_names`):
            ``gradual=GradualConfig(k0=2)``, ``invariance=InvarianceConfig(layers=("net.layer1",))``. Layer names
            are resolved on the LightningModule (``net.layer1`` for ``self.net.layer1``).

    Raises:
        TypeError: a keyword that is not an algorithm config (named, with the valid ones).
        ValueError: an unknown recipe word, a bad setting, algorithms that cannot run together, or one that
            Lightning's loop cannot host (named) — all before any work.
    """

    def __init__(self, recipe: str, *, num_classes: int, seed: int = 0, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, loss: str = "ce", monitor: str = "val_acc",
                 bn_batches: int = 16, channels_last: bool = False, **configs: Any) -> None:
        names = algorithm_config_names()
        unknown = sorted(set(configs) - set(names))
        if unknown:
            raise TypeError(f"RegpipeCallback got unknown keyword(s) {unknown}; algorithm configs: {list(names)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if isinstance(bn_batches, bool) or not isinstance(bn_batches, int) or bn_batches < 0:
            raise ValueError(f"bn_batches must be an integer >= 0, got {bn_batches!r}")
        self.config = TrainConfig(recipe=recipe, seed=seed, loss=loss, **configs)  # checks every value
        self.algorithms = build_algorithms(self.config)
        _refuse_unsupported(self.algorithms, recipe)
        self.num_classes, self.monitor, self.bn_batches = num_classes, monitor, bn_batches
        self.mean, self.std, self.channels_last = mean, std, channels_last
        self.loss_fn = soft_target_cross_entropy if loss == "ce" else multi_hot_bce
        # Host side: the loaders' checks (labels in range, tuple layout, 0..255 floats), no device, no mean/std.
        self._host = TorchLoader((), num_classes)
        BatchBuilder(num_classes, mean=mean, std=std)  # refuses a bad mean/std now, not at the first batch
        self._train: BatchBuilder | None = None  # on the module's device, with the ops (built by _attach)
        self._eval: BatchBuilder | None = None  # the evaluation batches' conversion, on the module's device
        self._pending: list[dict[str, Any]] | None = None  # algorithm states from a checkpoint, until attached
        self._position = 0  # source ids of a loader that yields none: the row's position in the epoch
        self._steps_seen = 0
        self._clean: deque[torch.Tensor] = deque(maxlen=max(bn_batches, 1))
        self._bn = contextlib.ExitStack()

    @property
    def attached(self) -> bool:
        """Whether the algorithms are attached to a model (from the first training batch of a fit on)."""
        return self._train is not None

    @property
    def ops(self) -> list[Any]:
        """The recipe's ops in the order they run on each training batch (empty until attached)."""
        return list(self._train.ops) if self._train is not None else []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(recipe=self.config.recipe)

    # ---- the batch, from the module's transfer hooks -------------------------------------------------------
    def before_transfer(self, module: L.LightningModule, batch: Any) -> Any:
        """``on_before_batch_transfer``: a training batch ``(images, labels[, indices])`` is checked on the host
        and handed to Lightning as images, one-hot targets and source ids; other batches pass unchanged."""
        if not module.trainer.training:
            return batch
        built = self._host.to_batch(batch, self._position, raw=True)  # raw: uint8 stays uint8 for the fused mix
        self._position += built.size
        return _HostBatch(built.inputs, built.targets, built.source_ids)

    def after_transfer(self, module: L.LightningModule, batch: Any) -> Any:
        """``on_after_batch_transfer``: a training batch becomes a :class:`Batch` with the recipe's ops applied
        on the device; an evaluation batch keeps its structure, its images converted as the training ones."""
        trainer = module.trainer
        if not trainer.training:
            return self._evaluation_batch(module, batch)
        if not isinstance(batch, _HostBatch):
            raise TypeError("regpipe's training batch did not come through RegpipeCallback.before_transfer: call it "
                            "from the module's on_before_batch_transfer (RegpipeModule does)")
        if self._train is None:
            self._attach(trainer, module, tuple(batch.images.shape))
        if self.bn_batches and any(alg.mixing() for alg in self.algorithms):
            self._clean.append(batch.images.detach())  # clean rows for the BatchNorm re-estimation
        builder = self._train
        clean = Batch(inputs=builder.images(batch.images, raw=True), targets=batch.targets,
                      source_ids=batch.source_ids)
        return builder.apply(clean)

    def _evaluation_batch(self, module: L.LightningModule, batch: Any) -> Any:
        if self._eval is None or self._eval.device != module.device:
            self._eval = BatchBuilder(self.num_classes, device=module.device, mean=self.mean, std=self.std,
                                      channels_last=self.channels_last)
        convert = self._eval
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim() == 4:
            return type(batch)([convert.images(batch[0]), *batch[1:]])
        return batch  # not an (images, ...) batch: the module's own business

    # ---- the loss, from training_step ---------------------------------------------------------------------
    def training_loss(self, module: L.LightningModule, batch: Batch) -> torch.Tensor:
        """The step's loss on a training batch: the recipe's objective (:func:`regpipe.engine.loop.step_loss`:
        the forward owner's, or ``prod task_scale * loss_fn(module(x), targets) + sum loss_terms``), each term
        logged as ``regpipe/<name>`` (epoch means; ``regpipe/task`` is the task loss before the scale).

        Raises:
            TypeError: ``batch`` is not the :class:`Batch` :meth:`after_transfer` made.
            NonFiniteLoss: the loss is not finite (named with the epoch and step), before it reaches the weights.
        """
        if not isinstance(batch, Batch):
            raise TypeError(f"training_loss expects the regpipe Batch that on_after_batch_transfer made, got "
                            f"{type(batch).__name__}: call RegpipeCallback.after_transfer there (RegpipeModule does)")
        loss, log = step_loss(self.algorithms, module, batch, self.loss_fn)
        if not torch.isfinite(loss):
            trainer = module.trainer
            raise NonFiniteLoss(f"training loss became {loss.item()} at epoch {trainer.current_epoch + 1} optimizer "
                                f"step {trainer.global_step + 1} (recipe {self.config.recipe!r}); lower the learning "
                                "rate or check the data")
        for name, value in log.items():
            module.log(f"regpipe/{name}", value, on_step=False, on_epoch=True, batch_size=batch.size)
        return loss

    # ---- the events ---------------------------------------------------------------------------------------
    def _attach(self, trainer: L.Trainer, module: L.LightningModule, shape: tuple[int, ...]) -> None:
        """Attach the algorithms once the first training batch shows its size and image shape; then restore a
        checkpoint's algorithm states (after the reseed of a DDP process, which would discard them)."""
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(f"regpipe under Lightning needs exactly one optimizer (the cascade restores its state); "
                             f"configure_optimizers gave {len(optimizers)}")
        batches = trainer.num_training_batches
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        total = trainer.estimated_stepping_batches
        if steps_per_epoch < 1 or not math.isfinite(total):
            raise ValueError("regpipe's schedules need a finite budget: a training DataLoader with a length and "
                             f"max_epochs or max_steps (got {batches} batches per epoch, {total} optimizer steps)")
        if any(a.needs_validation for a in self.algorithms):
            self._check_validation(trainer, module)
        replicas = next((a.config.replicas for a in self.algorithms if isinstance(a, Replication)), 1)
        seeds = shape[0]
        context = RunContext(
            seed=self.config.seed, epochs=max(1, math.ceil(total / steps_per_epoch)), batch_size=seeds * replicas,
            steps_per_epoch=steps_per_epoch, model=module, optimizer=optimizers[0], loss_fn=self.loss_fn,
            # the rows this process reads per epoch (only samplers that score samples read them: refused here)
            num_train=int(batches) * seeds, train=None,
            prepare=TorchLoader((), self.num_classes, device=module.device, mean=self.mean, std=self.std).to_batch,
            validation=_no_holdout, keep_mix_parent=any(a.needs_mix_parent for a in self.algorithms),
            keep_mix_groups=any(a.needs_groups for a in self.algorithms), eval_every=trainer.check_val_every_n_epoch or 1, image_shape=tuple(shape[1:]))
        for alg in self.algorithms:
            alg.attach(context)
        ops = staged_ops(self.algorithms)
        if trainer.world_size > 1:
            distributed.reseed_ops(ops, self.config.seed, trainer.global_rank)  # each process draws its own
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        self._train = BatchBuilder(self.num_classes, device=module.device, ops=ops, mean=self.mean, std=self.std,
                                   channels_last=self.channels_last)
        self._steps_seen = trainer.global_step

    def _check_validation(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        deciders = [a.name for a in self.algorithms if a.needs_validation]
        if trainer.limit_val_batches == 0 or not is_overridden("validation_step", module):
            raise ValueError(f"{deciders} decide from the validation metric {self.monitor!r}: define validation_step, "
                             "log it there and give the Trainer validation batches")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._position = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """``after_step`` once per optimizer step taken since the last batch, then the algorithms' state logged."""
        if self._train is None:
            return
        for _ in range(trainer.global_step - self._steps_seen):
            for alg in self.algorithms:
                alg.after_step()
        self._steps_seen = trainer.global_step
        size = batch.size if isinstance(batch, Batch) else None
        for key, value in describe(self.algorithms, self.config.recipe).items():
            pl_module.log(f"regpipe/{key}", float(value), on_step=True, on_epoch=False, batch_size=size)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """While the recipe mixes, validate with BatchNorm statistics of clean batches (restored at the end)."""
        if trainer.sanity_checking or self._train is None or not self._clean:
            return
        if any(alg.mixing() for alg in self.algorithms):
            convert = self._train.images
            self._bn.enter_context(clean_bn_statistics(pl_module, (convert(x) for x in list(self._clean))))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the trained BatchNorm statistics, then ``after_eval`` with the validation metric; a ``True``
        (the cascade's last stage ended) stops the fit."""
        self._bn.close()  # first: a cascade switch restores its best checkpoint, BatchNorm buffers included
        if trainer.sanity_checking or self._train is None or not any(a.needs_validation for a in self.algorithms):
            return
        metric = self._validation_metric(trainer, pl_module)
        if any([alg.after_eval(metric, pl_module, trainer.optimizers[0]) for alg in self.algorithms]):
            trainer.should_stop = True

    def _validation_metric(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The ``monitor`` metric, averaged over the processes so every process takes the same decision."""
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(f"recipe {self.config.recipe!r} decides from the validation metric {self.monitor!r}, "
                           f"which was not logged (logged: {sorted(trainer.callback_metrics)}); log it in "
                           "validation_step or pass RegpipeCallback(monitor=...)")
        value = torch.as_tensor(value, dtype=torch.float32, device=pl_module.device)
        return float(trainer.strategy.reduce(value, reduce_op="mean"))

    # ---- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The recipe and every algorithm's state (its ops' generators, the schedule's position, the cascade);
        ``algorithms`` is ``None`` before the first training batch attached them."""
        states = [alg.state_dict() for alg in self.algorithms] if self._train is not None else self._pending
        return {"recipe": self.config.recipe, "algorithms": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output: now when attached, else at the first training batch.

        Raises:
            ValueError: the checkpoint is another recipe's, or holds another number of algorithm states.
        """
        if state_dict.get("recipe") != self.config.recipe:
            raise ValueError(f"the checkpoint holds the state of recipe {state_dict.get('recipe')!r}, this callback "
                             f"runs {self.config.recipe!r}")
        states = state_dict.get("algorithms")
        if states is not None and len(states) != len(self.algorithms):
            raise ValueError(f"the checkpoint holds {len(states)} algorithm states, recipe {self.config.recipe!r} "
                             f"has {len(self.algorithms)} algorithms")
        if states is not None and self._train is not None:
            self._load(states)
        else:
            self._pending = states

    def _load(self, states: list[dict[str, Any]]) -> None:
        for alg, state in zip(self.algorithms, states):
            alg.load_state_dict(state)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume from a checkpoint without this recipe's state: its schedule would restart silently."""
        if self.state_key not in checkpoint.get("callbacks", {}):
            raise ValueError(f"the checkpoint holds no state of regpipe recipe {self.config.recipe!r} (saved "
                             "without this RegpipeCallback): resuming would restart its schedule")

    # ---- cleanup ------------------------------------------------------------------------------------------
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """After a fit: keep the algorithms' state (a checkpoint saved now, or a later fit, continues it), then
        take their hooks off the model."""
        if stage == "fit":
            if self._train is not None:
                self._pending = [alg.state_dict() for alg in self.algorithms]
            self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        self._bn.close()
        for alg in self.algorithms:
            alg.close()
        self._train = None
        self._clean.clear()


class RegpipeModule(L.LightningModule):
    """A ``LightningModule`` base that runs ``self.regpipe`` (a :class:`RegpipeCallback`): it registers the
    callback and runs its device stage in the transfer hooks. Use it as the base (or first mixin) of your
    module, set ``self.regpipe`` in ``__init__`` and return ``self.regpipe_loss(batch)`` from ``training_step``.

    A module that overrides ``on_before_batch_transfer``/``on_after_batch_transfer`` itself calls
    ``super()`` there; the callback is added to those ``configure_callbacks`` of a base class returns.
    """

    regpipe: RegpipeCallback

    def configure_callbacks(self) -> Sequence[L.Callback] | L.Callback:
        others = super().configure_callbacks()
        others = [others] if isinstance(others, L.Callback) else list(others)
        return [*others, self.regpipe]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.regpipe.before_transfer(self, super().on_before_batch_transfer(batch, dataloader_idx))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.regpipe.after_transfer(self, super().on_after_batch_transfer(batch, dataloader_idx))

    def regpipe_loss(self, batch: Batch) -> torch.Tensor:
        """The recipe's training loss on ``batch`` (:meth:`RegpipeCallback.training_loss`)."""
        return self.regpipe.training_loss(self, batch)

