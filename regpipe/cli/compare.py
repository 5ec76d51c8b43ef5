"""``regpipe compare``: several recipes on the same seeds, one table of mean ± std test error."""

from __future__ import annotations

import argparse
from pathlib import Path

from regpipe.cli.options import add_train_options, build_config
from regpipe.cli.report import compare
from regpipe.engine.algorithms import parse_recipe

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run several recipes on the same seeds and tabulate test error",
                       description="Run recipes on the same seeds; write OUT/compare.json, OUT/compare.md "
                                   "(mean ± std test error) and OUT/compare.png.")
    p.add_argument("--recipes", default="baseline,gradual",
                   help="comma-separated recipes, each '+'-joined algorithms (default: baseline,gradual)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, ... (default: 0)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p.add_argument("--rerun", action="store_true",
                   help="train every run again (default: reuse runs in OUT finished with the same settings)")
    add_train_options(p, with_recipe=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipes = [r for r in args.recipes.split(",") if r]
    if not recipes:
        raise ValueError(f"--recipes names no recipe: {args.recipes!r}")
    for recipe in recipes:
        parse_recipe(recipe)  # an unknown word is named before anything trains
    repeated = sorted({r for r in recipes if recipes.count(r) > 1})
    if repeated:
        raise ValueError(f"--recipes names {repeated} more than once")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    seeds = [args.first_seed + s for s in range(args.seeds)]
    configs = {r: [build_config(args, recipe=r, seed=s, out=str(Path(args.out) / r / f"seed{s}")) for s in seeds]
               for r in recipes}
    print(compare(configs, Path(args.out), reuse=not args.rerun))
    return 0
