"""``regpipe sign``: transform a dataset with SIGN and write resumable ``.npz`` shards (and FFCV ``.beton``)."""

from __future__ import annotations

import argparse

from regpipe.engine.sign_dataset import generate, rank_device

__all__ = ["register", "run"]


def int_list(text: str) -> tuple[int, ...]:
    """``50,100`` -> ``(50, 100)``."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sign", help="transform a dataset with SIGN and write .npz shards (resumable)",
                       description="Transform a dataset split with the model of a `regpipe train "
                                   "--checkpoint-out` checkpoint (SIGN) and write OUT/shard-*.npz "
                                   "(images_kK float in the 0..1 pixel scale, labels, indices) and "
                                   "OUT/manifest.json; FFCV .beton files too when ffcv is installed. "
                                   "Finished shards are skipped on a rerun; under torchrun each rank "
                                   "transforms its own shards.")
    _add_sign_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    """The options of ``regpipe sign``."""
    p.add_argument("--checkpoint", required=True, help="model checkpoint (regpipe train --checkpoint-out)")
    p.add_argument("--out", required=True, help="output directory (shards, manifest)")
    p.add_argument("--iters", type=int_list, default=(50, 100), help="iteration counts K to write (default: 50,100)")
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
