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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
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
from regpipe.engine.evaluation import eval_batches, evaluate, evaluation_model
from regpipe.engine.models import build_model
from regpipe.functional.losses import multi_hot_bce, soft_target_cross_entropy
from regpipe.loaders import make_train_loader
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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.recipe`` on one seed; returns (and writes to ``cfg.out/metrics.json``) the metrics.

    Raises:
        ValueError: an unknown recipe word or device, or a setting an algorithm refuses (before any data
            is read); :class:`~regpipe.engine.algorithms.ComposeError` for algorithms that cannot run
            together; a non-finite training loss (naming the epoch and step).
    """
    algorithms = build_algorithms(cfg)
    device = resolve_device(cfg.device)
    info = distributed.setup(device)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    try:
        return _run(cfg, algorithms, device, info)
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
    metrics = train(replace(cfg, recipe="baseline", out=None, checkpoint_out=str(path)))
    return path, {"teacher": "baseline", "teacher_test_accuracy": metrics["test_accuracy"],
                  "teacher_train_seconds": metrics["train_seconds"]}


def _owner(algorithms: list[Algorithm], resource: Resource) -> Algorithm | None:
    return next((a for a in algorithms if resource in a.owns), None)


def _run(cfg: TrainConfig, algorithms: list[Algorithm], device: torch.device,
         info: distributed.DistInfo) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg)
    num_classes = data.train.num_classes

    # Event 1, before the model: the training set (SIGN adds its transformed versions).
    train_set: torch.utils.data.Dataset = ArrayDataset(data.train)
    expansion: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        teacher, teacher_info = _teacher(cfg, algorithms, Path(scratch), info)
        ctx = DataContext(data=data, device=device, model_name=cfg.model, dataset_name=cfg.dataset, teacher=teacher)
        for alg in algorithms:
            train_set, values = alg.training_set(train_set, ctx)
            expansion.update(values)
    for values in expansion.values():
        if isinstance(values, dict):
            values.update(teacher_info)

    model = build_model(cfg.model, num_classes=num_classes, in_channels=data.train.images.shape[1]).to(device)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    loss_fn = soft_target_cross_entropy if cfg.loss == "ce" else multi_hot_bce

    # Event 2, once the model exists: ops, hooks, samplers.
    plain = TorchLoader((), num_classes, device=device, mean=data.mean, std=data.std)
    run = RunContext(seed=cfg.seed, epochs=cfg.epochs, batch_size=cfg.batch_size, steps_per_epoch=steps_per_epoch,
                     model=model, optimizer=optimizer, loss_fn=loss_fn, num_train=len(train_set), train=data.train,
                     prepare=plain.to_batch, validation=lambda: _whole(data.val, plain),
                     keep_mix_parent=any(a.needs_mix_parent for a in algorithms))
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
    global_batches, order = (sampler_owner.batch_sampler() if sampler_owner else None), None
    if global_batches is None:  # what DataLoader(shuffle=True, drop_last=True, generator=order) draws
        order = torch.Generator().manual_seed(cfg.seed)
        global_batches = BatchSampler(RandomSampler(range(len(train_set)), generator=order), cfg.batch_size,
                                      drop_last=True)
    if cfg.loader == "torch":
        # The loader draws its worker base seed from `order` too, as the shuffled DataLoader did.
        train_loader = DataLoader(train_set, batch_sampler=distributed.RankSlice(global_batches, info),
                                  generator=order)
        batches = TorchLoader(train_loader, num_classes, device=device, ops=ops, mean=data.mean, std=data.std,
                              channels_last=cfg.channels_last)
    else:  # DALI or FFCV, fed the same index lists (regpipe.loaders.make_train_loader)
        batches = make_train_loader(cfg.loader, train_set, distributed.RankSlice(global_batches, info), num_classes,
                                    seed=cfg.seed, device=device, ops=ops, mean=data.mean, std=data.std,
                                    channels_last=cfg.channels_last)
    # Clean batches for re-estimating BatchNorm statistics while an algorithm mixes the inputs.
    bn_loader = DataLoader(ArrayDataset(data.train), batch_size=cfg.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(cfg.seed + 1))
    bn_batches = TorchLoader(bn_loader, num_classes, device=device, mean=data.mean, std=data.std)
    test_batches = eval_batches(data.test, data.mean, data.std, device, cfg.eval_batch_size, info)
    val_batches = eval_batches(data.val, data.mean, data.std, device, cfg.eval_batch_size, info)
    needs_validation = any(a.needs_validation for a in algorithms)

    forward_owner = _owner(algorithms, Resource.FORWARD)
    step_owner = _owner(algorithms, Resource.STEP)
    needs_input_grad = any(a.needs_input_grad for a in algorithms)
    task_scale = math.prod(a.task_scale() for a in algorithms)
    position = {"epoch": 0, "step": 0}

    def loss_of(batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
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
        loss.backward()
        optimizer.step()
        return batch, loss.detach(), log

    def epoch_steps() -> Iterator[StepReport]:
        if step_owner is not None:
            return step_owner.run_epoch(batches, take_step)
        return (take_step(batch) for batch in batches)

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
    started = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"{cfg.recipe} seed {cfg.seed}", disable=not cfg.progress or not info.is_main,
               unit="epoch")
    for epoch in bar:
        position["epoch"], position["step"] = epoch + 1, 0
        model.train()
        state = describe()
        loss_sum, images, tick = 0.0, 0, time.perf_counter()
        logged: dict[str, list[float]] = {}
        for batch, loss, log in epoch_steps():
            scheduler.step()
            for alg in algorithms:
                alg.after_step()
            loss_sum += float(loss)
            images += batch.size
            position["step"] += 1
            for key, value in log.items():
                if math.isfinite(float(value)):  # a step without a choice reports nan
                    logged.setdefault(key, []).append(float(value))
        seconds = time.perf_counter() - tick
        loss_sum, images, steps = distributed.all_reduce_sum([loss_sum, images, position["step"]], info)
        with evaluation_model(bare, mixing(), bn_batches, cfg.bn_batches) as net:
            test_acc = evaluate(net, test_batches, info=info)
            # reduced over ranks, so the algorithms' decisions (the cascade's) agree on every rank
            val_acc = evaluate(net, val_batches, info=info) if needs_validation else None
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(steps, 1), "test_accuracy": test_acc,
               "steps": int(steps), "rows_per_step": images / max(steps, 1),
               "images_per_s": images / max(seconds, 1e-9), "lr": scheduler.get_last_lr()[0], **state}
        # Per-step values the algorithms report (loss terms, loss-delta scores): their epoch mean (rank 0's).
        row.update({f"mean_{key}": sum(v) / len(v) for key, v in logged.items() if v})
        if val_acc is not None:
            row["val_accuracy"] = val_acc
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{test_acc:.4f}", **state)
        if val_acc is not None and any([a.after_eval(val_acc, model, optimizer) for a in algorithms]):
            break

    for alg in algorithms:  # the hooks come off before the final evaluation (and again, harmlessly, in finally)
        alg.close()
    with evaluation_model(bare, mixing(), bn_batches, cfg.bn_batches) as net:
        final_acc = evaluate(net, test_batches, info=info)
        tta_acc = None
        if cfg.tta_draws > 0:
            tta = TestTimeSumAugmentation(k=2, draws=cfg.tta_draws, seed=distributed.rank_seed(cfg.seed, info.rank))
            tta_acc = evaluate(net, test_batches, tta, info=info)
    metrics: dict[str, Any] = {
        "recipe": cfg.recipe, "algorithms": [a.name for a in algorithms], "seed": cfg.seed, "device": str(device),
        "world_size": info.world_size, "test_accuracy": final_acc,
        "train_seconds": time.perf_counter() - started, "train_samples": len(data.train.labels),
        "epochs": history, "config": asdict(cfg), **expansion,
    }
    if tta_acc is not None:
        metrics["test_accuracy_tta"] = tta_acc
    if cfg.out is not None and info.is_main:
        write_json(Path(cfg.out) / "metrics.json", metrics)
    if cfg.checkpoint_out is not None and info.is_main:
        save_checkpoint(cfg.checkpoint_out, bare, cfg.model, num_classes, tuple(data.train.images.shape[1:]),
                        data.mean, data.std, asdict(cfg))
    return metrics


def _whole(arrays: ImageArrays, plain: TorchLoader) -> Batch:
    """All of ``arrays`` as one normalised :class:`Batch` on the device."""
    return plain.to_batch((arrays.images, arrays.labels, torch.arange(len(arrays.labels))))
