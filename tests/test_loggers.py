"""``--logger tensorboard`` and ``--logger wandb``: each epoch row of metrics.json, read back with the tools' own readers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from regpipe.cli import main
from regpipe.engine.config import TrainConfig
from regpipe.engine.loggers import check_logger, epoch_scalars

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "2", "--no-progress"]
#: Keys every row of a gradual+invariance run holds besides the algorithms' (lr, images/s, accuracies...).
STATE_KEYS = {"t", "m", "mean_invariance"}


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["epochs"]


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in ``log_dir``, by tag: ``[(step, value), ...]`` (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_each_epoch_row(fake_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(["train", "--recipe", "gradual+invariance", "--replicas", "2", "--logger", "tensorboard",
                 "--data-dir", str(fake_dir), "--out", str(out), *TINY]) == 0
    rows = _rows(out)
    scalars = _scalars(out)
    expected = {key for row in rows for key in epoch_scalars(row)}
    assert set(scalars) == expected
    assert STATE_KEYS | {"train_loss", "test_accuracy", "lr", "images_per_s"} <= expected
    for key, points in scalars.items():
        logged = [(row["epoch"], row[key]) for row in rows if key in row]
        assert [step for step, _ in points] == [step for step, _ in logged] == [1, 2]
        assert [value for _, value in points] == pytest.approx([value for _, value in logged], rel=1e-6), key


def test_a_run_trained_again_into_its_folder_replaces_its_curves(fake_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    rows = []
    for lr in ("0.1", "0.02"):
        assert main(["train", "--recipe", "baseline", "--lr", lr, "--logger", "tensorboard", "--data-dir",
                     str(fake_dir), "--out", str(out), *TINY]) == 0
        rows.append([(row["epoch"], row["lr"]) for row in _rows(out)])
    assert len(list(out.glob("events.out.tfevents.*"))) == 2 and rows[0] != rows[1]
    logged = _scalars(out)["lr"]
    assert [step for step, _ in logged] == [step for step, _ in rows[1]]
    assert [value for _, value in logged] == pytest.approx([value for _, value in rows[1]], rel=1e-6)


def test_compare_logs_each_run_under_its_name(fake_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "baseline,sum", "--seeds", "1", "--logger", "tensorboard", "--data-dir",
                 str(fake_dir), "--out", str(out), *TINY]) == 0
    runs = EventMultiplexer().AddRunsFromDirectory(str(out))
    runs.Reload()
    assert sorted(runs.Runs()) == ["baseline/seed0", "sum/seed0"]
    for name in runs.Runs():
        losses = [(e.step, e.value) for e in runs.Scalars(name, "train_loss")]
        expected = [(row["epoch"], row["train_loss"]) for row in _rows(out / name)]
        assert [s for s, _ in losses] == [s for s, _ in expected]
        assert [v for _, v in losses] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_wandb_offline_logs_each_epoch_row(fake_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run stays under OUT/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[dict, int]] = []
    original = wandb.Run.log

    def spy(run: object, data: dict, step: int | None = None, **kwargs: object) -> None:
        logged.append((dict(data), step))
        original(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", spy)
    out = tmp_path / "run"
    assert main(["train", "--recipe", "gradual", "--logger", "wandb", "--data-dir", str(fake_dir), "--out", str(out),
                 *TINY]) == 0
    rows = _rows(out)
    assert logged == [({"epoch": row["epoch"], **epoch_scalars(row)}, row["epoch"]) for row in rows]
    assert "t" in logged[0][0] and "test_accuracy" in logged[0][0]
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1 and run_files[0].stat().st_size > 0


def test_a_logger_that_cannot_run_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="train.logger='wandb' writes under train.out"):
        check_logger(TrainConfig(logger="wandb"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ImportError, match=r"--logger wandb needs 'wandb', which is not installed: pip install 'regpipe\[wandb\]'"):
        check_logger(TrainConfig(logger="wandb", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_epoch_scalars_are_the_rows_numbers() -> None:
    row = {"epoch": 3, "train_loss": 0.5, "steps": 5, "k": 2, "order": "descending", "sign_iters": "2,3",
           "flag": True}
    assert epoch_scalars(row) == {"train_loss": 0.5, "steps": 5.0, "k": 2.0}
