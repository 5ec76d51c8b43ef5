"""``regpipe train``: train one recipe on one seed, write ``OUT/metrics.json``, print the epoch table."""

from __future__ import annotations

import argparse
from pathlib import Path

from regpipe.cli.options import add_train_options, build_config
from regpipe.cli.report import epoch_table
from regpipe.engine.train import train

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one recipe and write metrics.json (the main job)",
                       description="Train one recipe ('+'-joined algorithms) on one seed, evaluate every epoch, "
                                   "write OUT/metrics.json and print a summary table.")
    add_train_options(p, with_recipe=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    metrics = train(build_config(args))
    print(epoch_table(metrics))
    print(f"\nrecipe={metrics['recipe']} seed={metrics['seed']} final test accuracy "
          f"{metrics['test_accuracy']:.4f} ({metrics['train_seconds']:.0f} s on {metrics['device']}); "
          f"metrics in {Path(args.out) / 'metrics.json'}")
    return 0
