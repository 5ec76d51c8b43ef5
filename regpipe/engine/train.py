"""The training loop behind ``regpipe train`` and ``regpipe compare``.

One loop for every recipe: the recipe's algorithms (:mod:`regpipe.engine.algorithms`) act at its events
(training set, loader ops, sampler, forward/loss, step, after step, after evaluation, logging) and the
loop owns what no algorithm may forget: the order of the events, non-finite losses, and cleanup
(``finally``: hooks come off the model even when a run fails).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, RandomSampler
from tqdm.auto import tqdm

from regpipe.core.batch import Batch
from regpipe.engine import distributed
from regpipe.engine.algorithms import (
    Algorithm,
    DataContext,
    Resource,
    RunContext,
    StepInputs,
    StepReport,
    build_algorithms,
)
from regpipe.engine.checkpoint import save_checkpoint
from regpipe.engine.config import TrainConfig
from regpipe.engine.data import ArrayDataset, ImageArrays, load_dataset, split_train_val, stratified_indices
from regpipe.engine.distributed import resolve_device
from regpipe.engine.validate import check_run_outputs
from regpipe.engine.evaluation import evaluate, evaluation_model
from regpipe.engine.loading import clean_loader, default_workers, eval_loader, train_loader
from regpipe.engine.models import build_model, check_model_name
from regpipe.engine.precision import Precision
from regpipe.engine.resume import STATE_FILE, ResumableBatches, load_state, save_state
from regpipe.engine.schedule import Plateau
from regpipe.engine.splits import Splits, array_splits, folder_splits, parse_data_spec
from regpipe.functional.losses import multi_hot_bce, soft_target_cross_entropy
from regpipe.loaders.torch import TorchLoader
from regpipe.ops.tta import TestTimeSumAugmentation

__all__ = ["RunData", "TrainConfig", "prepare_data", "train", "write_json"]


@dataclass(frozen=True)
class RunData:
    """The run's splits (uint8 arrays) and the training set's per-channel mean/std (0..1 scale)."""

    train: ImageArrays
    val: ImageArrays
    test: ImageArrays
    mean: tuple[float, ...]
    std: tuple[float, ...]


def prepare_data(cfg: TrainConfig) -> RunData:
    """Load the dataset and split it: a stratified validation set is carved first (seeded), then the
    optional ``samples_per_class`` training subset is drawn from the rest, so every recipe with the same
    seed trains on the same samples whether it reads the validation set or not."""
    full = load_dataset(cfg.dataset, "train", data_dir=cfg.data_dir, shape=cfg.shape)
    test = load_dataset(cfg.dataset, "test", data_dir=cfg.data_dir, shape=cfg.shape)
    val_idx = stratified_indices(full.labels, cfg.val_per_class, seed=cfg.seed + 10_000)
    if cfg.samples_per_class is not None:
        # a stratified draw disjoint from the validation set (split_train_val's job, used the other way round)
        train_idx = split_train_val(full.labels, cfg.samples_per_class, seed=cfg.seed, exclude=val_idx)
    else:
        keep = torch.ones(len(full.labels), dtype=torch.bool)
        keep[val_idx] = False
        train_idx = keep.nonzero().squeeze(1)
    train = full.subset(train_idx)
    pixels = train.images.float().div_(255.0)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return RunData(train=train, val=full.subset(val_idx), test=test, mean=mean, std=std)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON atomically: a temporary file in the same folder, then ``os.replace``, so a
    kill during the write never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Run settings a resumed run may change (they do not change what it computes).
RESUMABLE_CHANGES = ("resume", "progress", "checkpoint_every", "workers", "out", "checkpoint_out", "cache_dir")
#: Recipe words that read the training set as in-memory arrays.
IN_MEMORY_ONLY = ("sign", "loss-order")


def _check_run(cfg: TrainConfig, algorithms: list[Algorithm]) -> None:
    """Refuse what cannot run before anything is read: output paths that are files, a streamed dataset
    with an algorithm that needs the arrays, a state to resume that is not there."""
    check_run_outputs(cfg.out, cfg.checkpoint_out)
    check_model_name(cfg.model)
    spec = parse_data_spec(cfg.dataset)
    if spec is not None:
        refused = [a.name for a in algorithms if a.name in IN_MEMORY_ONLY]
        if refused:
            raise ValueError(f"recipe {cfg.recipe!r}: {refused} read the whole training set in memory; they are "
                             f"not available with --data {spec.kind}:... (use an in-memory dataset)")
        if spec.kind == "beton" and cfg.schedule == "plateau":
            raise ValueError("--schedule plateau decides from a held-out validation set, which --data beton:... "
                             "does not carve; use --schedule cosine or --data imagefolder:ROOT")
        if spec.kind == "beton" and cfg.eval_subset is not None:
            raise ValueError("--eval-subset is not available with --data beton:... (FFCV reads the whole file); "
                             "use --eval-every to evaluate less often")
        if spec.kind == "beton" and cfg.loader != "ffcv":
            raise ValueError(f"--data beton:... is read by FFCV: add --loader ffcv (got --loader {cfg.loader})")
    if cfg.resume:
        state = Path(cfg.out) / STATE_FILE
        if not state.is_file():
            raise FileNotFoundError(f"--resume: nothing to resume, {state} does not exist (a run writes it every "
                                    "--checkpoint-every steps and at each epoch end, and removes it when it finishes)")
    if cfg.amp == "fp16" and any(Resource.STEP in a.owns for a in algorithms):
        raise ValueError(f"--amp fp16 needs the loop's own optimizer step (gradient scaling); {cfg.recipe!r} "
                         "takes the steps itself: use --amp bf16")


def train(cfg: TrainConfig, observe: Callable[[int, Batch], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.recipe`` on one seed; returns (and writes to ``cfg.out/metrics.json``) the metrics.

    Args:
        cfg: the run's settings.
        observe: called as ``observe(epoch, batch)`` with every training batch this process trains on
            (after the ops), e.g. to record which samples a rank read.

    Raises:
        ValueError: an unknown recipe word or device, or a setting an algorithm refuses (before any data
            is read); :class:`~regpipe.engine.algorithms.ComposeError` for algorithms that cannot run
            together; a non-finite training loss (naming the epoch and step).
        FileNotFoundError: missing data, or ``--resume`` without a saved state.
    """
    algorithms = build_algorithms(cfg)
    _check_run(cfg, algorithms)
    device = resolve_device(cfg.device)
    info = distributed.setup(device)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    try:
        with tempfile.TemporaryDirectory(prefix="regpipe-") as scratch:  # removed however the run ends
            return _run(cfg, algorithms, device, info, Path(scratch), observe)
    finally:
        for alg in algorithms:
            alg.close()
        distributed.teardown(info)


