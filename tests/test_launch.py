"""``regpipe compare --launcher local|submitit`` (issue 22, part 4): each (recipe, seed) its own job, results in
one ``--out`` that compare's resume logic reads back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

import regpipe.cli.launch
import regpipe.engine.train
from regpipe.cli import main
from regpipe.engine.config import read_config
from regpipe.engine.train import train

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]


def sweep_args(fake_dir: Path, out: Path, recipes: str, seeds: int, *launcher: str) -> list[str]:
    return ["compare", "--recipes", recipes, "--seeds", str(seeds), "--data-dir", str(fake_dir), "--out", str(out),
            *TINY, *launcher]


def finished(out: Path) -> dict[str, float]:
    """``RECIPE/seedS`` -> the modification time of its metrics.json."""
    return {str(p.parent.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("*/seed*/metrics.json"))}


def test_submitit_local_executor_runs_each_recipe_and_seed_as_a_job_then_reuses_them(
        fake_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    argv = sweep_args(fake_dir, out, "baseline,sum", 2, "--launcher", "submitit", "--slurm-cluster", "local",
                      "--jobs", "2")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 of 4 runs to train with --launcher submitit" in printed and "submitted 4 job(s)" in printed
    assert sorted(finished(out)) == ["baseline/seed0", "baseline/seed1", "sum/seed0", "sum/seed1"]
    assert len(list((out / "slurm").glob("*/*_result.pkl"))) == 4  # each job's result and logs, from submitit
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [(row["recipe"], row["seeds"]) for row in summary] == [("baseline", [0, 1]), ("sum", [0, 1])]

    # a job trains what the same run trains in this process (the reference): same losses, same accuracy
    reference = train(replace(read_config(out / "sum" / "seed1" / "config.yaml"), out=None))
    job = json.loads((out / "sum" / "seed1" / "metrics.json").read_text())
    assert job["test_accuracy"] == reference["test_accuracy"]
    assert [e["train_loss"] for e in job["epochs"]] == [e["train_loss"] for e in reference["epochs"]]

    # the rerun reads everything back: no job is submitted, nothing is trained, nothing is rewritten
    before = finished(out)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was launched again")

    monkeypatch.setattr(regpipe.cli.launch, "executor", refuse)
    monkeypatch.setattr(regpipe.engine.train, "train", refuse)
    assert main(argv) == 0
    assert "0 of 4 runs to train" in capsys.readouterr().out
    assert finished(out) == before
    assert json.loads((out / "compare.json").read_text())["summary"] == summary


def test_local_processes_train_the_missing_runs_and_name_failed_jobs(
        fake_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "local"
    assert main(sweep_args(fake_dir, out, "baseline", 1)) == 0  # baseline seed 0 trained in this process
    first = finished(out)
    assert main(sweep_args(fake_dir, out, "baseline,gradual", 1, "--launcher", "local", "--jobs", "2")) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 runs to train with --launcher local" in printed and "gradual seed 0: test accuracy" in printed
    assert finished(out)["baseline/seed0"] == first["baseline/seed0"]  # reused, not trained again
    assert "gradual/seed0" in finished(out)

    # a job that fails (40 training rows cannot fill a batch of 64) is named; compare trains nothing in-process
    bad = sweep_args(fake_dir, tmp_path / "bad", "baseline,sum", 1, "--launcher", "local", "--jobs", "2")
    bad[bad.index("--batch-size") + 1] = "64"
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "2 of 2 jobs failed" in err and "baseline seed 0: ValueError" in err and "sum seed 0: ValueError" in err
    assert "exceeds the" in err
    assert not (tmp_path / "bad" / "compare.json").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--slurm-partition", "gpu"], "--slurm-partition only apply to --launcher submitit"),
    (["--launcher", "local", "--jobs", "0"], "--jobs must be >= 1, got 0"),
    (["--launcher", "submitit", "--slurm-time", "0"], "--slurm-time must be >= 1 minute"),
    (["--launcher", "submitit", "--slurm-gpus", "-1"], "--slurm-gpus must be >= 0"),
    (["--launcher", "submitit", "--slurm-cpus", "0"], "--slurm-cpus must be >= 1, got 0"),
    (["--launcher", "submitit", "--slurm-mem-gb", "0"], "--slurm-mem-gb must be >= 1, got 0"),
])
def test_bad_launcher_options_are_refused_before_any_work(extra: list[str], message: str, fake_dir: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(sweep_args(fake_dir, tmp_path / "x", "baseline", 1, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
