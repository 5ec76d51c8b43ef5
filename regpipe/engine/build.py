"""Building a run: its data, model, optimizer, schedule, algorithms, loaders and state, in the order the
algorithms' events need (training set before the model, ops once the model and budget exist).

:func:`build_run` returns the :class:`~regpipe.engine.loop.Run` (what the run reads) and its
:class:`~regpipe.engine.state.TrainState` (what it changes); given a saved state, the state is restored
before the loaders are built, so they start at the saved epoch and position.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from regpipe.core.batch import Batch
from regpipe.engine import distributed
from regpipe.engine.algorithms import Algorithm, DataContext, Resource, RunContext, reads_holdout, staged_ops
from regpipe.engine.config import TrainConfig
from regpipe.engine.data import ArrayDataset, ImageArrays
from regpipe.engine.loading import (clean_loader, decode_copier, default_workers, eval_loader, train_loader,
                                    worker_start_method)
from regpipe.engine.loop import ResumeMode, Run, owner
from regpipe.engine.models import build_model
from regpipe.engine.precision import Precision
from regpipe.engine.schedule import Plateau
from regpipe.engine.validate import read_json, write_json
from regpipe.engine.splits import Splits, array_splits, folder_splits, parse_data_spec, prepare_data
from regpipe.engine.state import TrainState
from regpipe.functional.losses import multi_hot_bce, soft_target_cross_entropy
from regpipe.loaders.torch import TorchLoader
from regpipe.sampler.epoch_order import EpochOrder, EpochPasses, ShuffledBatches

__all__ = ["build_run", "resume_mode"]

#: Trains a teacher checkpoint (the engine's ``train``), passed in so this module does not import the loop
#: that calls it.
TrainFn = Callable[[TrainConfig], dict[str, Any]]


def _splits(cfg: TrainConfig, algorithms: list[Algorithm], workers: int) -> Splits:
    """The run's splits: in-memory arrays, or files streamed by reference (``imagefolder:``, ``beton:``)."""
    spec = parse_data_spec(cfg.dataset)
    if spec is None:
        return array_splits(prepare_data(cfg.dataset, cfg.seed, cfg.val_per_class, cfg.samples_per_class,
                                         data_dir=cfg.data_dir, shape=cfg.shape))
    holdout = cfg.schedule == "plateau" or reads_holdout(algorithms)
    val_per_class = cfg.val_per_class if holdout else None
    if spec.kind == "beton":  # which carves no validation set: check_config refused recipes that need one
        from regpipe.engine.ffcv_files import beton_splits

        return beton_splits(spec, cfg.image_size, cfg.val_resize, seed=cfg.seed, workers=workers)
    return folder_splits(spec, cfg.image_size, cfg.val_resize, cfg.seed, val_per_class, workers=workers)