def _teacher(cfg: TrainConfig, algorithms: list[Algorithm], scratch: Path,
             info: distributed.DistInfo) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint an algorithm that ``needs_teacher`` transforms with: its config's ``teacher``, or the
    baseline trained here first with the same settings and seed (kept as ``OUT/teacher.pt``)."""
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
    metrics = train(replace(cfg, recipe="baseline", out=None, checkpoint_out=str(path), resume=False,
                            checkpoint_every=None))
    return path, {"teacher": "baseline", "teacher_test_accuracy": metrics["test_accuracy"],
                  "teacher_train_seconds": metrics["train_seconds"]}


def _owner(algorithms: list[Algorithm], resource: Resource) -> Algorithm | None:
    return next((a for a in algorithms if resource in a.owns), None)


def _splits(cfg: TrainConfig, algorithms: list[Algorithm], workers: int) -> Splits:
    """The run's splits: in-memory arrays, or files streamed by reference (``imagefolder:``, ``beton:``)."""
    spec = parse_data_spec(cfg.dataset)
    if spec is None:
        return array_splits(prepare_data(cfg))
    holdout = cfg.schedule == "plateau" or any(a.needs_validation or a.name == "loss-delta-external"
                                                for a in algorithms)
    val_per_class = cfg.val_per_class if holdout else None
    if spec.kind == "beton":
        from regpipe.engine.ffcv_files import beton_splits

        if holdout:
            raise ValueError(f"recipe {cfg.recipe!r} decides from a held-out validation set, which --data beton:... "
                             "does not carve; use --data imagefolder:ROOT")
        return beton_splits(spec, cfg.image_size, cfg.val_resize, seed=cfg.seed, workers=workers)
    return folder_splits(spec, cfg.image_size, cfg.val_resize, cfg.seed, val_per_class, workers=workers)


