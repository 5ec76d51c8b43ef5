"""``regpipe compare``: several recipes on the same seeds, one table of mean ± std test error; each run in this
process, or as its own job (``--launcher local|submitit``, :mod:`regpipe.cli.launch`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from regpipe.cli.eval import number
from regpipe.cli.launch import JobsFailed, add_launcher_options, check_launcher_options, launch
from regpipe.cli.options import add_train_options, build_config
from regpipe.cli.report import check_compare_outputs, compare
from regpipe.engine.algorithms import build_algorithms, parse_recipe
from regpipe.engine.distributed import resolve_device
from regpipe.engine.robustness import EvalSettings, evaluate_run
from regpipe.functional.attacks import ATTACKS

#: What ``--eval`` may add as columns: an attack's accuracy, or the mean over the deformed test sets.
EVAL_COLUMNS = (*ATTACKS, "deformed")

__all__ = ["evaluation_columns", "register", "run"]


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
    p.add_argument("--eval", default="", metavar="COLUMNS",
                   help=f"also evaluate every trained model (as `regpipe eval`) and add accuracy columns: "
                        f"comma-separated from {','.join(EVAL_COLUMNS)} (deformed: the mean over the 8 deformed "
                        "test sets of PatchUp appendix F); each run then keeps its checkpoint, OUT/RECIPE/seedS/model.pt")
    p.add_argument("--eval-eps", type=number, default=8 / 255, help="--eval attacks' budget in pixel units (default: 8/255)")
    p.add_argument("--eval-steps", type=int, default=10, help="--eval iterations of BIM/MIM/PGD (default: 10)")
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="--eval reads the first N test images only (default: all); the clean test error "
                        "column always reads the whole test split")
    add_train_options(p, with_recipe=False)
    add_launcher_options(p)
    p.set_defaults(func=run)


def _eval_settings(args: argparse.Namespace) -> EvalSettings | None:
    """The ``--eval`` columns as :class:`EvalSettings` (``None`` without ``--eval``); unknown columns are named."""
    columns = [c.strip().lower() for c in args.eval.split(",") if c.strip()]
    unknown = [c for c in columns if c not in EVAL_COLUMNS]
    if unknown:
        raise ValueError(f"--eval: unknown column(s) {unknown}; choose from {', '.join(EVAL_COLUMNS)}")
    if not columns:
        return None
    if args.eval_limit is not None and args.eval_limit < 2:
        raise ValueError(f"--eval-limit must be an integer >= 2, got {args.eval_limit}")
    return EvalSettings(attacks=tuple(c for c in ATTACKS if c in columns), eps=args.eval_eps, steps=args.eval_steps,
                        deformed="deformed" in columns, seed=0, limit=args.eval_limit)


def evaluation_columns(settings: EvalSettings, device: str) -> Callable[[Any], dict[str, float]]:
    """``cfg -> {column: accuracy}`` of a finished run's checkpoint, as ``regpipe eval`` (cached in
    ``cfg.out/eval.json``)."""
    def evaluate(cfg: Any) -> dict[str, float]:
        result = evaluate_run(cfg, settings, resolve_device(device))  # kept in cfg.out/eval.json
        columns = {name: rec["accuracy"] for name, rec in result["attacks"].items()}
        if settings.deformed:
            columns["deformed"] = result["deformed_mean"]
        return columns
    return evaluate


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
    settings = _eval_settings(args)
    check_launcher_options(args)
    seeds = [args.first_seed + s for s in range(args.seeds)]

    def run_config(r: str, s: int) -> Any:
        folder = Path(args.out) / r / f"seed{s}"
        keep = {"checkpoint_out": str(folder / "model.pt")} if settings is not None else {}
        return build_config(args, recipe=r, seed=s, out=str(folder), **keep)

    configs = {r: [run_config(r, s) for s in seeds] for r in recipes}
    for cfgs in configs.values():  # a recipe whose algorithms cannot run together fails before any recipe trains
        for cfg in cfgs:
            build_algorithms(cfg)
    check_compare_outputs(configs, Path(args.out))  # before any job starts
    evaluate = None if settings is None else evaluation_columns(settings, args.device)
    try:
        launched = launch(args, configs, settings)
    except JobsFailed as err:
        print(f"regpipe compare: {err}", file=sys.stderr)
        return 1
    # a launcher's runs are finished in OUT now (--rerun trained them again): compare reads them back
    print(compare(configs, Path(args.out), reuse=not args.rerun or launched > 0, evaluate=evaluate))
    return 0
