"""The base augmentation of every recipe (``--augment crop,flip``): where it sits in the run's op chain, that every
recipe word runs on top of it, that a resumed run draws the same augmentations, and that ``compare`` gives it to
every recipe."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from regpipe.cli import main
from regpipe.cli.settings import parse_command
from regpipe.engine.algorithms import RECIPE_WORDS, BaseAugmentation, build_algorithms
from regpipe.engine.build import build_run
from regpipe.engine.config import GradualConfig, InvarianceConfig, SignConfig, SumConfig, TrainConfig, read_config
from regpipe.engine.config_checks import check_config
from regpipe.engine.distributed import DistInfo
from regpipe.engine.loop import train_one_epoch
from regpipe.engine.train import train
from regpipe.ops.augment import Augment, RandomFlip, RandomPadCrop, Replicate

TINY = ["--samples-per-class", "2", "--val-per-class", "1", "--batch-size", "8", "--epochs", "1", "--no-progress",
        "--eval-batch-size", "64", "--bn-batches", "1"]


def _config(fake_dir: Path, **changes: object) -> TrainConfig:
    """A run of 2 steps per epoch (2 images per class, 10 classes, batches of 8) with the CIFAR base."""
    cfg = TrainConfig(recipe="baseline", epochs=1, seed=3, samples_per_class=2, val_per_class=1, batch_size=8,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64, bn_batches=1,
                      augment="crop,flip", invariance=InvarianceConfig(layers=("layer1",)), sign=SignConfig(iters=(2,)),
                      sum=SumConfig(k=2), gradual=GradualConfig(k0=2, fine_tune_frac=0.5))
    return replace(cfg, **changes)


def _is_base(op: object, pad: int = 4) -> bool:
    return isinstance(op, Augment) and [type(t) for t in op.transforms] == [RandomPadCrop, RandomFlip] \
        and op.transforms[0].pad == pad and op.transforms[1].horizontal == 0.5


def test_augment_resolves_per_data_and_is_recorded(fake_dir: Path, tmp_path: Path) -> None:
    assert TrainConfig().augment == "none"  # in memory: earlier runs keep their meaning
    assert TrainConfig(dataset="imagefolder:/data").augment == "crop,flip"  # the loader's crop and flip
    assert TrainConfig(augment="flip,crop").augment == "crop,flip"  # one spelling
    # the command line resolves auto from the data given, not from the default data
    command = parse_command(["--data", "imagefolder:/data"], prog="train", description="", out="runs")
    assert command.settings.augment == "crop,flip"
    out = tmp_path / "run"
    assert main(["train", "--recipe", "baseline", "--data-dir", str(fake_dir), "--out", str(out), *TINY,
                 "--augment", "flip,crop", "--augment-pad", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["augment"] == "crop,flip" and metrics["config"]["augment_pad"] == 3
    assert metrics["algorithms"] == ["augment"]
    saved = read_config(out / "config.yaml")
    assert (saved.augment, saved.augment_pad) == ("crop,flip", 3)


def test_the_base_op_comes_first_and_only_for_in_memory_data(fake_dir: Path) -> None:
    algorithms = build_algorithms(_config(fake_dir, recipe="gradual+invariance"))
    assert [a.name for a in algorithms] == ["augment", "gradual", "replicate", "invariance"]
    assert isinstance(algorithms[0], BaseAugmentation)
    assert build_algorithms(_config(fake_dir, augment="none"))[:1] == []
    streamed = TrainConfig(recipe="sum", dataset="imagefolder:/data")
    assert [a.name for a in build_algorithms(streamed)] == ["sum"]  # the loader's crop and flip are the base


#: words run in the quick suite (one per kind of op: none, copies, mixing, boxes, a hidden-layer plan); the
#: others, whose runs take seconds each (a teacher, input gradients, scoring passes), run with the slow tests
QUICK_WORDS = ("baseline", "replicate", "sum", "cutmix", "patchup-hard")


@pytest.mark.parametrize("word", [w if w in QUICK_WORDS else pytest.param(w, marks=pytest.mark.slow)
                                  for w in sorted(RECIPE_WORDS)])
def test_every_recipe_word_runs_on_top_of_the_base(word: str, fake_dir: Path, tmp_path: Path) -> None:
    cfg = _config(fake_dir, recipe=word)
    check_config(cfg)
    algorithms = build_algorithms(cfg)
    run, state = build_run(cfg, algorithms, torch.device("cpu"), DistInfo(), tmp_path, train)
    ops = run.batches.ops
    assert _is_base(ops[0]) and ops[0] is algorithms[0].op
    assert not any(_is_base(op) for op in ops[1:])
    try:
        row = train_one_epoch(run, state)  # the recipe's steps on the augmented batches
    finally:
        for alg in algorithms:
            alg.close()
    assert row["steps"] >= 1 and math.isfinite(row["train_loss"])


def test_the_engine_op_pads_with_black_and_equals_a_per_row_loop(fake_dir: Path, tmp_path: Path) -> None:
    """The ops see normalised rows: the base crop's outside pixels are black, ``-mean / std`` per channel (not 0,
    the mean colour), and each row is the padded image's window at the drawn offset, flipped when drawn."""
    cfg = _config(fake_dir)
    run, _ = build_run(cfg, build_algorithms(cfg), torch.device("cpu"), DistInfo(), tmp_path, train)
    op = run.batches.ops[0]
    arrays, take = run.splits.arrays.train, torch.arange(16)
    raw = run.batches.builder.build(arrays.images[take], arrays.labels[take], take)
    params = op.draw(raw)
    out = op.apply(raw, params)
    black = -torch.tensor(run.splits.mean) / torch.tensor(run.splits.std)
    pad, (h, w) = 4, raw.inputs.shape[-2:]
    for i in range(len(take)):
        dx, dy = (int(v) for v in params[0].shift[i].tolist())
        canvas = black.view(-1, 1, 1).expand(-1, h + 2 * pad, w + 2 * pad).clone()
        canvas[:, pad:pad + h, pad:pad + w] = raw.inputs[i]
        window = canvas[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]
        expected = window.flip(-1) if bool(params[1].horizontal[i]) else window
        torch.testing.assert_close(out.inputs[i], expected, atol=1e-5, rtol=0)
    assert bool((params[0].shift != 0).any())


