"""The training loop behind ``regpipe train`` and ``regpipe compare``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from tqdm.auto import tqdm

from regpipe import distributed
from regpipe.bn import clean_bn_statistics
from regpipe.data import ArrayDataset, ImageArrays, load_dataset, split_train_val, stratified_indices
from regpipe.functional.losses import multi_hot_bce, soft_target_cross_entropy
from regpipe.loaders import make_train_loader
from regpipe.loaders.torch import TorchLoader
from regpipe.checkpoint import save_checkpoint
from regpipe.models import build_model
from regpipe.ops.tta import TestTimeSumAugmentation
from regpipe.batch import Batch
from regpipe.recipes import RecipeContext, build_recipe, training_set

__all__ = ["TrainConfig", "train", "prepare_data", "resolve_device"]


@dataclass
class TrainConfig:
    """Every setting of one training run (the CLI flags map 1:1 onto these fields)."""

    recipe: str = "gradual"
    epochs: int = 15
    seed: int = 0
    samples_per_class: int | None = 100
    model: str = "preact-small"
    device: str = "auto"
    out: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    shape: Literal["cifar", "native"] = "cifar"
    batch_size: int = 64
    eval_batch_size: int = 1000
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    loss: Literal["ce", "bce"] = "ce"
    val_per_class: int = 50
    k: int = 4
    k0: int = 4
    mix_mode: Literal["group", "permute"] = "group"
    fine_tune_frac: float = 0.2
    stages: tuple[int, ...] = (4, 2, 1)
    patience: int = 3
    stop_at: int = 1
    patchup_layers: tuple[str, ...] = ("conv1", "layer1")
    patchup_loss: Literal["bce", "ce"] = "bce"
    delta_k: int = 4
    delta_relative: bool = False
    order: Literal["ascending", "descending"] = "descending"
    replicas: int = 4
    inv_layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    inv_alpha: float = 0.1
    inv_ratio: float = 10.0
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sign_iters: tuple[int, ...] = (50, 100)
    sign_eta: float = 1.0
    sign_layer: str | None = None
    sign_teacher: str | None = None
    checkpoint_out: str | None = None
    bn_recalibration: bool = True
    bn_batches: int = 16
    tta_draws: int = 0
    channels_last: bool = False
    progress: bool = True
    loader: str = "torch"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "val_per_class", "bn_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {self.samples_per_class}")
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.loader not in ("torch", "dali", "ffcv"):
            raise ValueError(f"loader must be 'torch', 'dali' or 'ffcv', got {self.loader!r}")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given (CUDA requested but absent is an error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


@dataclass(frozen=True)
class RunData:
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


def _eval_inputs(arrays: ImageArrays, data: RunData, device: torch.device, batch_size: int,
                 info: distributed.DistInfo = distributed.DistInfo()) -> TorchLoader:
    """Evaluation batches of this rank's shard (every ``world_size``-th sample from ``rank``)."""
    if info.distributed:
        arrays = arrays.subset(torch.arange(info.rank, len(arrays.labels), info.world_size))
    loader = DataLoader(ArrayDataset(arrays), batch_size=batch_size, shuffle=False)
    return TorchLoader(loader, arrays.num_classes, device=device, mean=data.mean, std=data.std)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: TorchLoader, tta: TestTimeSumAugmentation | None = None,
             info: distributed.DistInfo = distributed.DistInfo()) -> float:
    """Top-1 accuracy of ``model`` (already in the mode wanted) over ``loader``'s batches (summed over the
    ranks' shards under ``torchrun``)."""
    correct = total = 0
    for batch in loader:
        if tta is None:
            pred = model(batch.inputs).argmax(dim=1)
        else:
            pred = tta.predict(model, batch.inputs).argmax(dim=1)
        correct += int((pred == batch.targets.argmax(dim=1)).sum())
        total += batch.size
    correct, total = distributed.all_reduce_sum([correct, total], info)
    return correct / max(total, 1)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one recipe on one seed; returns (and writes to ``cfg.out/metrics.json``) the metrics."""
    device = resolve_device(cfg.device)
    info = distributed.setup(device)
    if info.distributed and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg)
    # A recipe may train on more rows than the samples (sign: + their SIGN versions); baseline: the samples.
    train_set, expansion = training_set(cfg, data, device)
    num_classes = data.train.num_classes
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

    plain = TorchLoader((), num_classes, device=device, mean=data.mean, std=data.std)
    ctx = RecipeContext(steps_per_epoch=steps_per_epoch, model=model, optimizer=optimizer, loss_fn=loss_fn,
                        train=data.train, prepare=plain.to_batch,
                        validation=lambda: _whole(data.val, plain))
    recipe = build_recipe(cfg, ctx)
    distributed.reseed_ops(recipe.ops, info.rank)  # ranks draw their own op parameters
    # Global batches, identical on every rank (same seed); each rank loads its slice (distributed.py).
    global_batches, order = recipe.batch_sampler, None
    if global_batches is None:  # what DataLoader(shuffle=True, drop_last=True, generator=order) draws
        order = torch.Generator().manual_seed(cfg.seed)
        global_batches = BatchSampler(RandomSampler(range(len(train_set)), generator=order), cfg.batch_size,
                                      drop_last=True)
    # The loader draws its worker base seed from `order` too, as the shuffled DataLoader did.
    train_loader = DataLoader(train_set, batch_sampler=distributed.RankSlice(global_batches, info), generator=order)
    batches = TorchLoader(train_loader, num_classes, device=device, ops=recipe.ops, mean=data.mean, std=data.std,
                          channels_last=cfg.channels_last)
    if cfg.loader != "torch":  # DALI or FFCV, fed the same index lists (regpipe.loaders.make_train_loader)
        batches = make_train_loader(cfg.loader, train_set, distributed.RankSlice(global_batches, info), num_classes,
                                    seed=cfg.seed, device=device, ops=recipe.ops, mean=data.mean, std=data.std,
                                    channels_last=cfg.channels_last)
    # Clean batches for re-estimating BatchNorm statistics while the recipe mixes (SPEC 1.2).
    bn_loader = DataLoader(ArrayDataset(data.train), batch_size=cfg.batch_size, shuffle=True,
                           generator=torch.Generator().manual_seed(cfg.seed + 1))
    bn_batches = TorchLoader(bn_loader, num_classes, device=device, mean=data.mean, std=data.std)
    test_batches = _eval_inputs(data.test, data, device, cfg.eval_batch_size, info)
    val_batches = _eval_inputs(data.val, data, device, cfg.eval_batch_size, info)

    def plain_steps(batches: TorchLoader):
        for batch in batches:
            if recipe.compute_loss is None:
                loss = loss_fn(model(batch.inputs), batch.targets)
            else:
                loss = recipe.compute_loss(model, batch, loss_fn)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield batch, loss.detach(), recipe.step_log()

    run_epoch = recipe.run_epoch or plain_steps

    def evaluation_model():
        if recipe.mixing() and cfg.bn_recalibration:
            clean = [b.inputs for _, b in zip(range(cfg.bn_batches), bn_batches)]
            return clean_bn_statistics(bare, clean)
        return _eval_mode(bare)

    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"{cfg.recipe} seed {cfg.seed}", disable=not cfg.progress or not info.is_main,
               unit="epoch")
    for epoch in bar:
        model.train()
        state = recipe.describe()
        loss_sum, images, steps, tick = 0.0, 0, 0, time.perf_counter()
        logged: dict[str, list[float]] = {}
        for batch, loss, log in run_epoch(batches):
            scheduler.step()
            recipe.after_step()
            loss_sum += float(loss)
            images += batch.size
            steps += 1
            for key, value in log.items():
                if math.isfinite(float(value)):  # a step without a choice reports nan
                    logged.setdefault(key, []).append(float(value))
        seconds = time.perf_counter() - tick
        loss_sum, images, steps = distributed.all_reduce_sum([loss_sum, images, steps], info)
        with evaluation_model() as net:
            test_acc = evaluate(net, test_batches, info=info)
            # reduced over ranks, so the recipe's decisions (the cascade's) agree on every rank
            val_acc = evaluate(net, val_batches, info=info) if recipe.needs_validation else None
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(steps, 1), "test_accuracy": test_acc,
               "images_per_s": images / max(seconds, 1e-9), "lr": scheduler.get_last_lr()[0], **state}
        # Per-step values a recipe reports (e.g. the chosen loss-delta scores): their epoch mean (rank 0's).
        row.update({f"mean_{key}": sum(v) / len(v) for key, v in logged.items() if v})
        if val_acc is not None:
            row["val_accuracy"] = val_acc
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{test_acc:.4f}", **{k: v for k, v in state.items()})
        if val_acc is not None and recipe.after_eval(val_acc, model, optimizer):
            break

    recipe.close()
    with evaluation_model() as net:
        final_acc = evaluate(net, test_batches, info=info)
        tta_acc = None
        if cfg.tta_draws > 0:
            tta = TestTimeSumAugmentation(k=2, draws=cfg.tta_draws, seed=distributed.rank_seed(cfg.seed, info.rank))
            tta_acc = evaluate(net, test_batches, tta, info=info)
    metrics: dict[str, Any] = {
        "recipe": cfg.recipe, "seed": cfg.seed, "device": str(device), "world_size": info.world_size,
        "test_accuracy": final_acc,
        "train_seconds": time.perf_counter() - started, "train_samples": len(data.train.labels),
        "epochs": history, "config": asdict(cfg), **expansion,
    }
    if tta_acc is not None:
        metrics["test_accuracy_tta"] = tta_acc
    if cfg.out is not None and info.is_main:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if cfg.checkpoint_out is not None and info.is_main:
        save_checkpoint(cfg.checkpoint_out, bare, cfg.model, num_classes, tuple(data.train.images.shape[1:]),
                        data.mean, data.std, asdict(cfg))
    distributed.teardown(info)
    return metrics


def _whole(arrays: ImageArrays, plain: TorchLoader) -> Batch:
    """All of ``arrays`` as one normalised :class:`Batch` on the device."""
    return plain.to_batch((arrays.images, arrays.labels, torch.arange(len(arrays.labels))))


class _eval_mode:
    """Context manager: the model in eval mode, its previous mode restored on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> torch.nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
