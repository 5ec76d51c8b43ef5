"""End-to-end runs of the `regpipe` command on small data (one short epoch each)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from regpipe.cli import main
from regpipe.engine.data import FASHION_MNIST_DIR

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]



STATE_KEY = {"baseline": None, "sum": "k", "cascade": "k", "gradual": "t", "patchup-soft": "prob"}


@pytest.mark.parametrize("recipe", list(STATE_KEY))
def test_train_writes_metrics(recipe: str, fake_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / recipe
    assert main(["train", "--recipe", recipe, "--data-dir", str(fake_dir), "--out", str(out), *TINY,
                 "--epochs", "2", "--tta-draws", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == recipe and metrics["seed"] == 0
    assert metrics["algorithms"] == ([] if recipe == "baseline" else [recipe])
    assert metrics["train_samples"] == 40  # 4 per class, stratified
    assert 1 <= len(metrics["epochs"]) <= 2
    for row in metrics["epochs"]:
        assert row["steps"] == 5  # 40 samples, batch 8, drop_last
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        if STATE_KEY[recipe] is not None:
            assert STATE_KEY[recipe] in row  # the algorithm's state is logged every epoch
    # accuracies are counts over the 30 test images, not just numbers in [0, 1]
    for acc in (metrics["test_accuracy"], metrics["test_accuracy_tta"], *(r["test_accuracy"] for r in metrics["epochs"])):
        assert acc * 30 == pytest.approx(round(acc * 30))
    assert f"final test accuracy {metrics['test_accuracy']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["baseline", "sum"])
def test_final_accuracy_is_the_saved_models_accuracy(recipe: str, fake_dir: Path, tmp_path: Path) -> None:
    """The reported test accuracy is what the checkpoint scores when evaluated independently of the loop
    (``sum`` ends while mixing: the checkpoint keeps the BatchNorm statistics re-estimated on clean batches)."""
    from regpipe.engine.checkpoint import load_checkpoint
    from regpipe.engine.data import load_dataset
    from regpipe.functional.normalize import normalize

    out, ckpt_path = tmp_path / "run", tmp_path / "model.pt"
    assert main(["train", "--recipe", recipe, "--data-dir", str(fake_dir), "--out", str(out), *TINY,
                 "--checkpoint-out", str(ckpt_path)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ckpt = load_checkpoint(ckpt_path)
    test = load_dataset("fashion-mnist", "test", data_dir=str(fake_dir))
    x = normalize(test.images, torch.tensor(ckpt.mean), torch.tensor(ckpt.std))
    with torch.no_grad():
        correct = (ckpt.model.eval()(x).argmax(1) == test.labels).sum().item()
    assert metrics["test_accuracy"] == correct / len(test.labels)


def test_train_is_deterministic(fake_dir: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        main(["train", "--recipe", "gradual", "--data-dir", str(fake_dir), "--out", str(tmp_path / name), *TINY])
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        runs.append([(e["train_loss"], e["test_accuracy"]) for e in metrics["epochs"]])
    assert runs[0] == runs[1]


def test_compare_writes_table_json_and_plot(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "baseline,sum", "--seeds", "2", "--data-dir", str(fake_dir),
                 "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [r["recipe"] for r in summary] == ["baseline", "sum"]
    for row in summary:
        assert row["seeds"] == [0, 1] and len(row["test_errors"]) == 2
        assert row["mean_test_error"] == pytest.approx(sum(row["test_errors"]) / 2)
    table = (out / "compare.md").read_text()
    assert "| baseline | 2 |" in table and "±" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("what", ["sum", "gradual", "patchup"])
def test_show_draws_png(what: str, fake_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / f"{what}.png"
    assert main(["show", what, "--data-dir", str(fake_dir), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_gives_clear_errors(fake_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data-dir", str(tmp_path / "nowhere"), *TINY, "--out", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(fake_dir), "--model", "nope", *TINY, "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(fake_dir), "--samples-per-class", "50", "--epochs", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 2
    assert "class" in capsys.readouterr().err
    assert main(["compare", "--recipes", "baseline,bogus", "--data-dir", str(fake_dir)]) == 2
    assert "unknown recipe word(s) ['bogus']" in capsys.readouterr().err
    assert main(["compare", "--recipes", "baseline,baseline", "--data-dir", str(fake_dir)]) == 2
    assert "['baseline'] more than once" in capsys.readouterr().err
    assert main(["train", "--recipe", "bogus", "--data-dir", str(fake_dir), "--out", str(tmp_path)]) == 2
    assert "unknown recipe word(s) ['bogus']" in capsys.readouterr().err
    assert main(["train", "--recipe", "patchup-soft+saliency", "--data-dir", str(fake_dir), "--out", str(tmp_path)]) == 2
    assert "'saliency' needs the forward pass and loss that 'patchup-soft' takes over" in capsys.readouterr().err


def test_module_factory_model(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "factory"
    assert main(["train", "--recipe", "baseline", "--model", "regpipe.engine.models:preact_resnet_small",
                 "--data-dir", str(fake_dir), "--out", str(out), *TINY]) == 0
    assert (out / "metrics.json").exists()


def test_help_is_complete() -> None:
    for argv in ([], ["train"], ["compare"], ["show"]):
        result = subprocess.run([sys.executable, "-m", "regpipe", *argv, "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "usage: regpipe" in result.stdout
    train_help = subprocess.run([sys.executable, "-m", "regpipe", "train", "--help"], capture_output=True,
                                text=True).stdout
    for flag in ("--recipe", "--epochs", "--seed", "--samples-per-class", "--model", "--device", "--out"):
        assert flag in train_help


def test_version_is_pyprojects(capsys) -> None:
    """``regpipe --version`` prints the installed distribution's version, the one pyproject.toml declares."""
    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"regpipe {declared}"


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_command_waits_passively_in_openmp_unless_told(given: str | None) -> None:
    """What the console script imports (``regpipe.cli``) loads no torch, and ``main`` sets ``OMP_WAIT_POLICY=PASSIVE``
    before it does (torch's OpenMP reads it when it loads); a value the user gave is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys\nfrom regpipe.cli import main\nloaded = 'torch' in sys.modules\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(loaded, 'torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.split()[-3:] == ["False", "True", given or "PASSIVE"]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_train_on_real_fashion_mnist(tmp_path: Path) -> None:
    """The main job on the real embedded dataset, short: 20 samples per class, two epochs."""
    out = tmp_path / "real"
    assert main(["train", "--recipe", "gradual", "--samples-per-class", "20", "--val-per-class", "5",
                 "--epochs", "2", "--batch-size", "20", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_samples"] == 200
    # Clearly better than chance (0.10) on 10 classes after two epochs on 200 images (measured: 0.20).
    assert metrics["test_accuracy"] > 0.14


def test_compare_reuses_finished_runs(fake_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "resume"
    argv = ["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out", str(out), *TINY]
    assert main(argv) == 0
    first = json.loads((out / "compare.json").read_text())["summary"]

    import regpipe.engine.train

    def no_training(cfg):
        raise AssertionError(f"run {cfg.recipe}/{cfg.seed} was trained again")

    monkeypatch.setattr(regpipe.engine.train, "train", no_training)
    assert main(argv) == 0  # everything read back
    assert json.loads((out / "compare.json").read_text())["summary"] == first
    with pytest.raises(AssertionError, match="trained again"):
        main([*argv, "--lr", "0.01"])  # another setting: must train
    with pytest.raises(AssertionError, match="trained again"):
        main([*argv, "--rerun"])


@pytest.mark.parametrize("recipe", ["patchup-soft", "patchup-hard"])
def test_train_patchup_recipes(recipe: str, fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / recipe
    assert main(["train", "--recipe", recipe, "--data-dir", str(fake_dir), "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == recipe and metrics["epochs"][0]["train_loss"] > 0
    assert metrics["epochs"][0]["rows_per_step"] == 8 and 0 < metrics["epochs"][0]["prob"] <= 1


def test_patchup_layer_that_does_not_exist(fake_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--recipe", "patchup-soft", "--patchup-layers", "conv1,nope", "--data-dir", str(fake_dir),
                 "--out", str(tmp_path), *TINY]) == 2
    assert "no module named 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["loss-delta", "loss-delta-external", "loss-order"])
def test_train_scoring_sampler_recipes(recipe: str, fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / recipe
    assert main(["train", "--recipe", recipe, "--data-dir", str(fake_dir), "--out", str(out), *TINY,
                 "--delta-k", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["epochs"][0]
    assert metrics["recipe"] == recipe and row["train_loss"] > 0
    # 40 samples, batch 8, drop_last: 5 committed steps of 8 rows
    assert row["steps"] == 5 and row["rows_per_step"] == 8
    if recipe.startswith("loss-delta"):
        assert "mean_score" in row  # the chosen scores are logged


def test_compare_plateau_eval_every_and_budgets(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out", str(out),
                 *TINY, "--epochs", "3", "--schedule", "plateau", "--plateau-factor", "0.5", "--plateau-patience", "1",
                 "--eval-every", "2", "--eval-subset", "10"]) == 0
    saved = json.loads((out / "compare.json").read_text())
    run = saved["runs"]["baseline"][0]
    cfg = run["config"]
    assert (cfg["schedule"], cfg["plateau_factor"], cfg["plateau_patience"], cfg["eval_every"], cfg["eval_subset"]) \
        == ("plateau", 0.5, 1, 2, 10)
    assert [row["epoch"] for row in run["epochs"] if "test_accuracy" in row] == [2, 3]
    assert [row["epoch"] for row in run["epochs"] if "val_accuracy" in row] == [2, 3]
    steps = 40 // 8 * 3  # 4 samples per class, batch 8, 3 epochs
    assert run["optimizer_steps"] == steps and run["images_seen"] == steps * 8
    assert saved["summary"][0]["mean_optimizer_steps"] == steps
    assert f"| {steps} steps, {steps * 8} images |" in (out / "compare.md").read_text()
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("option, value, fragment", [
    ("--plateau-factor", "2", "factor must be a number in (0, 1), got 2.0"),
    ("--plateau-patience", "0", "patience must be an integer >= 1, got 0"),
    ("--eval-every", "0", "eval_every must be an integer >= 1, got 0"),
])
def test_bad_schedule_options_are_named(option: str, value: str, fragment: str, fake_dir: Path, tmp_path: Path,
                                        capsys) -> None:
    assert main(["train", "--data-dir", str(fake_dir), *TINY, "--out", str(tmp_path / "run"), "--schedule", "plateau",
                 option, value]) == 2
    assert fragment in capsys.readouterr().err
