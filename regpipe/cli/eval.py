"""``regpipe eval``: what a trained model withstands on the test split (attacks, deformed sets, TTA)."""

from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction
from pathlib import Path

from regpipe.engine.checkpoint import load_checkpoint
from regpipe.engine.data import load_dataset
from regpipe.engine.distributed import resolve_device
from regpipe.engine.robustness import DEFORMATIONS, EvalSettings, evaluate_checkpoint
from regpipe.engine.splits import parse_data_spec
from regpipe.engine.train import write_json
from regpipe.engine.validate import check_output_path
from regpipe.functional.attacks import ATTACKS

__all__ = ["attack_list", "number", "register", "run"]


def number(text: str) -> float:
    """A number or a fraction (``8/255``) -> float."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as err:
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from err
    return value


def attack_list(text: str) -> tuple[str, ...]:
    """``fgsm,pgd`` -> ``("fgsm", "pgd")``; ``none`` or empty -> ``()``."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(a.strip().lower() for a in text.split(",") if a.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="accuracy of a checkpoint under attacks, on deformed test sets, and with TTA",
        description="Evaluate a `regpipe train --checkpoint-out` checkpoint on its test split: clean accuracy, "
                    "FGSM/BIM/MIM/PGD (L-inf, in the normalised input space, every iterate clipped to the eps-ball "
                    "and to the valid pixel range), the deformed test sets of PatchUp appendix F (--deformed), "
                    "and test-time sum augmentation clean and under the same attacks seeing the whole ensemble "
                    "(--tta M; expectation over transformation).")
    p.add_argument("--checkpoint", required=True, help="model checkpoint (regpipe train --checkpoint-out)")
    p.add_argument("--attacks", type=attack_list, default=ATTACKS,
                   help=f"comma-separated attacks from {','.join(ATTACKS)}, or none (default: all)")
    p.add_argument("--eps", type=number, default=8 / 255,
                   help="L-inf budget; a number or fraction (default: 8/255, in pixel units, see --eps-space)")
    p.add_argument("--eps-space", default="pixel", choices=["pixel", "normalized"],
                   help="pixel: eps and step in 0..1 pixel units, divided by each channel's std (default); "
                        "normalized: used as they are in the model's normalised input space")
    p.add_argument("--steps", type=int, default=10, help="iterations of BIM, MIM and PGD (default: 10)")
    p.add_argument("--step-size", type=number, default=None,
                   help="step of BIM/MIM/PGD in the units of eps (default: eps/steps for BIM and MIM, "
                        "2.5*eps/steps for PGD)")
    p.add_argument("--momentum", type=float, default=1.0, help="MIM's decay mu (default: 1.0, the paper's)")
    p.add_argument("--deformed", action="store_true",
                   help=f"also the deformed test sets: {', '.join(d.name for d in DEFORMATIONS)}")
    p.add_argument("--tta", type=int, default=0, metavar="M",
                   help="also test-time sum augmentation (k=2) over M draws, clean and under the attacks "
                        "(each gradient averaged over M fresh draws); default: 0 = off")
    p.add_argument("--data", "--dataset", dest="dataset", default=None,
                   help="in-memory dataset spec as in `regpipe train` (default: the checkpoint's)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the checkpoint's)")
    p.add_argument("--shape", default=None, choices=["cifar", "native"], help="default: the checkpoint's")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N test images only (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of PGD's random start and the TTA partners (default: 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, default), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE (JSON)")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> EvalSettings:
    if not math.isfinite(args.eps) or args.eps < 0:
        raise ValueError(f"--eps must be a finite number >= 0, got {args.eps}")
    return EvalSettings(attacks=args.attacks, eps=args.eps, steps=args.steps, step_size=args.step_size,
                        momentum=args.momentum, eps_space=args.eps_space, deformed=args.deformed,
                        tta_draws=args.tta, seed=args.seed, batch_size=args.batch_size, limit=args.limit)


def _table(result: dict) -> str:
    lines = [f"clean accuracy: {result['clean_accuracy']:.4f}  ({result['test_rows']} test images)"]
    for name, rec in result["attacks"].items():
        lines.append(f"{name:>5}: {rec['accuracy']:.4f}  (eps {rec['eps']:.4g} {rec['eps_space']}, "
                     f"{rec['steps']} step(s) of {rec['step_size']:.4g})")
    for name, rec in result.get("deformed", {}).items():
        lines.append(f"deformed {name:>13}: {rec['accuracy']:.4f}{'' if rec['paper'] else '  (not in the paper)'}")
    if "deformed_mean" in result:
        lines.append(f"deformed mean (PatchUp appendix F sets): {result['deformed_mean']:.4f}")
    if "tta" in result:
        tta = result["tta"]
        lines.append(f"tta (k={tta['k']}, {tta['draws']} draws) clean: {tta['clean_accuracy']:.4f}")
        for name, rec in tta["attacks"].items():
            lines.append(f"tta {name:>5} (EOT over {rec['eot_draws']} draws): {rec['accuracy']:.4f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)  # every bad value is named before the checkpoint is read
    if args.json is not None:
        check_output_path("--json", args.json, "file")
    if args.dataset is not None and parse_data_spec(args.dataset) is not None:
        raise ValueError(f"--data {args.dataset!r}: regpipe eval reads in-memory datasets (fashion-mnist, npz:, "
                         "folder:); streamed imagefolder:/beton: test sets are not supported yet")
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    cfg = ckpt.config
    dataset = args.dataset or cfg.get("dataset", "fashion-mnist")
    if parse_data_spec(dataset) is not None:
        raise ValueError(f"the checkpoint was trained on {dataset!r}, streamed from disk; regpipe eval reads "
                         "in-memory datasets only: pass --data with its test split as npz: or folder:")
    test = load_dataset(dataset, "test", data_dir=args.data_dir or cfg.get("data_dir"),
                        shape=args.shape or cfg.get("shape", "cifar"))
    result = evaluate_checkpoint(ckpt, test, settings, device)
    result = {"checkpoint": str(Path(args.checkpoint)), "model": ckpt.model_name, "dataset": dataset, **result}
    print(_table(result))
    if args.json is not None:
        write_json(Path(args.json), json.loads(json.dumps(result)))
        print(f"written: {args.json}")
    return 0
