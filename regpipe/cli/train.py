"""``regpipe train``: train one recipe on one seed, write ``OUT/metrics.json``, print the epoch table."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from regpipe.cli.report import epoch_table
from regpipe.cli.settings import Command, NoOptions, parse_command
from regpipe.engine.algorithms import RECIPE_WORDS
from regpipe.engine.config import TrainConfig
from regpipe.engine.train import train

__all__ = ["DESCRIPTION", "parse_train", "register", "run", "train_command"]

DESCRIPTION = ("Train one recipe ('+'-joined algorithms) on one seed, evaluate every epoch, write OUT/metrics.json "
               "and OUT/config.yaml (its settings: `regpipe train --config OUT/config.yaml --out NEW` repeats the "
               f"run) and print a summary table. Recipe words: {', '.join(sorted(RECIPE_WORDS))}.")


def register(sub: argparse._SubParsersAction) -> None:
    # The options are parsed by tyro from the config dataclasses (regpipe.cli.settings): this parser only
    # names the command and hands every argument after it to `run`.
    p = sub.add_parser("train", help="train one recipe and write metrics.json (the main job)", add_help=False,
                       description=DESCRIPTION)
    p.set_defaults(func=run, settings_command=True)


def run(args: argparse.Namespace) -> int:
    return train_command(args.settings_argv)


def _parse(argv: Sequence[str]) -> Command[NoOptions]:
    return parse_command(argv, prog="regpipe train", description=DESCRIPTION, out="runs/train")


def parse_train(argv: Sequence[str]) -> TrainConfig:
    """The :class:`TrainConfig` of ``regpipe train ARGV`` (the arguments after ``train``), e.g. for a script
    that calls :func:`~regpipe.engine.train.train` itself."""
    return _parse(argv).train_config()


def train_command(argv: Sequence[str]) -> int:
    """``regpipe train ARGV``: parse, then print the settings (``--print-config``) or train."""
    command = _parse(argv)
    cfg = command.train_config()
    if command.print_config:
        print(command.print_settings(), end="")
        return 0
    metrics = train(cfg)
    print(epoch_table(metrics))
    print(f"\nrecipe={metrics['recipe']} seed={metrics['seed']} final test accuracy "
          f"{metrics['test_accuracy']:.4f} ({metrics['train_seconds']:.0f} s on {metrics['device']}); "
          + (f"metrics in {Path(cfg.out) / 'metrics.json'}" if cfg.out is not None else "--out None: nothing written"))
    return 0
