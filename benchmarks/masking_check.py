"""Gradient-masking check of a robustness column of ``regpipe compare --eval``: for one seed, each model's
white-box PGD accuracy with 10 steps, with 50 steps and restarts, and the accuracy of a model on the
PGD-10 examples crafted on the other model (transfer). A defence that only masks gradients loses more to
the stronger attack and to transferred examples than to its own PGD-10; a robust one does not.

    .venv/bin/python benchmarks/masking_check.py --runs runs/fmnist100 --models baseline,saliency --seed 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from regpipe.engine.checkpoint import Checkpoint, load_checkpoint
from regpipe.engine.data import load_dataset
from regpipe.functional.attacks import iterative_attack, pixel_eps, valid_range
from regpipe.functional.normalize import normalize


def _normalised(ck: Checkpoint, pixels: torch.Tensor) -> torch.Tensor:
    return normalize(pixels, torch.tensor(ck.mean), torch.tensor(ck.std))


def _accuracy(ck: Checkpoint, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((ck.model.eval()(_normalised(ck, pixels)).argmax(1) == labels).float().mean())


def pgd_pixels(ck: Checkpoint, pixels: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
               generator: torch.Generator, chunk: int = 250) -> torch.Tensor:
    """PGD (random start, step 2.5 eps / steps) on ``ck``'s model in its normalised space; 0..1 pixels back."""
    model, std = ck.model.eval(), torch.tensor(ck.std).view(1, -1, 1, 1)
    lower, upper = valid_range(ck.mean, ck.std, "cpu")
    x = _normalised(ck, pixels)
    adv = torch.cat([iterative_attack(model, x[s:s + chunk], labels[s:s + chunk], pixel_eps(eps, ck.std, "cpu"),
                                      steps, pixel_eps(2.5 * eps / steps, ck.std, "cpu"), lower=lower, upper=upper,
                                      random_start=True, generator=generator) for s in range(0, len(x), chunk)])
    return adv * std + torch.tensor(ck.mean).view(1, -1, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="a compare --eval output folder (RECIPE/seedS/model.pt)")
    parser.add_argument("--models", default="baseline,saliency", help="two recipes (default: baseline,saliency)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=500, help="first N test images (default: 500)")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--restarts", type=int, default=2, help="restarts of the 50-step PGD (default: 2)")
    args = parser.parse_args()
    names = args.models.split(",")
    if len(names) != 2:
        raise SystemExit(f"--models names two recipes, got {names}")
    paths = {n: Path(args.runs) / n / f"seed{args.seed}" / "model.pt" for n in names}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"no checkpoint at {missing} (run compare with --eval, which keeps them)")
    models = {n: load_checkpoint(p, device="cpu") for n, p in paths.items()}
    cfg = models[names[0]].config  # the training config the checkpoint keeps
    test = load_dataset(cfg.get("dataset", "fashion-mnist"), "test", data_dir=cfg.get("data_dir"),
                        shape=cfg.get("shape", "cifar"))
    pixels, labels = test.images[:args.limit].float() / 255, test.labels[:args.limit]
    for name, other in (names, names[::-1]):
        ck = models[name]
        pgd10 = pgd_pixels(ck, pixels, labels, args.eps, 10, torch.Generator().manual_seed(0))
        still_right = torch.ones(len(labels), dtype=torch.bool)
        for r in range(args.restarts):
            adv = pgd_pixels(ck, pixels, labels, args.eps, 50, torch.Generator().manual_seed(1 + r))
            with torch.no_grad():
                still_right &= ck.model(_normalised(ck, adv)).argmax(1) == labels
        print(f"seed {args.seed} {name:<10} clean {_accuracy(ck, pixels, labels):.3f}  PGD-10 "
              f"{_accuracy(ck, pgd10, labels):.3f}  PGD-50 x{args.restarts} restarts {float(still_right.float().mean()):.3f}"
              f"  {other} on these PGD-10 examples {_accuracy(models[other], pgd10, labels):.3f}", flush=True)


if __name__ == "__main__":
    main()