def _holdout_batch(splits: Splits, prepare: Callable[..., Batch], rows: int) -> Batch:
    """The held-out validation rows as one normalised :class:`Batch` (at most ``rows`` of a streamed set)."""
    if splits.arrays is not None:
        return _whole(splits.arrays.val, prepare)
    if splits.holdout is None:
        raise ValueError("this recipe reads a validation set, but none was carved")
    take = list(range(min(rows, len(splits.holdout))))
    images, labels, ids = torch.utils.data.default_collate([splits.holdout[i] for i in take])
    return prepare((images, labels, ids))


def _run(cfg: TrainConfig, algorithms: list[Algorithm], device: torch.device, info: distributed.DistInfo,
         scratch: Path, observe: Callable[[int, Batch], None] | None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    workers = cfg.workers if cfg.workers is not None else default_workers(parse_data_spec(cfg.dataset) is not None,
                                                                          info)
    splits = _splits(cfg, algorithms, workers)
    num_classes = splits.num_classes

    # Event 1, before the model: the training set (SIGN adds its transformed versions).
    train_set: torch.utils.data.Dataset = splits.train
    num_samples = len(splits.train)  # the samples, before an algorithm adds rows of its own (SIGN)
    expansion: dict[str, Any] = {}
    teacher, teacher_info = _teacher(cfg, algorithms, scratch, info)
    ctx = DataContext(data=splits.arrays if splits.arrays is not None else splits, device=device,
                      model_name=cfg.model, dataset_name=cfg.dataset, teacher=teacher)
    for alg in algorithms:
        train_set, values = alg.training_set(train_set, ctx)
        expansion.update(values)
    for values in expansion.values():
        if isinstance(values, dict):
            values.update(teacher_info)
    splits.train = train_set

    model = build_model(cfg.model, num_classes=num_classes, in_channels=splits.image_shape[0]).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bare = model  # the unwrapped model: evaluation and BN re-estimation run on it, without DDP's syncs
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(train_set) // cfg.batch_size  # drop_last
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(train_set)} training samples")
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                                weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    # cosine: lr = base * (1 + cos(pi * step / total)) / 2 at every step; plateau: lr = base * scale, the scale
    # lowered by --plateau-factor when the validation accuracy stagnates (regpipe.engine.schedule.Plateau).
    plateau = Plateau(cfg.plateau_factor, cfg.plateau_patience) if cfg.schedule == "plateau" else None
    if plateau is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: plateau.scale)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    loss_fn = soft_target_cross_entropy if cfg.loss == "ce" else multi_hot_bce
    precision = Precision(cfg.amp, device)

    # Event 2, once the model exists: ops, hooks, samplers.
    plain = TorchLoader((), num_classes, device=device, mean=splits.mean, std=splits.std)
    external_rows = cfg.loss_delta.external_rows
    run = RunContext(seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
                     model=model, optimizer=optimizer, loss_fn=loss_fn, num_train=len(train_set),
                     train=splits.arrays.train if splits.arrays is not None else train_set,
                     prepare=plain.to_batch, validation=lambda: _holdout_batch(splits, plain.to_batch, external_rows),
                     keep_mix_parent=any(a.needs_mix_parent for a in algorithms), eval_every=cfg.eval_every)
    for alg in algorithms:
        alg.attach(run)
    # Stable sort by stage: copies are made, then mixed, then planned, whatever the order of the words.
    staged = sorted(((stage, i, op) for i, alg in enumerate(algorithms) for stage, op in alg.ops()),
                    key=lambda t: (t[0], t[1]))
    ops = [op for _, _, op in staged]
    if info.rank > 0:
        distributed.reseed_ops(ops, cfg.seed, info.rank)  # ranks draw their own op parameters

    # Global batches, identical on every rank (same seed); each rank loads its slice (distributed.py).
    sampler_owner = _owner(algorithms, Resource.SAMPLER)
    inner = sampler_owner.batch_sampler() if sampler_owner else None
    if inner is None:  # a fresh permutation every epoch, drop_last
        inner = BatchSampler(RandomSampler(range(len(train_set)), generator=torch.Generator().manual_seed(cfg.seed)),
                             cfg.batch_size, drop_last=True)
    global_batches = ResumableBatches(inner)
    step_owner = _owner(algorithms, Resource.STEP)
    # A mid-epoch state is exact when the data order is a seeded shuffle the loop can replay; a sampler that
    # scores with the model (loss-order) or an epoch that owns the steps (loss-delta) resumes at epoch ends.
    mid_epoch_ok = step_owner is None and isinstance(inner, BatchSampler)

    state = load_state(Path(cfg.out) / STATE_FILE, asdict(cfg), RESUMABLE_CHANGES) if cfg.resume else None
    start_epoch = int(state["epoch"]) if state is not None else 0
    batches = train_loader(cfg.loader, splits, distributed.RankSlice(global_batches, info), seed=cfg.seed,
                           device=device, ops=ops, channels_last=cfg.channels_last, workers=workers,
                           start_epoch=start_epoch, work_dir=scratch, cache_dir=cfg.cache_dir, info=info,
                           val_resize=cfg.val_resize)
    eval_size = cfg.eval_batch_size or max(1, cfg.batch_size // info.world_size)
    bn_order = torch.Generator().manual_seed(cfg.seed + 1)
    # Clean batches for re-estimating BatchNorm statistics while an algorithm mixes the inputs.
    bn_size = max(1, cfg.batch_size // info.world_size)
    bn_batches = clean_loader(splits, bn_size, bn_order, device, workers, count=bn_size * cfg.bn_batches,
                              resize=cfg.val_resize)
    test_batches = eval_loader(splits, splits.test, eval_size, device, workers, info, resize=cfg.val_resize)
    # The per-epoch test accuracy may read a seeded subset (--eval-subset); the final one reads the whole set.
    epoch_test_batches = test_batches
    if cfg.eval_subset is not None and cfg.eval_subset < len(splits.test):
        rows = torch.randperm(len(splits.test), generator=torch.Generator().manual_seed(cfg.seed + 2))
        rows = rows[:cfg.eval_subset].sort().values
        subset: torch.utils.data.Dataset = ArrayDataset(splits.test.arrays.subset(rows)) \
            if isinstance(splits.test, ArrayDataset) else torch.utils.data.Subset(splits.test, rows.tolist())
        epoch_test_batches = eval_loader(splits, subset, eval_size, device, workers, info, resize=cfg.val_resize)
    val_batches = eval_loader(splits, splits.holdout, eval_size, device, workers, info, resize=cfg.val_resize) \
        if splits.holdout is not None else None
    needs_validation = plateau is not None or any(a.needs_validation for a in algorithms)

    forward_owner = _owner(algorithms, Resource.FORWARD)
    needs_input_grad = any(a.needs_input_grad for a in algorithms)
    task_scale = math.prod(a.task_scale() for a in algorithms)
    position = {"epoch": 0, "step": 0}

    def loss_of(batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        with precision.autocast():
            if forward_owner is not None:
                return forward_owner.forward_loss(model, batch, loss_fn)
            x = batch.inputs.detach().requires_grad_(True) if needs_input_grad else batch.inputs
            logits = model(x)
            task = loss_fn(logits, batch.targets)
            step = StepInputs(model=model, batch=batch, inputs=x, logits=logits, loss_fn=loss_fn)
            total, log = task_scale * task, {}
            for alg in algorithms:
                for name, term in alg.loss_terms(step).items():
                    total = total + term
                    log[name] = term.detach()
            if log:
                log["task"] = task.detach()
            return total, log

    def take_step(batch: Batch) -> StepReport:
        loss, log = loss_of(batch)
        if not torch.isfinite(loss):
            raise ValueError(f"training loss became {loss.item()} at epoch {position['epoch']} step "
                             f"{position['step'] + 1} (recipe {cfg.recipe!r}); lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(loss, optimizer)
        return batch, loss.detach(), log

    def epoch_steps() -> Iterator[StepReport]:
        if step_owner is not None:
            with precision.autocast():  # the owner's own forward passes (bf16 only: fp16 is refused above)
                yield from step_owner.run_epoch(batches, take_step)
        else:
            yield from (take_step(batch) for batch in batches)

    def describe() -> dict[str, Any]:
        state: dict[str, Any] = {}
        for alg in algorithms:
            for key, value in alg.describe().items():
                if key in state:
                    raise ValueError(f"two algorithms of {cfg.recipe!r} log the same key {key!r}")
                state[key] = value
        return state

    def mixing() -> bool:
        return cfg.bn_recalibration and any(a.mixing() for a in algorithms)

    history: list[dict[str, Any]] = []
    running: dict[str, Any] = {"loss_sum": 0.0, "images": 0, "logged": {}, "seconds": 0.0}
    stopped = False
    if state is not None:
        _restore(state, bare, optimizer, scheduler, precision, algorithms, global_batches, bn_order, mid_epoch_ok,
                 plateau)
        history, running, stopped = state["history"], state["running"], bool(state["stopped"])
        position["step"] = int(state["step"])

    def save(epoch: int, step: int) -> None:
        if cfg.out is None or not info.is_main:
            return
        save_state(Path(cfg.out) / STATE_FILE, {
            "config": asdict(cfg), "epoch": epoch, "step": step, "stopped": stopped, "history": history,
            "running": running, "model": bare.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "precision": precision.state_dict(),
            "plateau": plateau.state_dict() if plateau is not None else None,
            "algorithms": [a.state_dict() for a in algorithms], "data_order": global_batches.state_for(epoch),
            "bn_order": bn_order.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})

    started = time.perf_counter()
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch + position["step"],
               desc=f"{cfg.recipe} seed {cfg.seed}", disable=not cfg.progress or not info.is_main, unit="step")
    global_step = start_epoch * steps_per_epoch + position["step"]
    for epoch in range(start_epoch, cfg.epochs):
        if stopped:
            break
        position["epoch"] = epoch + 1
        if epoch > start_epoch or state is None:
            position["step"] = 0
            running = {"loss_sum": 0.0, "images": 0, "logged": {}, "seconds": 0.0}
        set_epoch = getattr(train_set, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)  # the epoch's crops (counter-based draws, any worker)
        model.train()
        tick = time.perf_counter()
        if position["step"] == 0:
            running["describe"] = describe()  # the algorithms' state at the epoch's start (a resumed epoch keeps it)
        epoch_state = running["describe"]
        for batch, loss, log in epoch_steps():
            scheduler.step()
            for alg in algorithms:
                alg.after_step()
            running["loss_sum"] += float(loss)
            running["images"] += batch.size
            position["step"] += 1
            global_step += 1
            for key, value in log.items():
                if math.isfinite(float(value)):  # a step without a choice reports nan
                    running["logged"].setdefault(key, []).append(float(value))
            if observe is not None:
                observe(epoch, batch)
            if bar.n % 10 == 0 or position["step"] == steps_per_epoch:
                elapsed = running["seconds"] + time.perf_counter() - tick
                bar.set_postfix(loss=f"{float(loss):.3f}", img_s=f"{running['images'] * info.world_size / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if (cfg.checkpoint_every and mid_epoch_ok and global_step % cfg.checkpoint_every == 0
                    and position["step"] < steps_per_epoch):
                running["seconds"] += time.perf_counter() - tick
                tick = time.perf_counter()
                save(epoch, position["step"])
        seconds = running["seconds"] + time.perf_counter() - tick
        # Summed over ranks: the loss is the mean of every rank's per-step loss, the rows are the global batch's.
        loss_sum, images = distributed.all_reduce_sum([running["loss_sum"], running["images"]], info)
        steps = position["step"]  # optimizer steps, the same on every rank
        # Evaluations at epochs eval_every, 2 * eval_every, ... and the last; the others log no accuracy.
        test_acc = val_acc = None
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            with evaluation_model(bare, mixing(), bn_batches, cfg.bn_batches) as net:
                test_acc = evaluate(net, epoch_test_batches, info=info)
                # reduced over ranks, so the decisions (the cascade's, the plateau's) agree on every rank
                val_acc = evaluate(net, val_batches, info=info) if needs_validation and val_batches is not None \
                    else None
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(steps * info.world_size, 1),
               "steps": int(steps), "images": int(images), "rows_per_step": images / max(steps, 1),
               "images_per_s": images / max(seconds, 1e-9), "lr": scheduler.get_last_lr()[0], **epoch_state}
        if test_acc is not None:
            row["test_accuracy"] = test_acc
        # Per-step values the algorithms report (loss terms, loss-delta scores): their epoch mean (rank 0's).
        row.update({f"mean_{key}": sum(v) / len(v) for key, v in running["logged"].items() if v})
        if val_acc is not None:
            row["val_accuracy"] = val_acc
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc="-" if test_acc is None else f"{test_acc:.4f}",
                        img_s=f"{row['images_per_s']:.0f}", **epoch_state)
        if val_acc is not None and any([a.after_eval(val_acc, model, optimizer) for a in algorithms]):
            stopped = True
        if plateau is not None and val_acc is not None:
            # after the cascade, which may load an older optimizer state: the new scale holds from the next step
            scale = plateau.report(val_acc)
            for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * scale
        position["step"] = 0
        running = {"loss_sum": 0.0, "images": 0, "logged": {}, "seconds": 0.0}
        if epoch + 1 < cfg.epochs and not stopped:
            save(epoch + 1, 0)  # every epoch end: an interrupted run resumes from here at the latest
    bar.close()

    for alg in algorithms:  # the hooks come off before the final evaluation (and again, harmlessly, in finally)
        alg.close()
    with evaluation_model(bare, mixing(), bn_batches, cfg.bn_batches) as net:
        final_acc = evaluate(net, test_batches, info=info)
        tta_acc = None
        if cfg.tta_draws > 0:
            tta = TestTimeSumAugmentation(k=2, draws=cfg.tta_draws, seed=distributed.rank_seed(cfg.seed, info.rank))
            tta_acc = evaluate(net, test_batches, tta, info=info)
        if cfg.checkpoint_out is not None and info.is_main:
            # Saved as evaluated: a run that ends while mixing keeps the BatchNorm statistics re-estimated
            # on clean batches, so `regpipe eval` of the checkpoint scores what this run reports.
            save_checkpoint(cfg.checkpoint_out, net, cfg.model, num_classes, splits.image_shape,
                            splits.mean, splits.std, asdict(cfg))
    metrics: dict[str, Any] = {
        "recipe": cfg.recipe, "algorithms": [a.name for a in algorithms], "seed": cfg.seed, "device": str(device),
        "world_size": info.world_size, "test_accuracy": final_acc,
        "train_seconds": time.perf_counter() - started, "train_samples": num_samples,
        "epochs": history, "config": asdict(cfg), **expansion,
        # the run's budget: optimizer steps and training rows (global batches, an algorithm's extra rows included)
        "optimizer_steps": sum(int(r["steps"]) for r in history),
        "images_seen": sum(int(r.get("images", round(r["rows_per_step"] * r["steps"]))) for r in history),
    }
    if splits.spec is not None:
        metrics["data"] = {"kind": splits.spec.kind, "train": str(splits.spec.train), "eval": str(splits.spec.val),
                           "mean": list(splits.mean), "std": list(splits.std)}
    if tta_acc is not None:
        metrics["test_accuracy_tta"] = tta_acc
    if cfg.out is not None and info.is_main:
        write_json(Path(cfg.out) / "metrics.json", metrics)
    if cfg.out is not None and info.is_main:
        (Path(cfg.out) / STATE_FILE).unlink(missing_ok=True)  # finished: nothing left to resume
    return metrics


def _restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision, algorithms: list[Algorithm],
             order: ResumableBatches, bn_order: torch.Generator, mid_epoch_ok: bool,
             plateau: Plateau | None = None) -> None:
    """Load a saved training state into the freshly built run (after the ops were seeded for this rank)."""
    if int(state["step"]) and not mid_epoch_ok:
        raise ValueError("the saved state is in the middle of an epoch, which this recipe resumes only at epoch ends")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if plateau is not None:
        if state.get("plateau") is None:
            raise ValueError("the saved state holds no plateau schedule state (it was saved by a cosine run)")
        plateau.load_state_dict(state["plateau"])
    precision.load_state_dict(state["precision"])
    if len(state["algorithms"]) != len(algorithms):
        raise ValueError(f"the saved state holds {len(state['algorithms'])} algorithm states for {len(algorithms)}")
    for alg, alg_state in zip(algorithms, state["algorithms"]):
        alg.load_state_dict(alg_state)
    order.resume_at(state["data_order"], skip=int(state["step"]))
    bn_order.set_state(state["bn_order"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _whole(arrays: ImageArrays, prepare: Callable[..., Batch]) -> Batch:
    """All of ``arrays`` as one normalised :class:`Batch` on the device."""
    return prepare((arrays.images, arrays.labels, torch.arange(len(arrays.labels))))
