"""The training loop's functions one at a time, on a run built from a config and a state made by hand:
``train_one_epoch`` trains exactly the epoch the state names (from its step), ``evaluate_epoch`` scores,
``close_epoch`` moves the state on; the state saves and loads whole."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from regpipe.core.checks import NonFiniteLoss
from regpipe.engine.algorithms import build_algorithms
from regpipe.engine.build import build_run
from regpipe.engine.config import TrainConfig
from regpipe.engine.distributed import DistInfo
from regpipe.engine.loop import close_epoch, evaluate_epoch, train_one_epoch, train_step
from regpipe.engine.state import EpochTotals, TrainState
from regpipe.engine.train import train
from regpipe.engine.loading import train_loader
from regpipe.sampler.epoch_order import EpochPasses, ShuffledBatches

BATCH, ROWS = 8, 40  # 4 samples per class of the fake 10-class set: 5 steps per epoch


def _config(fake_dir: Path, **changes: object) -> TrainConfig:
    return replace(TrainConfig(recipe="baseline", epochs=3, seed=5, samples_per_class=4, val_per_class=2,
                               batch_size=BATCH, data_dir=str(fake_dir), device="cpu", progress=False,
                               eval_batch_size=64), **changes)


def _build(cfg: TrainConfig, scratch: Path):
    return build_run(cfg, build_algorithms(cfg), torch.device("cpu"), DistInfo(), scratch, train)


def test_train_one_epoch_trains_the_epoch_a_hand_made_state_names(fake_dir: Path, tmp_path: Path) -> None:
    run, built = _build(_config(fake_dir), tmp_path)
    # a state made by hand: epoch 2 (0-based), 2 of its 5 steps taken, the totals of those two steps
    state = TrainState(model=built.model, optimizer=built.optimizer, scheduler=built.scheduler,
                       precision=built.precision, algorithms=built.algorithms, bn_order=built.bn_order,
                       epoch=2, step=2, global_step=12, totals=EpochTotals(loss_sum=4.0, images=16))
    # and the loader a run resumed there reads: epoch 2's batches without the first two
    passes = EpochPasses(ShuffledBatches(ROWS, BATCH, seed=5), start_epoch=2, skip=2)
    run = replace(run, batches=train_loader("torch", run.splits, passes, seed=5, device=torch.device("cpu"), ops=[],
                                            channels_last=False, workers=0))
    seen: list[list[int]] = []
    row = train_one_epoch(run, state, observe=lambda epoch, batch: seen.append(batch.source_ids.tolist()))
    expected = ShuffledBatches(ROWS, BATCH, seed=5).batches(2)[2:]  # epoch 2's order, its first two batches done
    assert seen == expected
    assert (state.epoch, state.step, state.global_step) == (2, 5, 15)
    assert row["epoch"] == 3 and row["steps"] == 5 and row["images"] == 16 + 3 * BATCH
    assert row["train_loss"] > 4.0 / 5  # the hand-made 4.0 is in the mean over the five steps
    assert state.scheduler.last_epoch == 3  # one schedule step per optimizer step taken here

    test_acc, val_acc = evaluate_epoch(run, state)
    assert 0.0 <= test_acc <= 1.0 and (test_acc * 30) == pytest.approx(round(test_acc * 30))  # 30 test rows
    assert val_acc is None  # no algorithm or schedule reads the validation set
    closed = close_epoch(run, state, row, test_acc, val_acc)
    assert closed["test_accuracy"] == test_acc and state.history == [closed]
    assert (state.epoch, state.step, state.totals.images) == (3, 0, 0)


def test_state_round_trip_restores_weights_optimizer_and_generators(fake_dir: Path, tmp_path: Path) -> None:
    run, state = _build(_config(fake_dir, recipe="sum"), tmp_path)
    train_one_epoch(run, state)
    saved = state.state_dict()
    weights = [p.detach().clone() for p in state.model.parameters()]
    draw = torch.rand(3)  # the global generator moves on after the save
    run, fresh = _build(_config(fake_dir, recipe="sum"), tmp_path / "b")
    fresh.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(weights, fresh.model.parameters()))
    assert torch.equal(torch.rand(3), draw)  # the global generator is where the save left it
    assert (fresh.epoch, fresh.step, fresh.global_step) == (state.epoch, state.step, state.global_step)
    assert fresh.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="holds 1 algorithm states for 0 algorithms"):
        _build(_config(fake_dir), tmp_path / "c")[1].load_state_dict(saved)


def test_train_step_refuses_a_non_finite_loss_before_stepping(fake_dir: Path, tmp_path: Path) -> None:
    run, state = _build(_config(fake_dir), tmp_path)
    batch = next(iter(run.batches))
    bad = replace(batch, inputs=torch.full_like(batch.inputs, float("nan")))
    before = [p.detach().clone() for p in state.model.parameters()]
    with pytest.raises(NonFiniteLoss, match=r"training loss became nan at epoch 1 step 1 \(recipe 'baseline'\)"):
        train_step(run, state, bad)
    assert all(torch.equal(a, b) for a, b in zip(before, state.model.parameters()))