def test_replicate_copies_are_augmented_on_top_of_the_base(fake_dir: Path, tmp_path: Path) -> None:
    """The base op draws each seed's crop and flip, Replicate then copies the *augmented* seed: the first copy
    of each seed (its original) is the seed after the base, and every copy's recorded affine composes both."""
    cfg = _config(fake_dir, recipe="replicate")
    algorithms = build_algorithms(cfg)
    run, _ = build_run(cfg, algorithms, torch.device("cpu"), DistInfo(), tmp_path, train)
    base, replicate = run.batches.ops[:2]
    assert isinstance(replicate, Replicate)
    arrays, take = run.splits.arrays.train, torch.arange(8)
    raw = run.batches.builder.build(arrays.images[take], arrays.labels[take], take)  # the loader's batch, no op
    augmented = base(raw)
    replicated = replicate(augmented)
    m = replicate.m
    assert torch.equal(replicated.inputs[::m], augmented.inputs)  # the originals are the augmented seeds
    assert torch.equal(replicated.affine[::m], augmented.affine)
    shifted = augmented.affine[:, :, 2].abs().sum(1) > 0
    assert bool(shifted.any())  # the base moved some rows
    # the copies' affines map back to the loader's image through the base's matrix
    copies = replicated.affine.view(-1, m, 2, 3)[:, 1:]
    assert not torch.equal(copies, augmented.affine[:, None].expand_as(copies))



class Interrupted(Exception):
    """Stands for a kill inside the loop."""


