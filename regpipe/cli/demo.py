"""``regpipe demo`` (``make demo``): the baseline and one regpipe method trained side by side on the same budget,
then compared on clean accuracy and on one robustness column, with a plain verdict and a picture.

The default pair shows the claim the papers' table (``benchmarks/RESULTS.md``) supports most strongly: the
invariance recipe (Hernández-García et al., 2019: ``m`` augmented copies of each seed and the invariance
loss) is far more robust to FGSM than the baseline (52.0 % against 9.6 % at 100 epochs, mostly from its
augmented copies), with a clean accuracy that needs the long budget to catch up. The demo trains both
with the same optimizer steps and images seen (replication draws ``batch / m`` seeds per step), runs
``compare``'s machinery (``OUT/compare.json``, ``compare.md``), attacks both checkpoints with FGSM as
``regpipe eval`` does, says which model is ahead on each column, and draws ``OUT/demo.png``: both test-accuracy
curves and both models' clean and FGSM accuracy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.cli.compare import evaluation_columns
from regpipe.cli.report import compare, plot_curves
from regpipe.core.files import atomic_write
from regpipe.core.optional import require
from regpipe.engine.algorithms import build_algorithms, parse_recipe
from regpipe.engine.config import SMALL_DATA_PER_CLASS, TrainConfig
from regpipe.engine.config_checks import check_config
from regpipe.engine.robustness import EvalSettings

__all__ = ["DEMO_EPOCHS", "DEMO_METHOD", "plot_demo", "register", "run", "verdict"]

#: The method the demo sets against the baseline, and the epochs both train (measured: see run()'s notes).
DEMO_METHOD = "invariance"
DEMO_EPOCHS = 15
#: The robustness column: FGSM at 8/255 on the first test images (the clean column reads the whole test set).
ROBUSTNESS = "fgsm"
#: Points of accuracy below which a difference is called a tie (the seed-to-seed spread of these runs is 1-4).
TIE_POINTS = 1.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="baseline vs a regpipe method on the same budget: clean and FGSM accuracy",
                       description="Train the baseline and one regpipe method (default: invariance) side by side "
                                   "on the same budget, attack both with FGSM, print which is ahead on clean and "
                                   "on FGSM accuracy, and write OUT/compare.png with both test-accuracy curves.")
    p.add_argument("--method", default=DEMO_METHOD,
                   help=f"the recipe set against the baseline (default: {DEMO_METHOD})")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help=f"epochs of both runs (default: {DEMO_EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default: 0)")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--eval-limit", type=int, default=2000, metavar="N",
                   help="FGSM attacks the first N test images (default: 2000)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the Fashion-MNIST idx .gz files (default: $REGPIPE_DATA_DIR or "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--samples-per-class", type=int, default=SMALL_DATA_PER_CLASS,
                   help=f"training images per class, 0: every image (default: {SMALL_DATA_PER_CLASS})")
    p.add_argument("--val-per-class", type=int, default=TrainConfig.val_per_class,
                   help=f"held-out validation images per class (default: {TrainConfig.val_per_class})")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help=f"rows per optimizer step (default: {TrainConfig.batch_size})")
    p.add_argument("--device", default="auto", help="auto (CUDA if present, default), cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _configs(args: argparse.Namespace) -> dict[str, list[TrainConfig]]:
    """One run per recipe, same settings and seed; each keeps its checkpoint for the attack."""
    parse_recipe(args.method)
    if args.method == "baseline":
        raise ValueError("--method baseline: the demo sets a regpipe method against the baseline; name another recipe")
    configs = {}
    for recipe in ("baseline", args.method):
        folder = Path(args.out) / recipe / f"seed{args.seed}"
        # the per-epoch curve reads 1000 test images (a seeded draw); the final accuracy reads all of them
        cfg = TrainConfig(recipe=recipe, epochs=args.epochs, seed=args.seed, out=str(folder),
                          checkpoint_out=str(folder / "model.pt"), data_dir=args.data_dir,
                          samples_per_class=args.samples_per_class, val_per_class=args.val_per_class,
                          batch_size=args.batch_size, device=args.device, progress=not args.no_progress,
                          eval_subset=1000)
        check_config(cfg)  # settings that cannot run (together) are named before anything trains, as in compare
        configs[recipe] = [cfg]
    return configs


def _ahead(column: str, base: float, method: float, name: str) -> str:
    """One verdict line: which run is ahead on ``column`` (accuracies in 0..1), by how many points."""
    diff = 100 * (method - base)
    values = f"{name} {100 * method:.1f} % vs baseline {100 * base:.1f} %"
    if abs(diff) < TIE_POINTS:
        return f"{column}: no clear difference ({values}, {diff:+.1f} points)"
    leader = name if diff > 0 else "baseline"
    return f"{column}: {leader} is ahead ({values}, {diff:+.1f} points)"


def verdict(rows: Sequence[Mapping[str, Any]], column: str = ROBUSTNESS, replicates: bool = True) -> list[str]:
    """The plain verdict of ``compare``'s summary rows (baseline first, then the method): who is ahead on
    clean test accuracy and on the ``column`` accuracy, and what that does and does not show.

    Args:
        rows: ``compare.json``'s ``summary``.
        column: the robustness column.
        replicates: the method trains on augmented copies (replication), which the table credits with
            most of the robustness.

    Raises:
        ValueError: the rows are not the baseline and one method, or lack the ``column`` evaluation.
    """
    if len(rows) != 2 or rows[0]["recipe"] != "baseline" or column not in rows[1].get("eval", {}):
        raise ValueError(f"the demo compares the baseline with one method on {column!r}; got "
                         f"{[r.get('recipe') for r in rows]}")
    base, method = rows
    name = method["recipe"]
    clean = _ahead("clean test accuracy", base["mean_test_accuracy"], method["mean_test_accuracy"], name)
    robust_base, robust = base["eval"][column]["mean"], method["eval"][column]["mean"]
    attack = _ahead(f"{column.upper()} 8/255 accuracy", robust_base, robust, name)
    gain = 100 * (robust - robust_base)
    source = " (benchmarks/RESULTS.md credits its augmented copies with most of it)" if replicates else ""
    if gain >= TIE_POINTS:
        claim = (f"the robustness claim shows here: {name} withstands {column.upper()} better than the baseline "
                 f"on the same budget{source}")
    else:
        claim = (f"at this budget {name} shows no {column.upper()} gain over the baseline: the robustness claim "
                 "does not show here")
    lines = [clean, attack, claim]
    if method["mean_test_accuracy"] < base["mean_test_accuracy"] - TIE_POINTS / 100:
        lines.append(f"{name} trails on clean accuracy at this short budget")
    lines.append("one seed, a short budget: benchmarks/RESULTS.md has 3 seeds at 100 epochs")
    return lines


def plot_demo(runs: Mapping[str, Sequence[Mapping[str, Any]]], rows: Sequence[Mapping[str, Any]], title: str,
              path: Path) -> Path:
    """The demo's picture: both runs' test accuracy per epoch (left), and their final clean and
    :data:`ROBUSTNESS` accuracies side by side (right)."""
    require("matplotlib", needed_by="the demo's picture").use("Agg")
    import matplotlib.pyplot as plt
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    plot_curves(curves, runs)
    curves.set_title("test accuracy per epoch")
    columns = [("clean", lambda r: r["mean_test_accuracy"]),
               (f"{ROBUSTNESS.upper()} 8/255", lambda r: r["eval"][ROBUSTNESS]["mean"])]
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [100 * read(row) for _, read in columns]
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(columns))]
        drawn = bars.bar(xs, values, width, label=row["recipe"], color=f"C{i}")
        bars.bar_label(drawn, fmt="%.1f %%", fontsize=8)
    bars.set_xticks(range(len(columns)), [name for name, _ in columns])
    bars.set_ylabel("test accuracy (%)")
    bars.set_ylim(0, 100)
    bars.set_title("final model")
    bars.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    settings = EvalSettings(attacks=(ROBUSTNESS,), seed=0, limit=args.eval_limit)  # a bad limit is named here
    configs = _configs(args)
    out = Path(args.out)
    # trained afresh every time (a demo of training); compare.png holds both test-accuracy curves
    table = compare(configs, out, reuse=False, evaluate=evaluation_columns(settings, args.device))
    written = json.loads((out / "compare.json").read_text())
    rows = written["summary"]
    replicates = any(alg.name == "replicate" for alg in build_algorithms(configs[args.method][0]))
    title = f"regpipe demo: {' vs '.join(configs)}, {args.epochs} epochs each, seed {args.seed}"
    picture = atomic_write(out / "demo.png", lambda tmp: plot_demo(written["runs"], rows, title, tmp))
    print(f"{title}\n")
    print(table)
    print("\n" + "\n".join(f"- {line}" for line in verdict(rows, ROBUSTNESS, replicates)))
    print(f"\npicture (both runs' test accuracy per epoch, and their clean and FGSM accuracy): {picture}")
    return 0
