"""Invertible batch augmentations and in-batch replication (regpipe.ops.augment, regpipe.functional.augment)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from regpipe import Batch
from regpipe.core.op import BatchOp, Op
from regpipe.functional.augment import (
    affine_from_pixels,
    affine_matrix,
    affine_to_pixels,
    brightness_contrast,
    compose_affine,
    crop_affine,
    flip_affine,
    invert_affine,
    valid_mask,
    warp,
)
from regpipe.ops.augment import (
    Augment,
    AugmentParams,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    RandomPadCrop,
    RandomResizedCrop,
    Replicate,
)

ATOL = 1e-5


def _smooth(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth images (a few low-frequency sinusoids), so bilinear resampling round trips are tight."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    coef = torch.rand(n, c, 4, generator=g)
    return (coef[..., 0, None, None] * torch.sin(3 * xx + coef[..., 1, None, None] * 6)
            + coef[..., 2, None, None] * torch.cos(2 * yy + coef[..., 3, None, None] * 6))


def _batch(x: torch.Tensor) -> Batch:
    return Batch.from_labels(x, torch.arange(x.shape[0]) % 3, num_classes=3)


def test_flips_match_torch_flip() -> None:
    x = torch.rand(3, 2, 7, 10)
    theta = flip_affine(torch.tensor([True, False, True]), torch.tensor([False, True, True]))
    y = warp(x, theta)
    torch.testing.assert_close(y[0], x[0].flip(-1), atol=ATOL, rtol=0)
    torch.testing.assert_close(y[1], x[1].flip(-2), atol=ATOL, rtol=0)
    torch.testing.assert_close(y[2], x[2].flip(-1, -2), atol=ATOL, rtol=0)


def test_affine_matrix_rotation_and_translation_on_the_pixel_grid() -> None:
    x = torch.rand(1, 1, 8, 8)
    rot = affine_matrix(torch.tensor([90.0]), torch.ones(1), torch.zeros(1, 2), torch.zeros(1, 2), 8, 8)
    torch.testing.assert_close(warp(x, rot)[0, 0], torch.rot90(x[0, 0], 1, (0, 1)), atol=ATOL, rtol=0)
    x = torch.rand(1, 1, 6, 12)  # non-square: translation by one pixel along each axis
    shift = affine_matrix(torch.zeros(1), torch.ones(1), torch.tensor([[1 / 12, 1 / 6]]), torch.zeros(1, 2), 6, 12)
    torch.testing.assert_close(warp(x, shift)[0, 0, 1:, 1:], x[0, 0, :-1, :-1], atol=ATOL, rtol=0)


def test_rotation_is_a_true_rotation_on_non_square_images() -> None:
    theta = affine_matrix(torch.tensor([30.0]), torch.tensor([1.3]), torch.zeros(1, 2), torch.zeros(1, 2), 10, 20)
    px = affine_to_pixels(theta, 10, 20)[0, :, :2]  # output -> input in pixels: (R * s)^-1
    torch.testing.assert_close(px @ px.T, torch.eye(2) / 1.3 ** 2, atol=1e-5, rtol=0)


def test_compose_equals_sequential_warps() -> None:
    x = _smooth(4, 3, 24, 24)
    g = torch.Generator().manual_seed(1)
    a = RandomAffine(degrees=20, translate=(0.05, 0.05), scale=(0.9, 1.1)).sample(4, g)
    a = affine_matrix(a.angle, a.scale, a.translate, a.shear, 24, 24)
    b = flip_affine(torch.tensor([True, False, True, False]), torch.zeros(4, dtype=torch.bool))
    once = warp(x, compose_affine(a, b))
    twice = warp(warp(x, a), b)
    mask = valid_mask(compose_affine(a, b), 24, 24)  # compare where nothing was padded
    torch.testing.assert_close(once * mask, twice * mask, atol=0.05, rtol=0)


def test_invert_affine_and_pixel_conversions() -> None:
    theta = torch.tensor([[[0.8, 0.2, 0.1], [-0.3, 1.1, -0.2]]]).repeat(2, 1, 1)
    eye = compose_affine(theta, invert_affine(theta))
    torch.testing.assert_close(eye, torch.eye(2, 3).expand(2, 2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(affine_from_pixels(affine_to_pixels(theta, 5, 9), 5, 9), theta, atol=1e-6, rtol=0)
    one_px = torch.tensor([[[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # DALI-style: x_in = x_out - 1
    x = torch.rand(1, 1, 4, 6)
    torch.testing.assert_close(warp(x, affine_from_pixels(one_px, 4, 6))[..., 1:], x[..., :-1], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="row 1 is singular"):
        invert_affine(torch.stack([theta[0], torch.zeros(2, 3)]))


@pytest.mark.parametrize("transform", [RandomFlip(0.5, 0.5), RandomResizedCrop(scale=(0.5, 1.0)),
                                       RandomAffine(degrees=25, translate=(0.1, 0.1), scale=(0.8, 1.2),
                                                    shear=(5, 5))])
def test_inverse_restores_pixels_that_stayed_in_frame(transform) -> None:
    x = _smooth(6, 3, 32, 32, seed=2)
    aug = Augment([transform], seed=3)
    out = aug(_batch(x))
    back = Augment.inverse(out.inputs, out)
    mask = valid_mask(out.affine, 32, 32)
    assert mask.float().mean() > 0.3
    # Bilinear interpolation twice on smooth images: measured <= 0.2 % of the signal range.
    err = ((back - x).abs() * mask).amax()
    assert err < 0.01 * float(x.abs().max()), float(err)


def test_chain_records_the_composed_affine_and_warps_once() -> None:
    x = _smooth(5, 3, 16, 16)
    chain = Augment([RandomFlip(1.0), RandomAffine(degrees=10)], seed=0)
    params = chain.sample(5, "cpu")
    out = chain.apply(_batch(x), params)
    flip = RandomFlip(1.0).matrix(params[0], 16, 16)
    rot = RandomAffine(degrees=10).matrix(params[1], 16, 16)
    torch.testing.assert_close(out.affine, compose_affine(flip, rot))
    torch.testing.assert_close(out.inputs, warp(x, compose_affine(flip, rot)))
    again = chain.apply(out, chain.sample(5, "cpu"))  # applying to an augmented batch composes further
    assert not torch.allclose(again.affine, out.affine)


def test_brightness_contrast_formula_and_uint8() -> None:
    x = torch.rand(2, 3, 4, 4)
    b, c = torch.tensor([1.2, 0.5]), torch.tensor([0.7, 1.5])
    out = brightness_contrast(x, b, c, center=0.5)
    torch.testing.assert_close(out, b.view(2, 1, 1, 1) * (0.5 + c.view(2, 1, 1, 1) * (x - 0.5)))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(brightness_contrast(x, b, c), b.view(2, 1, 1, 1) * (mean + c.view(2, 1, 1, 1) * (x - mean)))
    u = torch.tensor([[[[0, 100, 250]]]], dtype=torch.uint8)
    assert brightness_contrast(u, torch.tensor([1.1]), torch.tensor([1.0]), 128).tolist() == [[[[0, 110, 255]]]]


def test_random_resized_crop_windows_fit_and_respect_scale() -> None:
    op = RandomResizedCrop(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    p = op.sample(2000, torch.Generator().manual_seed(0))
    area = p.size.prod(1)
    fallback = (p.size == 1).all(1)
    assert bool(((area >= 0.2 - 1e-6) & (area <= 0.6 + 1e-6) | fallback).all())
    assert bool(((p.center.abs() + p.size) <= 1 + 1e-6).all())  # the window lies inside the frame
    assert fallback.float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("include_original", [True, False])
def test_replicate_layout(dtype, include_original) -> None:
    x = (torch.rand(3, 3, 12, 12) * 255).to(dtype)
    seeds = Batch.from_labels(x, torch.tensor([2, 0, 1]), num_classes=3, source_ids=torch.tensor([10, 11, 12]))
    chain = Augment([RandomFlip(1.0), RandomBrightnessContrast()], seed=5)
    out = Replicate(4, chain, include_original=include_original)(seeds)
    assert out.inputs.shape == (12, 3, 12, 12) and out.inputs.dtype == dtype
    assert out.source_ids.tolist() == [10] * 4 + [11] * 4 + [12] * 4
    torch.testing.assert_close(out.targets, seeds.targets.repeat_interleave(4, 0))
    if include_original:
        torch.testing.assert_close(out.inputs[0::4], x)
        torch.testing.assert_close(out.affine[0::4], torch.eye(2, 3).expand(3, 2, 3))
        torch.testing.assert_close(out.photometric[0::4], torch.ones(3, 2))
    flipped = out.affine[1::4] if include_original else out.affine
    assert bool((flipped[:, 0, 0] == -1).all())
    # copies of one seed draw their own parameters
    assert out.photometric[1:4].unique(dim=0).shape[0] == 3


def test_replicate_is_deterministic_and_resumable() -> None:
    seeds = _batch(torch.rand(4, 3, 8, 8))

    def make() -> Replicate:
        return Replicate(3, Augment([RandomAffine(degrees=30), RandomBrightnessContrast()], seed=7))

    a, b = make(), make()
    torch.testing.assert_close(a(seeds).inputs, b(seeds).inputs)
    state = a.state_dict()
    expected = a(seeds)
    c = make()
    c.load_state_dict(state)
    torch.testing.assert_close(c(seeds).inputs, expected.inputs)
    torch.testing.assert_close(c(seeds).affine, a(seeds).affine)


def test_channels_last_is_kept() -> None:
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    out = Replicate(2, Augment([RandomFlip()]))(_batch(x))
    assert out.inputs.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs() -> None:
    chain = Augment([RandomFlip()])
    with pytest.raises(ValueError, match="m .* >= 1, got 0"):
        Replicate(0, chain)
    with pytest.raises(TypeError, match="Augment chain"):
        Replicate(2, RandomFlip())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        warp(torch.rand(3, 8, 8), torch.eye(2, 3).expand(3, 2, 3))
    with pytest.raises(ValueError, match="3 affine matrices for a batch of 2"):
        warp(torch.rand(2, 1, 8, 8), torch.eye(2, 3).expand(3, 2, 3))
    with pytest.raises(ValueError, match="flip probability"):
        RandomFlip(1.5)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="crop sizes must be > 0"):
        crop_affine(torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="at least one transform"):
        Augment([])
    mixed = Batch.from_labels(torch.rand(4, 1, 4, 4), torch.arange(4) % 2, 2)
    from regpipe.ops.sum_mix import SumMix
    with pytest.raises(ValueError, match="before mixing"):
        Replicate(2, chain)(SumMix(2)(mixed))
    with pytest.raises(ValueError, match="Batch.source_ids"):
        Batch(inputs=torch.rand(2, 1, 4, 4), targets=torch.rand(2, 2), source_ids=torch.arange(3))


def test_more_bad_inputs() -> None:
    with pytest.raises(ValueError, match="scale must be > 0"):
        affine_matrix(torch.zeros(1), torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), 8, 8)
    with pytest.raises(ValueError, match=r"brightness and contrast must be \(2,\)"):
        brightness_contrast(torch.rand(2, 3, 4, 4), torch.ones(3), torch.ones(2))
    chain = Augment([RandomFlip(), RandomAffine(degrees=5)])
    with pytest.raises(ValueError, match="1 parameter records for 2 transforms"):
        chain.apply(_batch(torch.rand(2, 3, 8, 8)), chain.sample(2, "cpu")[:1])
    with pytest.raises(ValueError, match=r"Batch.photometric must be \(N, 2\)"):
        _batch(torch.rand(2, 3, 4, 4)).replace(photometric=torch.ones(2, 3))
    from regpipe.ops.patchup import PatchUp
    planned = PatchUp(mode="soft", patchup_prob=1.0)(_batch(torch.rand(4, 3, 8, 8)))
    with pytest.raises(ValueError, match="PatchUp plan"):
        planned.rows(torch.tensor([0, 1]))


# ------------------------------------------------------------------ the op contract: draw, apply, state, reseed
def _chain(seed: int = 0) -> Augment:
    return Augment([RandomFlip(), RandomResizedCrop(scale=(0.5, 1.0)), RandomAffine(degrees=20, scale=(0.9, 1.1)),
                    RandomBrightnessContrast()], seed=seed)


def _assert_same_batch(a: Batch, b: Batch) -> None:
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.affine, b.affine)
    assert torch.equal(a.source_ids, b.source_ids) and torch.equal(a.targets, b.targets)
    assert (a.photometric is None and b.photometric is None) or torch.equal(a.photometric, b.photometric)


def _assert_same_params(a: AugmentParams, b: AugmentParams) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in vars(x):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


@pytest.mark.parametrize("make", [_chain, lambda seed=0: Replicate(3, _chain(seed))], ids=["Augment", "Replicate"])
def test_ops_follow_the_contract(make) -> None:
    op = make()
    assert isinstance(op, BatchOp) and isinstance(op, Op)
    seeds = _batch(_smooth(4, 3, 10, 10))
    params = op.draw(seeds)
    assert isinstance(params, AugmentParams)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.records = ()
    once, twice = op.apply(seeds, params), op.apply(seeds, params)  # replaying the params replays the batch
    _assert_same_batch(once, twice)
    _assert_same_batch(op(seeds, params), once)
    assert not torch.equal(op(seeds).affine, once.affine)  # a call draws fresh parameters


@pytest.mark.parametrize("make", [_chain, lambda seed=0: Replicate(2, _chain(seed), include_original=False)],
                         ids=["Augment", "Replicate"])
def test_state_dict_round_trip_resumes_the_draws(make) -> None:
    seeds = _batch(_smooth(3, 3, 8, 8))
    a = make(seed=4)
    a(seeds)  # advance the generator
    state = a.state_dict()
    expected = [a.draw(seeds) for _ in range(2)]
    b = make(seed=99)  # another seed: the state carries the generator
    b.load_state_dict(state)
    for want in expected:
        _assert_same_params(b.draw(seeds), want)


@pytest.mark.parametrize("make", [_chain, lambda seed=0: Replicate(3, _chain(seed))], ids=["Augment", "Replicate"])
def test_reseed_on_rank_0_equals_a_fresh_op(make) -> None:
    seeds = _batch(_smooth(3, 3, 8, 8))
    op = make(seed=0)
    op(seeds)
    op.reseed(7, 0)
    _assert_same_batch(op(seeds), make(seed=7)(seeds))
    op.reseed(7, 1)  # another rank draws its own parameters
    assert not torch.equal(op(seeds).affine, make(seed=7)(seeds).affine)


def test_replicate_reseeds_and_saves_its_chain() -> None:
    chain = _chain(seed=1)
    rep = Replicate(2, chain)
    assert rep.rng is chain.rng  # one generator: the chain's
    rep.reseed(11, 0)
    assert chain.rng.seed == 11
    state = rep.state_dict()
    assert state["m"] == 2 and state["include_original"] is True and "rng" in state["augment"]
    with pytest.raises(KeyError, match=r"lacks \['augment'\]"):
        rep.load_state_dict({"m": 2, "include_original": True})


def test_replicate_params_are_the_copies_and_replay() -> None:
    seeds = _batch(_smooth(3, 3, 8, 8))
    rep = Replicate(4, Augment([RandomAffine(degrees=30)], seed=2))
    params = rep.draw(seeds)
    assert params[0].angle.shape == (3 * 3,)  # S seeds x (m - 1) augmented copies
    out = rep.apply(seeds, params)
    expected = Augment([RandomAffine(degrees=30)]).apply(seeds.rows(torch.arange(3).repeat_interleave(3)), params)
    assert torch.equal(out.affine[torch.arange(12) % 4 != 0], expected.affine)
    with pytest.raises(ValueError, match=r"RandomAffine parameters are for \[9\] rows, the batch has 6"):
        Replicate(3, rep.augment).apply(seeds, params)
    assert Replicate(1, rep.augment).apply(seeds, rep.augment.sample(0, "cpu")) is seeds


def test_augment_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="padding_mode must be one of .* got 'wrap'"):
        Augment([RandomFlip()], padding_mode="wrap")
    with pytest.raises(TypeError, match=r"str is not a transform: it lacks \['geometric', 'num_uniforms'"):
        Augment(["flip"])
    chain = Augment([RandomFlip()], padding_mode="border")
    assert chain.state_dict()["padding_mode"] == "border"


def _pad_crop_flip_loop(x: torch.Tensor, pad: int, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The CIFAR crop written row by row: zero-pad by ``pad``, slice the window at offset ``pad + d``, then flip."""
    h, w = x.shape[-2:]
    rows = []
    for i in range(x.shape[0]):
        dx, dy = (int(v) for v in shift[i].tolist())
        window = torch.nn.functional.pad(x[i], (pad, pad, pad, pad))[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]
        rows.append(window.flip(-1) if bool(flip[i]) else window)
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_pad_crop_and_flip_equal_pad_then_slice_per_row(dtype) -> None:
    pad, n = 4, 64
    x = torch.rand(n, 3, 12, 10, generator=torch.Generator().manual_seed(0))  # non-square: x and y kept apart
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x
    batch = Batch.from_labels(x, torch.arange(n) % 4, num_classes=4)
    op = Augment([RandomPadCrop(pad), RandomFlip()], seed=3)
    params = op.draw(batch)
    shift, flip = params[0].shift, params[1].horizontal
    assert bool((shift == shift.round()).all()) and int(shift.abs().max()) == pad  # whole pixels, up to the pad
    assert len({tuple(r) for r in shift.int().tolist()}) > n // 2 and 0 < int(flip.sum()) < n  # the draws vary
    out = op.apply(batch, params)
    reference = _pad_crop_flip_loop(x, pad, shift, flip)
    if dtype == torch.uint8:
        assert torch.equal(out.inputs, reference)
    else:
        torch.testing.assert_close(out.inputs, reference, atol=1e-5, rtol=0)
    # The recorded affine is the whole transform: warping the loader's rows with it gives the same pixels.
    torch.testing.assert_close(warp(x.float(), out.affine).to(out.inputs.dtype) if dtype == torch.float32
                               else warp(x, out.affine), out.inputs, atol=1e-5, rtol=0)


def test_pad_crop_offsets_are_uniform_over_the_whole_pixels() -> None:
    t = RandomPadCrop(2)
    shift = t.sample(20_000, torch.Generator().manual_seed(0)).shift
    counts = torch.stack([torch.bincount((shift[:, k] + 2).long(), minlength=5) for k in range(2)])
    assert counts.shape == (2, 5) and bool((counts - 4000).abs().max() < 250)  # 5 values, 1/5 each (4 sigma)
    # float32 uniforms just below 1 stay in range; 0 gives the lowest offset
    edges = t.from_uniforms(torch.tensor([[0.0, 1.0 - 2.0 ** -24]])).shift
    assert edges.tolist() == [[-2.0, 2.0]]
    assert bool((RandomPadCrop(0).sample(5, torch.Generator()).shift == 0).all())
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"pad must be an integer >= 0 \\(pixels\\), got {bad!r}"):
            RandomPadCrop(bad)
