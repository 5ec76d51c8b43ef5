"""The ``regpipe`` command: ``train`` (the main job), ``compare`` and ``show``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from regpipe.recipes import RECIPES
from regpipe.show import SHOWABLE
from regpipe.train import TrainConfig

__all__ = ["main", "build_parser"]

_DEFAULTS = TrainConfig()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _float_triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from err
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _add_train_options(parser: argparse.ArgumentParser, with_recipe: bool) -> None:
    d = _DEFAULTS
    if with_recipe:
        parser.add_argument("--recipe", default=d.recipe, choices=sorted(RECIPES),
                            help=f"what to train with (default: {d.recipe})")
        parser.add_argument("--seed", type=int, default=d.seed, help="seed of data subset, init, order and ops")
        parser.add_argument("--out", default="runs/train", help="output directory for metrics.json (default: runs/train)")
        parser.add_argument("--checkpoint-out", default=None,
                            help="also save the trained model here (a checkpoint `regpipe sign` reads)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=d.dataset,
                      help="fashion-mnist (default) | npz:DIR (train.npz, test.npz) | npz:TRAIN.npz,TEST.npz | "
                           "folder:ROOT (ROOT/train, ROOT/test: a sub-folder per class)")
    data.add_argument("--data-dir", default=d.data_dir,
                      help="folder with the Fashion-MNIST idx .gz files (default: $REGPIPE_DATA_DIR or "
                           "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)")
    data.add_argument("--shape", default=d.shape, choices=["cifar", "native"],
                      help="cifar: 3x32x32 (pad + repeat channel, default); native: as stored (1x28x28)")
    data.add_argument("--samples-per-class", type=int, default=d.samples_per_class,
                      help=f"stratified, seeded training subset (default: {d.samples_per_class}; 0 = all)")
    data.add_argument("--val-per-class", type=int, default=d.val_per_class,
                      help=f"held-out validation samples per class, for cascade decisions (default: {d.val_per_class})")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"epoch budget (default: {d.epochs})")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help=f"loader batch size (default: {d.batch_size})")
    opt.add_argument("--lr", type=float, default=d.lr, help=f"SGD-Nesterov learning rate, cosine decay (default: {d.lr})")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    opt.add_argument("--loss", default=d.loss, choices=["ce", "bce"],
                     help="ce: soft-target cross-entropy (default); bce: the Sum Augmentation paper's multi-hot BCE")
    opt.add_argument("--model", default=d.model,
                     help="preact-small (default), preact-resnet18, or package.module:factory "
                          "(called with num_classes=, in_channels=)")
    opt.add_argument("--device", default=d.device, help="auto (CUDA if present, default), cpu, cuda, cuda:1, ...")
    opt.add_argument("--channels-last", action="store_true", help="channels_last inputs and model")
    opt.add_argument("--loader", default=d.loader, choices=["torch", "dali", "ffcv"],
                     help="training data loader: torch DataLoader (default), NVIDIA DALI or FFCV (the dali/ffcv "
                          "extras); all read the same batches and run the recipe's ops on the device")
    mix = parser.add_argument_group("sum augmentation")
    mix.add_argument("--k", type=int, default=d.k, help=f"sum groups of the 'sum' recipe (default: {d.k})")
    mix.add_argument("--k0", type=int, default=d.k0, help=f"starting inputs of the 'gradual' recipe (default: {d.k0})")
    mix.add_argument("--mix-mode", default=d.mix_mode, choices=["group", "permute"],
                     help="group: N rows -> N/k mixed rows (the thesis's, default); permute: keep N rows")
    mix.add_argument("--fine-tune-frac", type=float, default=d.fine_tune_frac,
                     help=f"share of the epochs trained clean after the gradual phase (default: {d.fine_tune_frac})")
    mix.add_argument("--stages", type=_int_list, default=d.stages,
                     help=f"cascade stages, decreasing k (default: {','.join(map(str, d.stages))})")
    mix.add_argument("--patience", type=int, default=d.patience,
                     help=f"cascade: evaluations without improvement before the next stage (default: {d.patience})")
    mix.add_argument("--stop-at", type=int, default=d.stop_at,
                     help="cascade: last k (2 skips the clean fine-tune, for test-time sum augmentation)")
    mix.add_argument("--no-bn-recalibration", action="store_true",
                     help="evaluate mixed phases with the BN statistics as trained (default: re-estimate on clean batches)")
    mix.add_argument("--tta-draws", type=int, default=d.tta_draws,
                     help="also report test accuracy with test-time sum augmentation (k=2) over this many draws")
    pu = parser.add_argument_group("patchup")
    pu.add_argument("--patchup-layers", type=lambda t: tuple(n for n in t.split(",") if n), default=d.patchup_layers,
                    help="module names of PatchUp layers 1, 2, ... (layer 0 = input space); default: "
                         f"{','.join(d.patchup_layers)} (after the stem conv, after the first residual stage)")
    pu.add_argument("--patchup-loss", default=d.patchup_loss, choices=["bce", "ce"],
                    help="bce: the official BCE on softmax (default); ce: cross-entropy with the same weighting")
    sc = parser.add_argument_group("scoring samplers")
    sc.add_argument("--delta-k", type=int, default=d.delta_k,
                    help=f"loss-delta: candidate batches scored per step (default: {d.delta_k})")
    sc.add_argument("--delta-relative", action="store_true", help="loss-delta: score the relative loss drop")
    sc.add_argument("--order", default=d.order, choices=["ascending", "descending"],
                    help=f"loss-order: hand out low- or high-loss samples first (default: {d.order})")
    rep = parser.add_argument_group("replication, invariance and saliency")
    rep.add_argument("--replicas", type=int, default=d.replicas,
                     help=f"copies per seed (m) of the replicate/invariance/saliency recipes (default: {d.replicas}); "
                          "batches hold batch-size/m seeds so a step sees batch-size rows")
    rep.add_argument("--inv-layers", type=lambda t: tuple(n for n in t.split(",") if n), default=d.inv_layers,
                     help=f"module names of the invariance loss, shallow to deep (default: {','.join(d.inv_layers)})")
    rep.add_argument("--inv-alpha", type=float, default=d.inv_alpha,
                     help=f"invariance share of the 'invariance' objective (default: {d.inv_alpha})")
    rep.add_argument("--inv-ratio", type=float, default=d.inv_ratio,
                     help=f"alpha_last / alpha_first across the invariance layers (default: {d.inv_ratio})")
    rep.add_argument("--loss-weights", type=_float_triple, default=d.loss_weights,
                     help="alpha,beta,gamma of class + invariance + saliency (default: 1,1,1; "
                          "the 'saliency' recipe ignores beta)")
    sg = parser.add_argument_group("sign")
    sg.add_argument("--sign-iters", type=_int_list, default=d.sign_iters,
                    help=f"SIGN iteration counts K added to the training set (default: {','.join(map(str, d.sign_iters))})")
    sg.add_argument("--sign-eta", type=float, default=d.sign_eta, help=f"SIGN step size (default: {d.sign_eta})")
    sg.add_argument("--sign-layer", default=d.sign_layer,
                    help="module whose output SIGN differentiates (default: the model's features(), the pooled "
                         "vector before the classifier)")
    sg.add_argument("--sign-teacher", default=d.sign_teacher,
                    help="checkpoint of the teacher (default: train the baseline first with the same settings)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, **overrides: object) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["samples_per_class"] = args.samples_per_class or None
    values["bn_recalibration"] = not args.no_bn_recalibration
    values["progress"] = not args.no_progress
    values.update(overrides)
    return TrainConfig(**values)


def _cmd_train(args: argparse.Namespace) -> int:
    from regpipe.train import train
    from regpipe.report import epoch_table

    metrics = train(_config(args))
    print(epoch_table(metrics))
    print(f"\nrecipe={metrics['recipe']} seed={metrics['seed']} final test accuracy "
          f"{metrics['test_accuracy']:.4f} ({metrics['train_seconds']:.0f} s on {metrics['device']}); "
          f"metrics in {Path(args.out) / 'metrics.json'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from regpipe.report import compare

    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown or not recipes:
        raise SystemExit(f"regpipe compare: unknown recipe(s) {unknown or args.recipes!r}; choose from {sorted(RECIPES)}")
    if args.seeds < 1:
        raise SystemExit(f"regpipe compare: --seeds must be >= 1, got {args.seeds}")
    configs = {r: [_config(args, recipe=r, seed=args.first_seed + s, out=str(Path(args.out) / r / f"seed{args.first_seed + s}"))
                   for s in range(args.seeds)] for r in recipes}
    table = compare(configs, Path(args.out), reuse=not args.rerun)
    print(table)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from regpipe.show import show

    path = show(args.what, Path(args.out), data_dir=args.data_dir, seed=args.seed, checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    from regpipe.sign_offline import generate, rank_device

    report = generate(args.checkpoint, args.out, iters=args.iters, dataset=args.dataset, data_dir=args.data_dir,
                      shape=args.shape, split=args.split, samples_per_class=args.samples_per_class or None,
                      seed=args.seed, eta=args.eta, at=args.at, clamp=args.clamp, layer=args.layer, model=args.model,
                      shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype,
                      device=rank_device(args.device), progress=not args.no_progress)
    print(f"rank {report['rank']}/{report['world_size']}: wrote {len(report['written'])} shard(s), skipped "
          f"{len(report['skipped'])} finished, of {report['num_shards']}; output in {report['out']}"
          + (f"; FFCV: {', '.join(report['beton'])}" if report["beton"] else ""))
    return 0


def _add_sign_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model checkpoint (regpipe train --checkpoint-out)")
    p.add_argument("--out", required=True, help="output directory (shards, manifest)")
    p.add_argument("--iters", type=_int_list, default=(50, 100), help="iteration counts K to write (default: 50,100)")
    p.add_argument("--eta", type=float, default=1.0, help="step size (default: 1, the paper's)")
    p.add_argument("--at", default="current", choices=["current", "input"],
                   help="delta at the current iterate (default) or at the input (Algorithm 1 as printed)")
    p.add_argument("--clamp", action="store_true", help="project every iterate onto the valid pixel range [0, 1]")
    p.add_argument("--layer", default=None, help="module to differentiate (default: the model's features())")
    p.add_argument("--model", default=None, help="architecture the checkpoint must hold (checked; default: any)")
    p.add_argument("--dataset", default=None, help="dataset spec as in `regpipe train` (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (see `regpipe train --help`)")
    p.add_argument("--shape", default=None, choices=["cifar", "native"], help="default: the checkpoint's")
    p.add_argument("--split", default="train", choices=["train", "test"], help="(default: train)")
    p.add_argument("--samples-per-class", type=int, default=0, help="stratified subset (default: 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset draw")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (default: 1024)")
    p.add_argument("--batch-size", type=int, default=256, help="images transformed at once (default: 256)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype (default: float16)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present; cuda:LOCAL_RANK under torchrun), cpu, cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_bench(args: argparse.Namespace) -> int:
    from regpipe.bench import bench

    bench(args.device, json_path=args.json, quick=args.quick, repeats=args.repeats,
          progress=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regpipe",
        description="Batch-level regularizers for fast image loaders. Trains on Fashion-MNIST "
                    "(Debian's dataset-fashion-mnist) unless told otherwise.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser("train", help="train one recipe and write metrics.json (the main job)",
                             description="Train one recipe on one seed, evaluate every epoch, write OUT/metrics.json "
                                         "and print a summary table.")
    _add_train_options(p_train, with_recipe=True)
    p_train.set_defaults(func=_cmd_train)

    p_cmp = sub.add_parser("compare", help="run several recipes on the same seeds and tabulate test error",
                           description="Run recipes on the same seeds; write OUT/compare.json, OUT/compare.md "
                                       "(mean ± std test error) and OUT/compare.png.")
    p_cmp.add_argument("--recipes", default="baseline,gradual", help="comma-separated recipes (default: baseline,gradual)")
    p_cmp.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p_cmp.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ... (default: 0)")
    p_cmp.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p_cmp.add_argument("--rerun", action="store_true",
                       help="train every run again (default: reuse runs in OUT finished with the same settings)")
    _add_train_options(p_cmp, with_recipe=False)
    p_cmp.set_defaults(func=_cmd_compare)

    p_show = sub.add_parser("show", help="draw what an op does into a PNG",
                            description="sum: images mixed with k = 1, 2, 4, 8. gradual: mixes along t and the GCC "
                                        "coefficients against t. patchup: masks and mixed feature maps at the input, "
                                        "after the stem conv and after the first stage. replicate: seeds and their "
                                        "augmented copies. saliency: saliency maps of originals and copies, "
                                        "before and after the inverse warp. sign: inputs before and after SIGN "
                                        "(K = 50, 100) and the perturbation delta.")
    p_show.add_argument("what", choices=SHOWABLE, help="which op to draw")
    p_show.add_argument("--out", default=None, help="PNG path (default: regpipe-show-WHAT.png)")
    p_show.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (see `regpipe train --help`)")
    p_show.add_argument("--seed", type=int, default=0, help="which images are drawn")
    p_show.add_argument("--checkpoint", default=None,
                        help="sign: the trained model to transform with (default: a small model fitted on the spot)")
    p_show.set_defaults(func=_cmd_show)

    p_sign = sub.add_parser("sign", help="transform a dataset with SIGN and write .npz shards (resumable)",
                            description="Transform a dataset split with the model of a `regpipe train "
                                        "--checkpoint-out` checkpoint (SIGN, SPEC 5) and write OUT/shard-*.npz "
                                        "(images_kK float in the 0..1 pixel scale, labels, indices) and "
                                        "OUT/manifest.json; FFCV .beton files too when ffcv is installed. "
                                        "Finished shards are skipped on a rerun; under torchrun each rank "
                                        "transforms its own shards.")
    _add_sign_options(p_sign)
    p_sign.set_defaults(func=_cmd_sign)

    p_bench = sub.add_parser("bench", help="time regpipe's ops against the eager reference and the peers",
                             description="Time, side by side in one run, the fused uint8 -> normalised k-group mix, "
                                         "the k=2 mix against timm/torchvision/kornia MixUp, block masks against "
                                         "timm DropBlock2d, and recipe training steps against the plain step. "
                                         "Peers that are not installed are skipped with a note "
                                         "(`make bench-peers` installs them in their own environment).")
    p_bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (default: cpu)")
    p_bench.add_argument("--json", default=None, metavar="FILE", help="also write the rows (and the machine) to FILE")
    p_bench.add_argument("--quick", action="store_true", help="small shapes and 2 rounds: a smoke run, not numbers")
    p_bench.add_argument("--repeats", type=int, default=None,
                         help="interleaved rounds per group (default: 15, --quick: 2)")
    p_bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "show" and args.out is None:
        args.out = f"regpipe-show-{args.what}.png"
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"regpipe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
