"""A run killed part-way and resumed with ``--resume`` ends with the uninterrupted run's metrics (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from imagefolder import write_image_folder
from regpipe.engine.config import GradualConfig, InvarianceConfig, SignConfig, SumConfig, TrainConfig
from regpipe.sampler.epoch_order import EpochPasses, ShuffledBatches
from regpipe.engine.train import train

TIMING = ("images_per_s",)


class Interrupted(Exception):
    """Stands for the kill: raised inside the loop after a number of steps."""


def _rows(metrics: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in metrics["epochs"]]


def _interrupted_then_resumed(cfg: TrainConfig, after_steps: int) -> dict:
    seen = {"n": 0}

    def kill(epoch: int, batch: object) -> None:
        seen["n"] += 1
        if seen["n"] == after_steps:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(cfg, observe=kill)
    assert (Path(cfg.out) / "state.pt").is_file()
    assert not (Path(cfg.out) / "metrics.json").exists()
    return train(replace(cfg, resume=True))


@pytest.mark.parametrize("recipe, after", [("baseline", 7), ("gradual", 8), ("invariance", 12), ("cascade", 6),
                                           ("loss-order", 7), ("loss-delta", 7), ("loss-delta", 9), ("saliency", 4),
                                           ("patchup-hard", 7), ("cutmix", 4), ("sign", 7), ("sum+saliency", 8)])
def test_resumed_run_equals_uninterrupted_run(recipe: str, after: int, fake_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(recipe=recipe, epochs=3, seed=4, samples_per_class=4, val_per_class=2, batch_size=8,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64, checkpoint_every=3,
                      gradual=GradualConfig(k0=2, fine_tune_frac=0.3), invariance=InvarianceConfig(layers=("layer1",)),
                      sign=SignConfig(iters=(2,)), sum=SumConfig(k=2))
    whole = train(replace(cfg, out=str(tmp_path / "whole")))
    resumed = _interrupted_then_resumed(replace(cfg, out=str(tmp_path / "resumed")), after)
    assert _rows(resumed) == _rows(whole)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert not (tmp_path / "resumed" / "state.pt").exists()


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
@pytest.mark.parametrize("after", [6, 10])  # inside epoch 2 (a state at step 1 of 5), at the start of epoch 3
def test_in_memory_resume_through_dali_and_ffcv(loader: str, after: int, fake_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[loader])
    cfg = TrainConfig(recipe="gradual", epochs=3, seed=2, samples_per_class=4, val_per_class=2, batch_size=8,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64, checkpoint_every=6,
                      loader=loader, gradual=GradualConfig(k0=2, fine_tune_frac=0.3))
    whole = train(replace(cfg, out=str(tmp_path / "whole")))
    resumed = _interrupted_then_resumed(replace(cfg, out=str(tmp_path / "resumed")), after)
    assert _rows(resumed) == _rows(whole)
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_resume_streams_the_same_crops(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", train_per_class=6, val_per_class=2)
    cfg = TrainConfig(recipe="sum", dataset=f"imagefolder:{root}", samples_per_class=None, epochs=2, seed=1,
                      batch_size=8, image_size=24, val_resize=28, workers=2, device="cpu", progress=False,
                      checkpoint_every=2)
    whole = train(replace(cfg, out=str(tmp_path / "whole")))
    resumed = _interrupted_then_resumed(replace(cfg, out=str(tmp_path / "resumed")), 5)
    assert _rows(resumed) == _rows(whole)


@pytest.mark.parametrize("index_field", [True, False])
def test_beton_resume_redraws_the_interrupted_epochs_crops(index_field: bool, tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    from regpipe.loaders.ffcv import write_image_folder as write_beton_folder

    root = write_image_folder(tmp_path / "data", train_per_class=6, val_per_class=2)
    train_beton, val_beton = (write_beton_folder(root / split, tmp_path / f"{split}.beton", max_resolution=128,
                                                 index_field=index_field)[0] for split in ("train", "val"))
    cfg = TrainConfig(recipe="baseline", dataset=f"beton:{train_beton},{val_beton}", samples_per_class=None, epochs=2,
                      seed=1, batch_size=8, image_size=24, val_resize=28, workers=1, device="cpu", progress=False,
                      checkpoint_every=2, loader="ffcv")
    whole = train(replace(cfg, out=str(tmp_path / "whole")))
    resumed = _interrupted_then_resumed(replace(cfg, out=str(tmp_path / "resumed")), 5)  # inside epoch 2
    assert _rows(resumed) == _rows(whole)
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_resume_refuses_other_settings(fake_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(recipe="baseline", epochs=2, samples_per_class=4, val_per_class=2, batch_size=8,
                      data_dir=str(fake_dir), device="cpu", progress=False, out=str(tmp_path / "run"))
    with pytest.raises(Interrupted):
        train(cfg, observe=lambda epoch, batch: (_ for _ in ()).throw(Interrupted()) if epoch == 1 else None)
    with pytest.raises(ValueError, match=r"other settings \(lr: saved 0.05, now 0.1\)"):
        train(replace(cfg, resume=True, lr=0.1))
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(replace(cfg, resume=True, out=str(tmp_path / "elsewhere")))


def test_epoch_passes_resume_inside_an_epoch_without_replaying_it() -> None:
    order = ShuffledBatches(20, batch_size=4, seed=0)
    whole = EpochPasses(order)
    passes = [list(whole) for _ in range(3)]
    assert passes[0] != passes[1]  # a fresh permutation each epoch
    resumed = EpochPasses(ShuffledBatches(20, batch_size=4, seed=0), start_epoch=1, skip=2)
    assert list(resumed) == passes[1][2:]
    assert list(resumed) == passes[2]  # and the passes after it follow
    # a loop-style permutation: every index once per epoch, drop_last
    assert sorted(i for b in passes[0] for i in b) == list(range(20))
    with pytest.raises(ValueError, match="skip=5 drops the whole epoch of 5 batches"):
        EpochPasses(order, skip=5)
    with pytest.raises(ValueError, match="cannot be replayed part-way"):
        EpochPasses([[0, 1], [2, 3]], skip=1)


@pytest.mark.slow
def test_sigkill_then_resume_from_the_command_line(fake_dir: Path, tmp_path: Path) -> None:
    """A real kill (SIGKILL, no cleanup) while the run is between checkpoints."""
    args = [sys.executable, "-m", "regpipe", "train", "--recipe", "gradual", "--data-dir", str(fake_dir),
            "--samples-per-class", "8", "--val-per-class", "2", "--batch-size", "8", "--epochs", "4", "--checkpoint-every", "2",
            "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "run")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "run" / "state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "run" / "metrics.json").exists():
        pytest.skip("the run finished before it could be killed")
    subprocess.run([*args, "--out", str(tmp_path / "run"), "--resume"], check=True, env=env, capture_output=True)
    whole, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "run"))
    assert _rows(resumed) == _rows(whole)


@pytest.mark.parametrize("after", [6, 12])
def test_resumed_plateau_run_equals_uninterrupted_run(after: int, fake_dir: Path, tmp_path: Path) -> None:
    # patience 1: every evaluation that does not beat the best halves the lr, so the lr changes in 4 epochs
    cfg = TrainConfig(recipe="sum", epochs=4, seed=4, samples_per_class=4, val_per_class=2, batch_size=8,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64, checkpoint_every=3,
                      schedule="plateau", plateau_factor=0.5, plateau_patience=1)
    whole = train(replace(cfg, out=str(tmp_path / "whole")))
    assert len({row["lr"] for row in whole["epochs"]}) > 1  # the schedule did reduce the lr
    resumed = _interrupted_then_resumed(replace(cfg, out=str(tmp_path / "resumed")), after)
    assert _rows(resumed) == _rows(whole)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
