"""``regpipe compare``: several recipes on the same seeds, one table of mean ± std test error."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from regpipe.cli.eval import number
from regpipe.cli.launch import JobsFailed, LauncherName, check_launcher_options, launch
from regpipe.cli.report import check_compare_outputs, compare
from regpipe.cli.settings import parse_command
from regpipe.engine.algorithms import RECIPE_WORDS, parse_recipe
from regpipe.engine.config import TrainConfig
from regpipe.engine.config_checks import check_config
from regpipe.engine.distributed import resolve_device
from regpipe.engine.robustness import EvalSettings, evaluate_run
from regpipe.functional.attacks import ATTACKS

#: What ``--eval`` may add as columns: an attack's accuracy, or the mean over the deformed test sets.
EVAL_COLUMNS = (*ATTACKS, "deformed")

__all__ = ["CompareOptions", "DESCRIPTION", "compare_command", "evaluation_columns", "register", "run"]

DESCRIPTION = ("Run recipes on the same seeds, every run with the same settings (flags or --config FILE.yaml, "
               "e.g. a run's OUT/config.yaml; its recipe and seed give the defaults of --recipes and "
               "--first-seed); write OUT/RECIPE/seedS/ per run, OUT/compare.json, OUT/compare.md (mean ± std test "
               f"error) and OUT/compare.png. Recipe words: {', '.join(sorted(RECIPE_WORDS))}.")


def _fraction(tokens: list[str]) -> float:
    try:
        return number(tokens[0])
    except argparse.ArgumentTypeError as err:  # tyro reports ValueErrors as bad values of the flag
        raise ValueError(str(err)) from err


#: A float flag that also reads fractions such as 8/255.
Fraction = Annotated[float, tyro.constructors.PrimitiveConstructorSpec(
    nargs=1, metavar="NUMBER", instance_from_str=_fraction, is_instance=lambda value: isinstance(value, float),
    str_from_instance=lambda value: [repr(value)])]


@dataclass(frozen=True)
class CompareOptions:
    """The options of ``regpipe compare`` besides the runs' settings (``--print-config`` prints them after those).

    Attributes:
        recipes: comma-separated recipes, each '+'-joined algorithms (None: baseline and the settings' recipe,
            so baseline,gradual by default).
        seeds: number of seeds: each recipe is trained once per seed.
        first_seed: the seeds are first-seed, first-seed+1, ... (None: the settings' seed).
        rerun: train every run again (default: reuse the runs in OUT finished with the same settings).
        eval: also evaluate every trained model (as `regpipe eval`) and add accuracy columns: comma-separated
            attacks (fgsm, bim, mim, pgd...) and deformed, the mean over the 8 deformed test sets of PatchUp
            appendix F; each run then keeps its checkpoint, OUT/RECIPE/seedS/model.pt.
        eval_eps: the --eval attacks' budget in pixel units (a number or a fraction such as 8/255).
        eval_steps: iterations of the --eval attacks BIM, MIM and PGD.
        eval_limit: --eval reads the first N test images only (None: all); the clean test error column always
            reads the whole test split.
        launcher: inline: train every run in this process, one after another; local: each run in its own
            process on this machine, --jobs at a time; submitit: each run a Slurm job (submitit; local
            subprocesses where Slurm is absent). Results land in --out either way, and a rerun trains only what
            has not finished.
        jobs: runs at a time: local processes, or the Slurm job array's parallelism.
        slurm_partition: submitit: the Slurm partition.
        slurm_gpus: submitit: GPUs per job (None: 0).
        slurm_time: submitit: time limit per job in minutes (None: 240).
        slurm_cpus: submitit: CPUs per job (None: Slurm's default).
        slurm_mem_gb: submitit: memory per job in GB (None: Slurm's default).
        slurm_cluster: submitit: where the jobs run (None or auto: Slurm when sbatch is found, else local
            subprocesses).
    """

    recipes: str | None = None
    seeds: int = 3
    first_seed: int | None = None
    rerun: bool = False
    eval: str = ""
    eval_eps: Fraction = 8 / 255
    eval_steps: int = 10
    eval_limit: int | None = None
    launcher: LauncherName = "inline"
    jobs: int = 1
    slurm_partition: str | None = None
    slurm_gpus: int | None = None
    slurm_time: int | None = None
    slurm_cpus: int | None = None
    slurm_mem_gb: int | None = None
    slurm_cluster: Literal["auto", "slurm", "local"] | None = None


def register(sub: argparse._SubParsersAction) -> None:
    # As `train`: the options are parsed by tyro (regpipe.cli.settings) from the config dataclasses and
    # CompareOptions; this parser only names the command.
    p = sub.add_parser("compare", help="run several recipes on the same seeds and tabulate test error",
                       add_help=False, description=DESCRIPTION)
    p.set_defaults(func=run, settings_command=True)


def run(args: argparse.Namespace) -> int:
    return compare_command(args.settings_argv)


def _eval_settings(options: CompareOptions) -> EvalSettings | None:
    """The ``--eval`` columns as :class:`EvalSettings` (``None`` without ``--eval``); unknown columns are named."""
    columns = [c.strip().lower() for c in options.eval.split(",") if c.strip()]
    unknown = [c for c in columns if c not in EVAL_COLUMNS]
    if unknown:
        raise ValueError(f"--eval: unknown column(s) {unknown}; choose from {', '.join(EVAL_COLUMNS)}")
    if not columns:
        return None
    if options.eval_limit is not None and options.eval_limit < 2:
        raise ValueError(f"--eval-limit must be an integer >= 2, got {options.eval_limit}")
    return EvalSettings(attacks=tuple(c for c in ATTACKS if c in columns), eps=options.eval_eps,
                        steps=options.eval_steps, deformed="deformed" in columns, seed=0, limit=options.eval_limit)


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


def _recipes(options: CompareOptions, cfg: TrainConfig) -> list[str]:
    """``--recipes`` as a list (default: baseline and the settings' recipe); refused when empty or repeated, or
    when a word is unknown."""
    text = options.recipes if options.recipes is not None else \
        ",".join(dict.fromkeys(["baseline", cfg.recipe]))  # just baseline when the recipe is the baseline
    recipes = [r for r in text.split(",") if r]
    if not recipes:
        raise ValueError(f"--recipes names no recipe: {text!r}")
    for recipe in recipes:
        parse_recipe(recipe)  # an unknown word is named before anything trains
    repeated = sorted({r for r in recipes if recipes.count(r) > 1})
    if repeated:
        raise ValueError(f"--recipes names {repeated} more than once")
    return recipes


def compare_command(argv: Sequence[str]) -> int:
    """``regpipe compare ARGV``: parse, then print the settings (``--print-config``) or train and tabulate."""
    command = parse_command(argv, prog="regpipe compare", description=DESCRIPTION, out="runs/compare",
                            options_type=CompareOptions)
    cfg, options = command.train_config(), command.options
    if command.print_config:
        print(command.print_settings(), end="")
        return 0
    recipes = _recipes(options, cfg)
    if options.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {options.seeds}")
    if cfg.resume:
        raise ValueError("compare does not take --resume: it reuses the finished runs in --out and trains the rest "
                         "(--rerun trains them all again)")
    if cfg.checkpoint_out is not None:
        raise ValueError(f"compare trains many runs, which cannot share --checkpoint-out {cfg.checkpoint_out}: "
                         "leave it unset (--eval keeps each run's model in OUT/RECIPE/seedS/model.pt)")
    settings = _eval_settings(options)
    first = options.first_seed if options.first_seed is not None else cfg.seed
    seeds = [first + s for s in range(options.seeds)]
    out = Path(cfg.out if cfg.out is not None else "runs/compare")

    def run_config(r: str, s: int) -> TrainConfig:
        folder = out / r / f"seed{s}"
        keep = {"checkpoint_out": str(folder / "model.pt")} if settings is not None else {}
        return replace(cfg, recipe=r, seed=s, out=str(folder), **keep)

    configs = {r: [run_config(r, s) for s in seeds] for r in recipes}
    for cfgs in configs.values():  # settings that cannot run (together) fail before any recipe trains
        for run_cfg in cfgs:
            check_config(run_cfg)
    # the launcher reads its options, and where the runs go and are evaluated
    launch_args = SimpleNamespace(**asdict(options), out=str(out), device=cfg.device)
    check_launcher_options(launch_args)
    check_compare_outputs(configs, out)  # before any job starts
    evaluate = None if settings is None else evaluation_columns(settings, cfg.device)
    try:
        launched = launch(launch_args, configs, settings)
    except JobsFailed as err:
        print(f"regpipe compare: {err}", file=sys.stderr)
        return 1
    # a launcher's runs are finished in OUT now (--rerun trained them again): compare reads them back
    print(compare(configs, out, reuse=not options.rerun or launched > 0, evaluate=evaluate))
    return 0
