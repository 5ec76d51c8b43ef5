"""CutMix, CutOut and MixUp: boxes, targets and expected saliency maps against per-row loops, the ops'
statistics and replay, the saliency loss on box-augmented batches, and the recipe words in the loop."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from regpipe.core.batch import Batch
from regpipe.engine.algorithms import ComposeError, build_algorithms
from regpipe.engine.config import CutMixConfig, CutOutConfig, InvarianceConfig, MixUpConfig, TrainConfig
from regpipe.engine.train import train
from regpipe.functional.boxes import box_expected_maps, box_saliency_loss, center_boxes, cutmix, cutmix_targets, cutout
from regpipe.functional.saliency import normalize_maps, saliency
from regpipe.hooks.saliency import SaliencyLoss
from regpipe.ops.augment import Augment, RandomFlip, Replicate
from regpipe.ops.cutmix import CutMix, CutOut, MixUp


def _random_boxes(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Boxes anywhere, clipped at the borders, some empty."""
    g = torch.Generator().manual_seed(seed)
    cy, cx = torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    half_h, half_w = torch.randint(0, h // 2 + 1, (n,), generator=g), torch.randint(0, w // 2 + 1, (n,), generator=g)
    return center_boxes(h, w, cy, cx, half_h, half_w)


def test_cutmix_pixels_and_targets_equal_a_per_row_loop() -> None:
    n, h, w = 9, 7, 10
    x = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    y = torch.softmax(torch.randn(n, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    boxes = _random_boxes(n, h, w, 2)
    partners = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    expected_x, expected_y = x.clone(), torch.empty_like(y)
    for i in range(n):
        y0, y1, x0, x1 = boxes[i].tolist()
        expected_x[i, :, y0:y1, x0:x1] = x[partners[i], :, y0:y1, x0:x1]
        pasted = (y1 - y0) * (x1 - x0) / (h * w)
        expected_y[i] = (1 - pasted) * y[i] + pasted * y[partners[i]]
    assert torch.equal(cutmix(x, boxes, partners), expected_x)
    torch.testing.assert_close(cutmix_targets(y, boxes, partners, h, w), expected_y)


def test_cutout_equals_a_per_row_loop_and_keeps_uint8() -> None:
    n, h, w = 6, 8, 8
    x = torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    boxes = _random_boxes(n, h, w, 4)
    expected = x.clone()
    for i in range(n):
        y0, y1, x0, x1 = boxes[i].tolist()
        expected[i, :, y0:y1, x0:x1] = 7
    out = cutout(x, boxes, fill=7.0)
    assert out.dtype == torch.uint8 and torch.equal(out, expected)


def test_expected_maps_paste_the_partners_box_or_zero_the_hole() -> None:
    n_in, h, w = 5, 6, 9
    parent = torch.rand(n_in, h, w, generator=torch.Generator().manual_seed(0))
    first = torch.tensor([0, 1, 2, 3, 4, 4])
    partners = torch.tensor([3, -1, 0, -1, 1, 2])
    boxes = _random_boxes(6, h, w, 5)
    expected = torch.empty(6, h, w)
    for i in range(6):
        y0, y1, x0, x1 = boxes[i].tolist()
        expected[i] = parent[first[i]]
        expected[i, y0:y1, x0:x1] = 0.0 if partners[i] < 0 else parent[partners[i], y0:y1, x0:x1]
    torch.testing.assert_close(box_expected_maps(parent, first, boxes, partners), expected, rtol=0, atol=0)


def test_bad_boxes_are_named() -> None:
    with pytest.raises(ValueError, match=r"box \[3, 2, 0, 1\] of row 0"):
        cutout(torch.zeros(1, 1, 4, 4), torch.tensor([[3, 2, 0, 1]]))
    with pytest.raises(ValueError, match=r"boxes must be an \(2, 4\) int64"):
        cutout(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4))


def _batch(n: int = 16, size: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch.from_labels(torch.rand(n, 3, size, size, generator=g) + 1.0, torch.arange(n) % 4, num_classes=4)


def test_cutmix_targets_are_the_share_of_pixels_actually_replaced() -> None:
    batch = _batch()  # every pixel differs between rows, so replaced pixels can be counted
    for seed in range(5):
        out = CutMix(seed=seed, per_row=seed % 2 == 1)(batch)
        replaced = (out.inputs != batch.inputs).any(dim=1).flatten(1).float().mean(1)
        partners = out.boxes.partners  # a row paired with itself replaces nothing and keeps its target
        expected = (1.0 - replaced).unsqueeze(1) * batch.targets + replaced.unsqueeze(1) * batch.targets[partners]
        torch.testing.assert_close(out.targets, expected)
        if seed % 2 == 0:  # one box for the whole batch (Algorithm A1)
            assert bool((out.boxes.boxes == out.boxes.boxes[0]).all())


def test_cutmix_prob_skips_batches_at_the_requested_rate() -> None:
    op, batch = CutMix(prob=0.3, seed=0), _batch(n=4, size=4)
    mixed = sum(op(batch).boxes is not None for _ in range(600))
    assert abs(mixed / 600 - 0.3) < 0.06


def test_cutmix_box_area_follows_beta_lam() -> None:
    # With the box centred where it cannot be clipped the pasted share is about 1 - lam; lam ~ Beta(1, 1)
    # makes it uniform, Beta(0.2, 0.2) pushes it to the ends. Measured on a large image, clipping included:
    # the mean share of a uniform lam is E[(1 - lam) * clip] < 0.5, and alpha = 0.2 gives more extreme shares.
    batch = _batch(n=2, size=64)
    shares = {alpha: torch.stack([CutMix(alpha=alpha, seed=s)(batch).mixing.weights[0, 1] for s in range(300)])
              for alpha in (1.0, 0.2)}
    assert 0.2 < float(shares[1.0].mean()) < 0.5
    assert float((shares[0.2] - 0.5).abs().mean()) > float((shares[1.0] - 0.5).abs().mean())


def test_cutout_hole_area_matches_the_exhaustive_expectation() -> None:
    size, length = 12, 6
    # exhaustive reference: every centre equally likely, the square clipped at the border
    areas = [(min(cy + length // 2, size) - max(cy - length // 2, 0)) * (min(cx + length // 2, size)
             - max(cx - length // 2, 0)) for cy in range(size) for cx in range(size)]
    expected = sum(areas) / len(areas) / size ** 2
    batch = _batch(n=64, size=size)
    op = CutOut(length=length, seed=0)
    measured = torch.cat([(op(batch).inputs == 0).all(dim=1).flatten(1).float().mean(1) for _ in range(20)])
    assert abs(float(measured.mean()) - expected) < 0.01
    out = op(batch)
    assert torch.equal(out.targets, batch.targets) and bool((out.boxes.partners == -1).all())


def test_ops_replay_their_draws_and_resume_from_state() -> None:
    batch = _batch()
    for make in (lambda: CutMix(seed=3), lambda: CutOut(length=6, seed=3), lambda: MixUp(seed=3)):
        a, b = make(), make()
        a(batch)
        state = a.state_dict()
        params = a.draw(batch)
        b.load_state_dict(state)
        assert torch.equal(a.apply(batch, params).inputs, b(batch).inputs)


def test_mixup_is_a_beta_blend_of_permuted_pairs() -> None:
    batch = _batch()
    out = MixUp(alpha=1.0, seed=0)(batch)
    sources, weights = out.mixing.sources, out.mixing.weights
    assert torch.equal(sources[:, 0], torch.arange(16)) and sorted(sources[:, 1].tolist()) == list(range(16))
    lam = float(weights[0, 0])
    for i in range(16):
        torch.testing.assert_close(out.inputs[i], lam * batch.inputs[i] + (1 - lam) * batch.inputs[sources[i, 1]])
    lams = torch.tensor([MixUp(alpha=0.2, seed=s).draw(batch).column_weights[0] for s in range(300)])
    assert float((lams - 0.5).abs().mean()) > 0.3  # Beta(0.2, 0.2) sits near 0 and 1


@pytest.mark.filterwarnings("ignore:.*sets of k=2.*:UserWarning")  # tiny batches: few seed pairs
def test_replicated_batches_pair_rows_of_different_seeds() -> None:
    seeds = Batch.from_labels(torch.rand(4, 3, 8, 8), torch.arange(4), num_classes=4)
    batch = Replicate(4, Augment([RandomFlip(horizontal=0.5)], seed=0))(seeds)
    for op in (CutMix(seed=1), MixUp(seed=1)):
        out = op(batch)
        ids = batch.source_ids[out.mixing.sources]
        assert bool((ids[:, 0] != ids[:, 1]).all())


def test_saliency_loss_of_box_batches_is_the_distance_to_the_expected_maps() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 4))
    batch = Batch.from_labels(torch.rand(6, 3, 8, 8), torch.arange(6) % 4, num_classes=4)
    for op in (CutMix(seed=0, keep_parent=True), CutOut(length=4, seed=0, keep_parent=True)):
        out = op(batch)
        parent = Batch(inputs=out.mixing.parent_inputs, targets=out.mixing.parent_targets,
                       source_ids=batch.source_ids)
        loss = SaliencyLoss()(model, out, parent)
        maps, parent_maps = saliency(model, out.inputs, out.targets), saliency(model, batch.inputs, batch.targets)
        expected = torch.empty_like(maps)
        for i in range(6):
            y0, y1, x0, x1 = out.boxes.boxes[i].tolist()
            expected[i] = parent_maps[i]
            partner = int(out.boxes.partners[i])
            expected[i, y0:y1, x0:x1] = 0.0 if partner < 0 else parent_maps[partner, y0:y1, x0:x1]
        reference = (normalize_maps(maps) - normalize_maps(expected)).square().mean()
        torch.testing.assert_close(loss, reference)
        assert loss.requires_grad
        torch.testing.assert_close(box_saliency_loss(maps, parent_maps, out.mixing.sources[:, 0], out.boxes.boxes,
                                                     out.boxes.partners), reference)


def test_batch_validates_and_carries_its_box_record() -> None:
    out = CutMix(seed=0)(_batch())
    picked = out.rows(torch.tensor([3, 1]))
    assert torch.equal(picked.boxes.boxes, out.boxes.boxes[[3, 1]])
    assert torch.equal(picked.boxes.partners, out.boxes.partners[[3, 1]])
    with pytest.raises(ValueError, match="Batch.boxes needs Batch.mixing"):
        out.replace(mixing=None)
    with pytest.raises(ValueError, match="CutOut takes unmixed batches"):
        CutOut()(out)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"alpha": 0.0}, "alpha"), ({"alpha": float("nan")}, "alpha"), ({"prob": 1.5}, "prob")])
def test_bad_settings_are_named(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        CutMix(**kwargs)
    with pytest.raises(ValueError, match="length must be an integer >= 1, got 0"):
        CutOut(length=0)
    with pytest.raises(ValueError, match="cutout.length"):
        CutOutConfig(length=0)
    with pytest.raises(ValueError, match="mixup.alpha must be > 0"):
        MixUpConfig(alpha=0.0)


BATCH = 8


def _run(fake_dir: Path, recipe: str, **changes: object) -> dict:
    cfg = TrainConfig(recipe=recipe, epochs=2, seed=3, samples_per_class=4, val_per_class=2, batch_size=BATCH,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64,
                      invariance=InvarianceConfig(layers=("layer1", "layer2")), cutout=CutOutConfig(length=8))
    return train(replace(cfg, **changes))


@pytest.mark.filterwarnings("ignore:.*sets of k=2.*:UserWarning")  # tiny batches: few seed pairs
@pytest.mark.parametrize("recipe, algorithms, term, state", [
    ("cutmix+saliency", ["cutmix", "replicate", "saliency"], "mean_saliency", "cutmix_alpha"),
    ("cutout+invariance", ["cutout", "replicate", "invariance"], "mean_invariance", "cutout_length"),
    ("mixup+saliency", ["mixup", "replicate", "saliency"], "mean_saliency", "mixup_alpha"),
    ("cutmix", ["cutmix"], None, "cutmix_prob"),
])
def test_recipe_words_train_the_augmentation_with_its_consistency_loss(fake_dir: Path, recipe: str,
                                                                       algorithms: list[str], term: str | None,
                                                                       state: str) -> None:
    metrics = _run(fake_dir, recipe)
    assert metrics["algorithms"] == algorithms
    for row in metrics["epochs"]:
        assert row["rows_per_step"] == BATCH and state in row  # box ops keep every row
        assert math.isfinite(row["train_loss"])
        if term is not None:
            assert math.isfinite(row[term]) and row[term] > 0


def test_box_words_own_the_mixing_and_refuse_each_other() -> None:
    for recipe in ("cutmix+sum", "cutout+mixup", "mixup+gradual"):
        with pytest.raises(ComposeError, match="both take over the input mixing schedule"):
            build_algorithms(TrainConfig(recipe=recipe))
    assert [a.name for a in build_algorithms(TrainConfig(recipe="cutout+saliency",
                                                         cutmix=CutMixConfig(prob=0.5)))] == \
        ["cutout", "replicate", "saliency"]


@pytest.mark.parametrize("name", ["regpipe.functional.boxes", "regpipe.ops.cutmix"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