def test_a_resumed_run_draws_the_same_augmentations(fake_dir: Path, tmp_path: Path) -> None:
    """Killed inside epoch 2 and resumed from its last state: every batch trained on after the resume holds the
    pixels and affines of the uninterrupted run's batch at that step (the base op's generator is saved with
    the run, and so is the replication chain's drawing on top of it), and the metrics end the same."""
    cfg = _config(fake_dir, recipe="replicate", epochs=2, samples_per_class=4, checkpoint_every=2)  # 5 steps per epoch
    whole: list[tuple[torch.Tensor, torch.Tensor]] = []
    metrics = train(replace(cfg, out=str(tmp_path / "whole")),
                    observe=lambda epoch, batch: whole.append((batch.inputs.clone(), batch.affine.clone())))
    seen = {"n": 0}

    def kill(epoch: int, batch: object) -> None:
        seen["n"] += 1
        if seen["n"] == 8:  # during step 3 of epoch 2, before its state: the last one is that of step 6
            raise Interrupted

    with pytest.raises(Interrupted):
        train(replace(cfg, out=str(tmp_path / "resumed")), observe=kill)
    after: list[tuple[torch.Tensor, torch.Tensor]] = []
    resumed = train(replace(cfg, out=str(tmp_path / "resumed"), resume=True),
                    observe=lambda epoch, batch: after.append((batch.inputs.clone(), batch.affine.clone())))
    assert len(whole) == 10 and len(after) == 4  # steps 7..10 trained again
    for (x, affine), (x_whole, affine_whole) in zip(after, whole[6:]):
        assert torch.equal(affine, affine_whole) and torch.equal(x, x_whole)
    assert all(bool((a[:, :, 2] != 0).any()) for _, a in after)  # the base moved rows of these batches
    assert [r["train_loss"] for r in resumed["epochs"]] == [r["train_loss"] for r in metrics["epochs"]]
    assert resumed["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_in_memory_dali_and_ffcv_runs_apply_the_base_op(loader: str, fake_dir: Path, tmp_path: Path) -> None:
    """The in-memory DALI and FFCV adapters run the device ops too: the base op heads their chain and its draws
    are the torch loader's for the same rows (one generator, one seed)."""
    pytest.importorskip({"dali": "nvidia.dali", "ffcv": "ffcv"}[loader])
    cfg = _config(fake_dir, loader=loader)
    built = {}
    for kind in ("torch", loader):
        c = replace(cfg, loader=kind)
        run, _ = build_run(c, build_algorithms(c), torch.device("cpu"), DistInfo(), tmp_path / kind, train)
        assert _is_base(run.batches.ops[0])
        built[kind] = next(iter(run.batches))
    torch.testing.assert_close(built[loader].affine, built["torch"].affine, atol=0, rtol=0)
    torch.testing.assert_close(built[loader].inputs, built["torch"].inputs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flags, fragment", [
    (["--augment", "spin"], "train.augment='spin': unknown word(s) ['spin']; it must be auto, none, or a comma list "
                            "of crop, flip"),
    (["--augment-pad", "-1"], "train.augment_pad must be an integer >= 0, got -1"),
    (["--augment", "crop", "--augment-pad", "0"], "--augment crop with --augment-pad 0"),
    (["--augment", "crop,flip", "--augment-pad", "32"], "--augment-pad 32 must be less than the images' height and "
                                                        "width (32 x 32)"),
    (["--data", "imagefolder:/nowhere", "--augment", "none"], "data is always augmented by the loader's "
                                                              "random-resized crop and horizontal flip"),
])
def test_bad_values_give_one_line(flags: list[str], fragment: str, fake_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--data-dir", str(fake_dir), "--out", str(tmp_path / "run"), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_compare_gives_the_base_to_every_recipe(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "baseline,mixup", "--seeds", "1", "--data-dir", str(fake_dir),
                 "--out", str(out), *TINY, "--augment", "crop,flip"]) == 0
    for recipe in ("baseline", "mixup"):
        run = out / recipe / "seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["config"]["augment"] == "crop,flip" and metrics["algorithms"][0] == "augment"
        assert read_config(run / "config.yaml").augment == "crop,flip"
