"""Tables and plots of training runs (``regpipe train`` summary, ``regpipe compare``)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from regpipe.core.files import atomic_write
from regpipe.core.optional import require
from regpipe.engine.train import write_json
from regpipe.engine.validate import check_output_path, check_run_outputs, read_json

__all__ = ["check_compare_outputs", "compare", "epoch_table", "finished_run", "markdown_table", "plot_compare",
           "plot_curves", "summarize"]


def epoch_table(metrics: Mapping[str, Any]) -> str:
    """A fixed-width table of a run's epochs: loss, test accuracy (``-`` where ``--eval-every`` skipped the
    evaluation), images/s and the recipe's state."""
    rows = metrics["epochs"]
    extra = sorted({k for r in rows for k in r} - {"epoch", "train_loss", "test_accuracy", "images_per_s", "lr"})
    head = ["epoch", "train_loss", "test_acc", "img/s", *extra]
    lines = ["  ".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = [f"{r['epoch']:>10d}", f"{r['train_loss']:>10.4f}", f"{r['test_accuracy']:>10.4f}" if "test_accuracy" in r else f"{'-':>10}",
                 f"{r['images_per_s']:>10.0f}"] + [_cell(r.get(k, "")) for k in extra]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:>10.4g}" if isinstance(value, float) else f"{value!s:>10}"


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]],
              evaluations: Mapping[str, Sequence[Mapping[str, float]]] | None = None) -> list[dict[str, Any]]:
    """Per recipe: mean and sample std of the final test error over seeds (std 0 for one seed); with
    ``evaluations`` (recipe -> one ``{column: accuracy}`` per seed, ``compare --eval``), each column's
    accuracies, mean and std under ``"eval"``."""
    rows = []
    for recipe, metrics in runs.items():
        errors = [1.0 - m["test_accuracy"] for m in metrics]
        rows.append({"recipe": recipe, "seeds": [m["seed"] for m in metrics], "test_errors": errors,
                     "mean_test_error": statistics.fmean(errors),
                     "std_test_error": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                     "mean_test_accuracy": 1.0 - statistics.fmean(errors)})
        if all("optimizer_steps" in m and "images_seen" in m for m in metrics):  # runs made before budgets: none
            rows[-1]["mean_optimizer_steps"] = statistics.fmean(m["optimizer_steps"] for m in metrics)
            rows[-1]["mean_images_seen"] = statistics.fmean(m["images_seen"] for m in metrics)
        if evaluations is not None:
            per_seed = evaluations[recipe]
            rows[-1]["eval"] = {column: {"accuracies": [e[column] for e in per_seed],
                                         "mean": statistics.fmean(e[column] for e in per_seed),
                                         "std": statistics.stdev([e[column] for e in per_seed]) if len(per_seed) > 1
                                         else 0.0}
                                for column in per_seed[0]}
    return rows


