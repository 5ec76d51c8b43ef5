"""The options of ``regpipe train`` and ``regpipe compare``, and the :class:`TrainConfig` they build.

Each option group maps onto one config dataclass of :mod:`regpipe.engine.config` (``sum augmentation``
-> ``SumConfig``, ``CascadeConfig`` and ``GradualConfig``; ``patchup`` -> ``PatchUpConfig``; ...).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from regpipe.engine.algorithms import RECIPE_WORDS
from regpipe.engine.splits import parse_data_spec
from regpipe.engine.config import (
    CascadeConfig,
    CutMixConfig,
    CutOutConfig,
    GradualConfig,
    InvarianceConfig,
    LossDeltaConfig,
    LossOrderConfig,
    MixUpConfig,
    PatchUpConfig,
    ReplicationConfig,
    SaliencyConfig,
    SignConfig,
    SumConfig,
    TrainConfig,
)

__all__ = ["add_train_options", "build_config", "int_list"]

_DEFAULTS = TrainConfig()


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_train_options(parser: argparse.ArgumentParser, with_recipe: bool) -> None:
    """The options of one training run, in groups that map onto the config dataclasses."""
    d = _DEFAULTS
    if with_recipe:
        parser.add_argument("--recipe", default=d.recipe,
                            help=f"'+'-joined algorithms, e.g. gradual+invariance (default: {d.recipe}); "
                                 f"words: {', '.join(sorted(RECIPE_WORDS))}")
        parser.add_argument("--seed", type=int, default=d.seed, help="seed of data subset, init, order and ops")
        parser.add_argument("--out", default="runs/train", help="output directory for metrics.json (default: runs/train)")
        parser.add_argument("--checkpoint-out", default=None,
                            help="also save the trained model here (a checkpoint `regpipe sign` reads)")
        parser.add_argument("--resume", action="store_true",
                            help="continue the interrupted run in --out from its OUT/state.pt (same settings): on "
                                 "the same machine and thread count it trains the per-epoch losses and ends with "
                                 "the metrics of the uninterrupted run, on every loader")
    data = parser.add_argument_group("data")
    data.add_argument("--data", "--dataset", dest="dataset", default=d.dataset,
                      help="streamed from disk: imagefolder:ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*, the "
                           "ImageNet layout) | beton:TRAIN.beton,VAL.beton (FFCV, with --loader ffcv); in memory: "
                           "fashion-mnist (default) | npz:DIR (train.npz, test.npz) | npz:TRAIN.npz,TEST.npz | "
                           "folder:ROOT (ROOT/train, ROOT/test: a sub-folder per class)")
    data.add_argument("--image-size", type=int, default=d.image_size,
                      help=f"streamed data: side of the training random-resized crop and of the validation centre "
                           f"crop (default: {d.image_size})")
    data.add_argument("--val-resize", type=int, default=None,
                      help="streamed data: validation images' shorter side is resized to this before the centre "
                           "crop of --image-size; 1 to 1.5 times --image-size (default: round(image-size * 256 / "
                           "224), ImageNet's ratio: 256 at 224, 73 at 64)")
    data.add_argument("--workers", type=int, default=d.workers,
                      help="decoding workers per process (torch DataLoader workers, DALI threads, FFCV workers); "
                           "default: 0 in memory, else the cores per process up to 8")
    data.add_argument("--cache-dir", default=d.cache_dir,
                      help="where --data imagefolder:... converted for --loader ffcv is kept between runs "
                           "(default: $XDG_CACHE_HOME/regpipe or ~/.cache/regpipe)")
    data.add_argument("--data-dir", default=d.data_dir,
                      help="folder with the Fashion-MNIST idx .gz files (default: $REGPIPE_DATA_DIR or "
                           "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)")
    data.add_argument("--shape", default=d.shape, choices=["cifar", "native"],
                      help="cifar: 3x32x32 (pad + repeat channel, default); native: as stored (1x28x28)")
    data.add_argument("--samples-per-class", type=int, default=None,
                      help=f"in-memory data: stratified, seeded training subset (default: {d.samples_per_class}; "
                           "0 = all); off for imagefolder:/beton: data")
    data.add_argument("--val-per-class", type=int, default=d.val_per_class,
                      help=f"held-out validation samples per class, for cascade decisions (default: {d.val_per_class})")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"epoch budget (default: {d.epochs})")
    opt.add_argument("--batch-size", type=int, default=d.batch_size,
                     help=f"global batch: summed over the torchrun processes, each loads batch-size/N "
                          f"(default: {d.batch_size})")
    opt.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                     help="evaluation batch per process (default: batch-size/N)")
    opt.add_argument("--amp", default=d.amp, choices=["off", "bf16", "fp16"],
                     help="mixed precision: autocast forward and loss in bfloat16, or float16 with loss scaling "
                          "(default: off)")
    opt.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                     help="also write OUT/state.pt every N optimizer steps (it is always written at epoch ends "
                          "and on SIGTERM, and removed when the run finishes; loss-order, and loss-delta with an "
                          "op, resume at epoch starts only, which the run says when it starts)")
    opt.add_argument("--lr", type=float, default=d.lr, help=f"SGD-Nesterov learning rate, see --schedule (default: {d.lr})")
    opt.add_argument("--schedule", default=d.schedule, choices=["cosine", "plateau"],
                     help="learning-rate schedule: cosine decay to 0 over the epochs (default), or plateau: "
                          "multiply the lr by --plateau-factor when the validation accuracy has not improved for "
                          "--plateau-patience evaluations (Simionescu 2020: reduce when learning stagnates)")
    opt.add_argument("--plateau-factor", type=float, default=d.plateau_factor,
                     help=f"plateau: lr multiplier at each reduction, in (0, 1) (default: {d.plateau_factor})")
    opt.add_argument("--plateau-patience", type=int, default=d.plateau_patience,
                     help=f"plateau: evaluations without improvement before a reduction (default: {d.plateau_patience})")
    opt.add_argument("--eval-every", type=int, default=d.eval_every,
                     help="evaluate every N epochs (epochs N, 2N, ... and always the last); the plateau schedule "
                          "and the cascade count these evaluations (default: 1)")
    opt.add_argument("--eval-subset", type=int, default=d.eval_subset,
                     help="the per-epoch test accuracy reads only the first N test images (a seeded draw of "
                          "in-memory data); the final test accuracy always reads the whole test set "
                          "(default: all)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    opt.add_argument("--loss", default=d.loss, choices=["ce", "bce"],
                     help="ce: soft-target cross-entropy (default); bce: the Sum Augmentation paper's multi-hot BCE")
    opt.add_argument("--model", default=d.model,
                     help="preact-small (default), preact-resnet18, torchvision:NAME (e.g. torchvision:resnet50), "
                          "timm:NAME (e.g. timm:resnet50), or package.module:factory (called with num_classes= "
                          "and in_channels= when it takes it)")
    opt.add_argument("--device", default=d.device, help="auto (CUDA if present, default), cpu, cuda, cuda:1, ...")
    opt.add_argument("--channels-last", action="store_true", help="channels_last inputs and model")
    opt.add_argument("--loader", default=d.loader, choices=["torch", "dali", "ffcv"],
                     help="training data loader: torch DataLoader (default), NVIDIA DALI or FFCV (the dali/ffcv "
                          "extras); all read the same batches and run the recipe's ops on the device")
    mix = parser.add_argument_group("sum augmentation")
    mix.add_argument("--k", type=int, default=d.sum.k, help=f"sum groups of the 'sum' recipe (default: {d.sum.k})")
    mix.add_argument("--k0", type=int, default=d.gradual.k0, help=f"starting inputs of the 'gradual' recipe (default: {d.gradual.k0})")
    mix.add_argument("--mix-mode", default=d.sum.mode, choices=["group", "permute"],
                     help="group: N rows -> N/k mixed rows (the thesis's, default); permute: keep N rows")
    mix.add_argument("--fine-tune-frac", type=float, default=d.gradual.fine_tune_frac,
                     help=f"share of the epochs trained clean after the gradual phase (default: {d.gradual.fine_tune_frac})")
    mix.add_argument("--stages", type=int_list, default=d.cascade.stages,
                     help=f"cascade stages, decreasing k (default: {','.join(map(str, d.cascade.stages))})")
    mix.add_argument("--patience", type=int, default=d.cascade.patience,
                     help=f"cascade: evaluations without improvement before the next stage (default: {d.cascade.patience})")
    mix.add_argument("--stop-at", type=int, default=d.cascade.stop_at,
                     help="cascade: last k (2 skips the clean fine-tune, for test-time sum augmentation)")
    mix.add_argument("--no-bn-recalibration", action="store_true",
                     help="evaluate mixed phases with the BN statistics as trained (default: re-estimate on clean batches)")
    mix.add_argument("--tta-draws", type=int, default=d.tta_draws,
                     help="also report test accuracy with test-time sum augmentation (k=2) over this many draws")
    pu = parser.add_argument_group("patchup")
    pu.add_argument("--patchup-layers", type=lambda t: tuple(n for n in t.split(",") if n), default=d.patchup.layers,
                    help="module names of PatchUp layers 1, 2, ... (layer 0 = input space); default: "
                         f"{','.join(d.patchup.layers)} (after the stem conv, after the first residual stage)")
    pu.add_argument("--patchup-loss", default=d.patchup.loss, choices=["bce", "ce"],
                    help="bce: the official BCE on softmax (default); ce: cross-entropy with the same weighting")
    sc = parser.add_argument_group("scoring samplers")
    sc.add_argument("--delta-k", type=int, default=d.loss_delta.k,
                    help=f"loss-delta: candidate batches scored per step (default: {d.loss_delta.k})")
    sc.add_argument("--delta-relative", action="store_true", help="loss-delta: score the relative loss drop")
    sc.add_argument("--order", default=d.loss_order.order, choices=["ascending", "descending"],
                    help=f"loss-order: hand out low- or high-loss samples first (default: {d.loss_order.order})")
    rep = parser.add_argument_group("replication, invariance and saliency")
    rep.add_argument("--replicas", type=int, default=d.replication.replicas,
                     help=f"copies per seed (m) of the replicate/invariance/saliency recipes (default: {d.replication.replicas}); "
                          "batches hold batch-size/m seeds so a step sees batch-size rows")
    rep.add_argument("--inv-layers", type=lambda t: tuple(n for n in t.split(",") if n), default=d.invariance.layers,
                     help=f"module names of the invariance loss, shallow to deep (default: {','.join(d.invariance.layers)})")
    rep.add_argument("--inv-alpha", type=float, default=d.invariance.alpha,
                     help="invariance share alpha of (1 - alpha) * task + sum_l alpha_l * L_inv^l "
                          f"(default: {d.invariance.alpha})")
    rep.add_argument("--inv-ratio", type=float, default=d.invariance.ratio,
                     help=f"alpha_last / alpha_first across the invariance layers (default: {d.invariance.ratio})")
    rep.add_argument("--sal-weight", type=float, default=d.saliency.weight,
                     help=f"weight of the saliency consistency term (default: {d.saliency.weight})")
    sg = parser.add_argument_group("sign")
    sg.add_argument("--sign-iters", type=int_list, default=d.sign.iters,
                    help=f"SIGN iteration counts K added to the training set (default: {','.join(map(str, d.sign.iters))})")
    sg.add_argument("--sign-eta", type=float, default=d.sign.eta, help=f"SIGN step size (default: {d.sign.eta})")
    sg.add_argument("--sign-layer", default=d.sign.layer,
                    help="module whose output SIGN differentiates (default: the model's features(), the pooled "
                         "vector before the classifier)")
    sg.add_argument("--sign-teacher", default=d.sign.teacher,
                    help="checkpoint of the teacher (default: train the baseline first with the same settings)")
    box = parser.add_argument_group("cutmix, cutout and mixup")
    box.add_argument("--cutmix-alpha", type=float, default=d.cutmix.alpha,
                     help=f"cutmix: lam ~ Beta(alpha, alpha) sets the pasted box's area (default: {d.cutmix.alpha})")
    box.add_argument("--cutmix-prob", type=float, default=d.cutmix.prob,
                     help=f"cutmix: chance a batch is mixed (default: {d.cutmix.prob}; the authors' CIFAR runs: 0.5)")
    box.add_argument("--cutout-length", type=int, default=d.cutout.length,
                     help=f"cutout: side of the square hole in pixels (default: {d.cutout.length}, CIFAR-10's)")
    box.add_argument("--mixup-alpha", type=float, default=d.mixup.alpha,
                     help=f"mixup: lam ~ Beta(alpha, alpha) (default: {d.mixup.alpha})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(args: argparse.Namespace, **overrides: object) -> TrainConfig:
    """The :class:`TrainConfig` of parsed options (``overrides`` replace run-level fields)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    per_class = args.samples_per_class
    if per_class is None:  # the small-data default, off for data streamed from disk
        per_class = None if parse_data_spec(args.dataset) is not None else _DEFAULTS.samples_per_class
    values.update(
        samples_per_class=per_class or None,
        bn_recalibration=not args.no_bn_recalibration,
        progress=not args.no_progress,
        sum=SumConfig(k=args.k, mode=args.mix_mode),
        cascade=CascadeConfig(stages=args.stages, patience=args.patience, stop_at=args.stop_at, mode=args.mix_mode),
        gradual=GradualConfig(k0=args.k0, fine_tune_frac=args.fine_tune_frac, mode=args.mix_mode),
        patchup=PatchUpConfig(layers=args.patchup_layers, loss=args.patchup_loss),
        loss_delta=LossDeltaConfig(k=args.delta_k, relative=args.delta_relative),
        loss_order=LossOrderConfig(order=args.order),
        replication=ReplicationConfig(replicas=args.replicas),
        invariance=InvarianceConfig(layers=args.inv_layers, alpha=args.inv_alpha, ratio=args.inv_ratio),
        saliency=SaliencyConfig(weight=args.sal_weight),
        sign=SignConfig(iters=args.sign_iters, eta=args.sign_eta, layer=args.sign_layer, teacher=args.sign_teacher),
        cutmix=CutMixConfig(alpha=args.cutmix_alpha, prob=args.cutmix_prob),
        cutout=CutOutConfig(length=args.cutout_length),
        mixup=MixUpConfig(alpha=args.mixup_alpha),
    )
    values.update(overrides)
    return TrainConfig(**values)