def _teacher(cfg: TrainConfig, algorithms: list[Algorithm], scratch: Path, info: distributed.DistInfo,
             train: TrainFn, resuming: bool) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint an algorithm that ``needs_teacher`` transforms with: its config's ``teacher``, or the
    baseline trained here first with the same settings and seed (kept as ``OUT/teacher.pt``, which a resumed
    run reads again instead of training it twice)."""
    wanting = [a for a in algorithms if a.needs_teacher]
    if not wanting:
        return None, {}
    named = getattr(wanting[0].config, "teacher", None)
    if named:
        return Path(named), {"teacher": str(named)}
    if info.distributed:
        # The teacher run would set up and tear down the process group inside this one.
        raise ValueError(f"under torchrun the {wanting[0].name!r} algorithm needs a trained teacher: train the "
                         "baseline with `regpipe train --checkpoint-out PATH` and pass its path")
    path = Path(cfg.out) / "teacher.pt" if cfg.out is not None else scratch / "teacher.pt"
    facts = path.with_suffix(".json")  # what the teacher run reported, for metrics.json of a resumed run too
    if resuming and path.is_file() and facts.is_file():
        return path, read_json(facts, "the teacher's summary")
    metrics = train(replace(cfg, recipe="baseline", out=None, checkpoint_out=str(path), resume=False,
                            checkpoint_every=None))
    summary = {"teacher": "baseline", "teacher_test_accuracy": metrics["test_accuracy"],
               "teacher_train_seconds": metrics["train_seconds"]}
    write_json(facts, summary)
    return path, summary


def _holdout_batch(splits: Splits, prepare: Callable[..., Batch], rows: int) -> Batch:
    """The held-out validation rows as one normalised :class:`Batch` (at most ``rows`` of a streamed set)."""
    if splits.arrays is not None:
        arrays: ImageArrays = splits.arrays.val
        return prepare((arrays.images, arrays.labels, torch.arange(len(arrays.labels))))
    if splits.holdout is None:
        raise ValueError("this recipe reads a validation set, but none was carved")
    take = list(range(min(rows, len(splits.holdout))))
    images, labels, ids = torch.utils.data.default_collate([splits.holdout[i] for i in take])
    return prepare((images, labels, ids))


def resume_mode(order: EpochOrder | Any, algorithms: list[Algorithm]) -> ResumeMode:
    """How a state saved inside an epoch continues (:data:`~regpipe.engine.loop.ResumeMode`): the data order
    must be a function of the epoch; an owner of the step must replay the epoch itself, and only when no op
    draws per batch (a replay would draw again)."""
    if not isinstance(order, EpochOrder):
        return "epoch"
    step_owner = owner(algorithms, Resource.STEP)
    if step_owner is None:
        return "skip"
    if step_owner.replays_epoch and not any(alg.ops() for alg in algorithms):
        return "replay"
    return "epoch"


def _schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int,
              ) -> tuple[torch.optim.lr_scheduler.LRScheduler, Plateau | None]:
    """cosine: ``lr = base * (1 + cos(pi * step / total)) / 2`` at every step; plateau: ``lr = base * scale``,
    the scale lowered by ``--plateau-factor`` when the validation accuracy stagnates (:class:`Plateau`)."""
    if cfg.schedule == "plateau":
        plateau = Plateau(cfg.plateau_factor, cfg.plateau_patience)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: plateau.scale), plateau
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))), None


def build_run(cfg: TrainConfig, algorithms: list[Algorithm], device: torch.device, info: distributed.DistInfo,
              scratch: Path, train: TrainFn, saved: dict[str, Any] | None = None) -> tuple[Run, TrainState]:
    """Build the run of ``cfg`` and its state (restored from ``saved``, a :func:`~regpipe.engine.resume.load_state`
    dict, when given).

    Args:
        algorithms: ``build_algorithms(cfg)``.
        scratch: a temporary folder removed when the run ends (an in-memory FFCV ``.beton``, a teacher).
        train: trains the teacher of an algorithm that needs one.

    Raises:
        ValueError: a setting the data or an algorithm refuses; a saved state that does not fit the run.
    """
    torch.manual_seed(cfg.seed)
    streaming = parse_data_spec(cfg.dataset) is not None
    workers = cfg.workers if cfg.workers is not None else default_workers(streaming, info)
    splits = _splits(cfg, algorithms, workers)

    # Event 1, before the model: the training set (SIGN adds its transformed versions).
    num_samples = len(splits.train)
    teacher, teacher_info = _teacher(cfg, algorithms, scratch, info, train, resuming=saved is not None)
    ctx = DataContext(data=splits.arrays if splits.arrays is not None else splits, device=device,
                      model_name=cfg.model, dataset_name=cfg.dataset, teacher=teacher)
    expansion: dict[str, Any] = {}
    for alg in algorithms:
        splits.train, values = alg.training_set(splits.train, ctx)
        expansion.update(values)
    for values in expansion.values():
        if isinstance(values, dict):
            values.update(teacher_info)

    bare = build_model(cfg.model, num_classes=splits.num_classes, in_channels=splits.image_shape[0]).to(device)
    if cfg.channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    model = bare
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(bare, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    steps_per_epoch = len(splits.train) // cfg.batch_size  # drop_last
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(splits.train)} training samples")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    scheduler, plateau = _schedule(cfg, optimizer, cfg.epochs * steps_per_epoch)
    loss_fn = soft_target_cross_entropy if cfg.loss == "ce" else multi_hot_bce
    precision = Precision(cfg.amp, device)

    # Event 2, once the model exists: ops, hooks, samplers.
    plain = TorchLoader((), splits.num_classes, device=device, mean=splits.mean, std=splits.std)
    external_rows = cfg.loss_delta.external_rows
    context = RunContext(seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
                         model=model, optimizer=optimizer, loss_fn=loss_fn, num_train=len(splits.train),
                         train=splits.arrays.train if splits.arrays is not None else splits.train,
                         prepare=plain.to_batch,
                         validation=lambda: _holdout_batch(splits, plain.to_batch, external_rows),
                         keep_mix_parent=any(a.needs_mix_parent for a in algorithms),
                         keep_mix_groups=any(a.needs_groups for a in algorithms), eval_every=cfg.eval_every,
                         grad_scaler=precision.scaler, image_shape=splits.image_shape)
    for alg in algorithms:
        alg.attach(context)
    # DALI and FFCV reading files make the copies at decode: that algorithm's replication op is left out, and
    # the other ops run in stage order (rows are augmented, copied, mixed, then planned, whatever the order of the
    # words: staged_ops).
    copier = decode_copier(cfg.loader, splits, algorithms)
    ops = staged_ops(algorithms, decode_copier=copier)
    if info.rank > 0:
        distributed.reseed_ops(ops, cfg.seed, info.rank)  # ranks draw their own op parameters (before a restore)

    # The global batches of each epoch, the same on every rank (same seed); each rank loads its slice.
    sampler_owner = owner(algorithms, Resource.SAMPLER)
    order = sampler_owner.batch_order() if sampler_owner is not None else None
    if order is None:
        order = ShuffledBatches(len(splits.train), cfg.batch_size, steps_per_epoch, seed=cfg.seed)
    mode = resume_mode(order, algorithms)
    if cfg.checkpoint_every and mode == "epoch" and info.is_main:
        warnings.warn(f"--checkpoint-every {cfg.checkpoint_every}: recipe {cfg.recipe!r} resumes only at epoch "
                      "starts (its batch order or its steps depend on the model as the epoch runs), so the state "
                      "is written at every epoch end, not inside an epoch", UserWarning, stacklevel=2)

    state = TrainState(model=bare, optimizer=optimizer, scheduler=scheduler, precision=precision,
                       algorithms=algorithms, bn_order=torch.Generator().manual_seed(cfg.seed + 1), plateau=plateau)
    if saved is not None:
        state.load_state_dict(saved)
        if state.step and mode == "epoch":
            raise ValueError(f"the saved state is inside epoch {state.epoch + 1}, where recipe {cfg.recipe!r} "
                             "cannot resume (it resumes at epoch starts)")
    # A resumed epoch skips the batches already trained on, without loading them (a replaying step owner
    # reads the epoch from its start and skips them itself).
    passes = EpochPasses(distributed.rank_order(order, info), start_epoch=state.epoch,
                         skip=state.step if mode == "skip" else 0)
    batches = train_loader(cfg.loader, splits, passes, seed=cfg.seed, device=device, ops=ops,
                           channels_last=cfg.channels_last, workers=workers, start_epoch=state.epoch,
                           work_dir=scratch, cache_dir=cfg.cache_dir, info=info, val_resize=cfg.val_resize,
                           copies=copier.copies() if copier is not None else None)

    eval_size = cfg.eval_batch_size or max(1, cfg.batch_size // info.world_size)
    bn_size = max(1, cfg.batch_size // info.world_size)
    # Clean batches for re-estimating BatchNorm statistics while an algorithm mixes the inputs.
    start = worker_start_method(cfg.loader)
    bn_batches = clean_loader(splits, bn_size, state.bn_order, device, workers, count=bn_size * cfg.bn_batches,
                              resize=cfg.val_resize, start_method=start)
    test_batches = eval_loader(splits, splits.test, eval_size, device, workers, info, resize=cfg.val_resize,
                               start_method=start)
    # The per-epoch test accuracy may read a seeded subset (--eval-subset); the final one reads the whole set.
    epoch_test_batches = test_batches
    if cfg.eval_subset is not None and cfg.eval_subset < len(splits.test):
        rows = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(cfg.seed + 2))
        rows = rows[:cfg.eval_subset].sort().values
        subset: torch.utils.data.Dataset = ArrayDataset(splits.test.arrays.subset(rows)) \
            if isinstance(splits.test, ArrayDataset) else torch.utils.data.Subset(splits.test, rows.tolist())
        epoch_test_batches = eval_loader(splits, subset, eval_size, device, workers, info, resize=cfg.val_resize,
                                         start_method=start)
    val_batches = eval_loader(splits, splits.holdout, eval_size, device, workers, info, resize=cfg.val_resize,
                              start_method=start) \
        if splits.holdout is not None else None
    run = Run(cfg=cfg, device=device, info=info, splits=splits, model=model, algorithms=algorithms, loss_fn=loss_fn,
              batches=batches, steps_per_epoch=steps_per_epoch, resume_mode=mode, bn_batches=bn_batches,
              test_batches=test_batches, epoch_test_batches=epoch_test_batches, val_batches=val_batches,
              num_samples=num_samples, expansion=expansion)
    return run, state