def _budget(row: Mapping[str, Any]) -> str:
    if "mean_optimizer_steps" not in row:
        return "-"
    return f"{row['mean_optimizer_steps']:,.0f} steps, {row['mean_images_seen']:,.0f} images"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The compare table: per recipe the test error and accuracy, the budget of a run (optimizer steps and
    training images seen, mean over the seeds) and the ``compare --eval`` columns."""
    columns = list(rows[0].get("eval", {})) if rows else []  # compare --eval: accuracy columns
    lines = ["| recipe | seeds | test error (mean ± std) | test accuracy (mean) | budget per run (mean) |"
             + "".join(f" {c} accuracy (mean ± std) |" for c in columns),
             "|---|---|---|---|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['recipe']} | {len(r['seeds'])} | {100 * r['mean_test_error']:.2f} ± "
                     f"{100 * r['std_test_error']:.2f} % | {100 * r['mean_test_accuracy']:.2f} % | {_budget(r)} |"
                     + "".join(f" {100 * r['eval'][c]['mean']:.2f} ± {100 * r['eval'][c]['std']:.2f} % |"
                               for c in columns))
    return "\n".join(lines)


def plot_compare(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Mean test accuracy per evaluated epoch for each recipe (min-max band over seeds), saved as PNG."""
    require("matplotlib", needed_by="the compare plot").use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_curves(ax, runs)
    ax.set_title("regpipe compare (mean over seeds, band = min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(ax: Any, runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Draw each recipe's mean test accuracy per evaluated epoch (min-max band over seeds) on a matplotlib axis."""
    for recipe, metrics in runs.items():
        # the epochs every seed evaluated (--eval-every skips some; a cascade may stop a seed early)
        by_epoch = [{e["epoch"]: e["test_accuracy"] for e in m["epochs"] if "test_accuracy" in e} for m in metrics]
        epochs = sorted(set.intersection(*(set(b) for b in by_epoch)))
        curves = [[b[epoch] for epoch in epochs] for b in by_epoch]
        length = len(epochs)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        ax.plot(epochs, mean, label=recipe)
        ax.fill_between(epochs, [min(c[i] for c in curves) for i in range(length)],
                        [max(c[i] for c in curves) for i in range(length)], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend()


def finished_run(cfg: Any) -> dict[str, Any] | None:
    """The metrics of a finished run of exactly ``cfg`` in ``cfg.out``, or ``None``.

    A run counts when its ``metrics.json`` records the same settings (the progress bar aside); a
    setting added to regpipe after the run was made must be at its default. This makes ``regpipe
    compare`` resumable: an interrupted comparison re-runs only what is missing.
    """
    from dataclasses import asdict, fields

    path = Path(cfg.out) / "metrics.json" if cfg.out is not None else None
    if path is None or not path.exists():
        return None
    metrics = read_json(path, "metrics of a finished run")
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config"), dict):
        raise ValueError(f"{path} is not the metrics.json of a regpipe run (no 'config'); delete it or pass --rerun")
    stored = metrics["config"]
    current = json.loads(json.dumps(asdict(cfg)))
    defaults = json.loads(json.dumps(asdict(type(cfg)())))
    for f in fields(cfg):
        if f.name in ("progress", "out"):
            continue
        expected = stored[f.name] if f.name in stored else defaults[f.name]
        if current[f.name] != expected:
            return None
    return metrics


def check_compare_outputs(configs: Mapping[str, Sequence[Any]], out: Path) -> None:
    """Refuse, before any run trains, an ``--out`` that is a file and run outputs that cannot be written (named)."""
    check_output_path("--out", out, "dir")
    for cfgs in configs.values():
        for cfg in cfgs:
            check_run_outputs(cfg.out, cfg.checkpoint_out)


def compare(configs: Mapping[str, Sequence[Any]], out: Path, reuse: bool = True,
            evaluate: Callable[[Any], Mapping[str, float]] | None = None) -> str:
    """Train every config (recipe -> one config per seed), write compare.json/.md/.png; return the table.

    With ``reuse``, runs already finished with the same settings (see :func:`finished_run`) are read
    back instead of trained again. With ``evaluate`` (``compare --eval``), each trained run's
    ``{column: accuracy}`` becomes a column of the table (mean ± std over the seeds).
    """
    from regpipe.engine.train import train  # looked up at call time (tests replace it)

    check_compare_outputs(configs, out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {recipe: [] for recipe in configs}
    evaluations: dict[str, list[dict[str, float]]] | None = None if evaluate is None else {r: [] for r in configs}
    for recipe, cfgs in configs.items():
        for cfg in cfgs:
            runs[recipe].append((reuse and finished_run(cfg)) or train(cfg))
            if evaluations is not None:  # right after its training, so an interruption keeps what was evaluated
                evaluations[recipe].append(dict(evaluate(cfg)))
    rows = summarize(runs, evaluations)
    table = markdown_table(rows)
    first = next(iter(configs.values()))[0]
    setting = (f"{first.dataset}, samples per class: {first.samples_per_class or 'all'}, epochs: {first.epochs}, "
               f"model: {first.model}, batch size: {first.batch_size}")
    write_json(out / "compare.json", {"setting": setting, "summary": rows, "runs": runs})
    atomic_write(out / "compare.md", lambda tmp: tmp.write_text(f"# regpipe compare\n\n{setting}\n\n{table}\n"))
    atomic_write(out / "compare.png", lambda tmp: plot_compare(runs, tmp))
    return f"{setting}\n\n{table}\n\nwritten: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}"
