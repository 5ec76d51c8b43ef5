"""One definition per augmentation: the torch op and the DALI/FFCV numba kernels read the same draw table.

For fixed uniforms, every transform's parameters and matrices must agree between the torch reader
(``transform.from_uniforms``) and the loaders' reader (``regpipe.loaders._kernels``). The kernels need
numba only (a core dependency), so this runs without DALI or FFCV.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from regpipe.functional.augment import (
    ANGLE,
    CONSTANT,
    IDENTITY_VALUES,
    INTEGER,
    NUM_SLOTS,
    PIXEL_SHIFT_X,
    SIZE_X,
    UNIFORMS_PER_DRAW,
    WINDOW,
    WINDOW_TRIES,
    draw_table,
    integer,
    table_uniforms,
    uniform,
    values_from_uniforms,
)
from regpipe import Batch
from regpipe.loaders import _kernels as K
from regpipe.ops.augment import (
    AffineParams,
    Augment,
    RandomAffine,
    RandomBrightnessContrast,
    RandomFlip,
    RandomPadCrop,
    RandomResizedCrop,
    RandomTransform,
)

H, W = 12, 20  # non-square, so the pixel-frame conjugation of the affine is exercised

TRANSFORMS = {
    "flip": RandomFlip(horizontal=0.5, vertical=0.3),
    "crop": RandomResizedCrop(scale=(0.3, 1.0), ratio=(0.4, 2.5)),  # wide ratios: some tries do not fit
    "crop-fallback": RandomResizedCrop(scale=(0.9, 1.0), ratio=(4.0, 5.0)),  # no try fits: the whole image
    "pad-crop": RandomPadCrop(3),  # whole-pixel shifts: an INTEGER draw, read by both
    "affine": RandomAffine(degrees=30, translate=(0.1, 0.2), scale=(0.7, 1.3), shear=(10, 5)),
    "colour": RandomBrightnessContrast(brightness=(0.5, 1.5), contrast=(0.6, 1.4), center=128),
    "colour-mean": RandomBrightnessContrast(),
}


class RandomRotation(RandomTransform):
    """A transform added in one place (here): a draw table and the packing into its record."""

    geometric = True

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)

    def draws(self):
        return (uniform(ANGLE, -self.degrees, self.degrees),)

    def from_values(self, values: torch.Tensor) -> AffineParams:
        n = values.shape[0]
        return AffineParams(angle=values[:, ANGLE], scale=values.new_ones(n), translate=values.new_zeros(n, 2),
                            shear=values.new_zeros(n, 2))

    def matrix(self, params: AffineParams, height: int, width: int) -> torch.Tensor:
        return RandomAffine().matrix(params, height, width)


def uniforms(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """float64 uniforms with the edges 0 and just below 1 in the first rows."""
    u = torch.rand(n, count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u[0] = 0.0
    u[1] = 1.0 - 2.0 ** -53
    return u


def kernel_outputs(aug: Augment, u: torch.Tensor, include_original: bool = False):
    spec, count = K.encode_augment(aug)
    m = u.shape[0]
    theta, photo, pixels = np.empty((m, 2, 3)), np.empty((m, 3)), np.empty((m, 2, 3))
    K.augment_params(u.numpy(), spec, H, W, include_original, theta, photo, pixels)
    values = K.chain_values(u.numpy(), spec, len(aug.transforms))
    return torch.from_numpy(values), torch.from_numpy(theta), torch.from_numpy(photo)


def assert_records_equal(a, b) -> None:
    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if x.dtype == torch.bool:
            assert torch.equal(x, y), field.name
        else:
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12, msg=field.name)


@pytest.mark.parametrize("name", [*TRANSFORMS, "rotation"])
def test_torch_and_kernel_readers_give_the_same_parameters_and_matrices(name: str) -> None:
    t = TRANSFORMS.get(name) or RandomRotation(40)
    aug = Augment([t])
    u = uniforms(257, t.num_uniforms)
    values, theta, photo = kernel_outputs(aug, u)
    torch_params = t.from_uniforms(u)
    assert_records_equal(torch_params, t.from_values(values[:, 0]))  # the kernels' record of the same uniforms
    torch.testing.assert_close(values_from_uniforms(t.table, u), values[:, 0], atol=1e-12, rtol=1e-12)
    if t.geometric:
        torch.testing.assert_close(theta.float(), aug.matrix([torch_params], H, W), atol=1e-6, rtol=0)
        assert torch.equal(photo[:, :2], torch.ones(len(u), 2, dtype=torch.float64))
    else:
        assert torch.equal(theta, torch.eye(2, 3, dtype=torch.float64).expand(len(u), 2, 3))
        factors = torch.stack([torch_params.brightness, torch_params.contrast], -1)
        torch.testing.assert_close(photo[:, :2], factors, atol=1e-12, rtol=0)
        pivot = 128.0 if t.center is not None else K.MEAN_PIVOT
        assert bool((photo[:, 2] == pivot).all())


def test_every_transform_of_the_op_module_is_covered() -> None:
    # A new transform in regpipe.ops.augment must be added to TRANSFORMS, so the comparison above runs for it.
    covered = {type(t) for t in TRANSFORMS.values()} | {RandomRotation}
    declared = {cls for cls in RandomTransform.__subclasses__() if cls.__module__ == "regpipe.ops.augment"}
    assert declared <= covered, sorted(c.__name__ for c in declared - covered)


def test_the_crop_cases_reach_both_branches() -> None:
    u = uniforms(257, TRANSFORMS["crop"].num_uniforms)
    size = TRANSFORMS["crop"].from_uniforms(u).size
    assert bool((size < 1).all(1).any())  # windows found
    assert bool((TRANSFORMS["crop-fallback"].from_uniforms(u).size == 1).all())  # every row fell back


def test_a_whole_chain_agrees_with_the_kernels() -> None:
    chain = Augment([TRANSFORMS["flip"], TRANSFORMS["crop"], TRANSFORMS["affine"], TRANSFORMS["colour"]])
    assert K.encode_augment(chain)[1] == chain.num_uniforms == sum(t.num_uniforms for t in chain.transforms)
    u = uniforms(300, chain.num_uniforms, seed=1)
    values, theta, photo = kernel_outputs(chain, u, include_original=True)
    params = chain.from_uniforms(u)
    for i, (t, record) in enumerate(zip(chain.transforms, params)):
        assert_records_equal(record, t.from_values(values[:, i]))
    # include_original: copy 0 is untouched, the others are the chain's composed matrix and factors
    assert torch.equal(theta[0], torch.eye(2, 3, dtype=torch.float64)) and torch.equal(photo[0, :2], torch.ones(2))
    torch.testing.assert_close(theta[1:].float(), chain.matrix(params, H, W)[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(photo[1:, :2], torch.stack([params[3].brightness, params[3].contrast], -1)[1:],
                               atol=1e-12, rtol=0)


def test_sample_is_from_uniforms_of_fresh_uniforms() -> None:
    for t in TRANSFORMS.values():
        drawn = t.sample(64, torch.Generator().manual_seed(3))
        again = t.from_uniforms(torch.rand(64, t.num_uniforms, generator=torch.Generator().manual_seed(3)))
        assert_records_equal(drawn, again)
    chain = Augment(list(TRANSFORMS.values())[:4], seed=9)
    expected = chain.from_uniforms(torch.rand(10, chain.num_uniforms, generator=torch.Generator().manual_seed(9)))
    for a, b in zip(chain.sample(10, "cpu"), expected):
        assert_records_equal(a, b)


def test_float32_uniforms_on_the_torch_side_match_float64_kernels() -> None:
    # The torch op draws float32 uniforms: its parameters are the kernels' up to float32 rounding.
    t = TRANSFORMS["affine"]
    u = torch.rand(100, t.num_uniforms, generator=torch.Generator().manual_seed(4))
    values, theta, _ = kernel_outputs(Augment([t]), u.double())
    torch.testing.assert_close(t.from_uniforms(u).angle, values[:, 0, ANGLE].float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(Augment([t]).matrix([t.from_uniforms(u)], H, W), theta.float(), atol=1e-5, rtol=0)


def test_draw_tables_declare_their_uniform_counts() -> None:
    assert RandomFlip().num_uniforms == 2 and RandomAffine().num_uniforms == 6
    assert RandomResizedCrop().num_uniforms == UNIFORMS_PER_DRAW[WINDOW] == 2 * WINDOW_TRIES + 2
    assert RandomBrightnessContrast().num_uniforms == 2  # the pivot is a constant: no uniform
    table = draw_table([uniform(ANGLE, -1, 1), (CONSTANT, 0, 5.0, 0, 0, 0)])
    assert table.dtype == torch.float64 and table.shape == (2, 6) and table_uniforms(table) == 1
    values = values_from_uniforms(table, torch.full((3, 1), 0.5, dtype=torch.float64))
    assert values.shape == (3, NUM_SLOTS)
    expected = list(IDENTITY_VALUES)  # slots no row writes keep their identity values
    expected[0], expected[ANGLE] = 5.0, 0.0  # the constant; the middle of [-1, 1)
    assert values.tolist() == [expected] * 3


def test_bad_tables_and_uniforms_are_named() -> None:
    with pytest.raises(ValueError, match=r"6 values \[kind, slot, a, b, c, d\], got \[2, 6, 0.0\]"):
        draw_table([(2, 6, 0.0)])
    with pytest.raises(ValueError, match="unknown draw kind 7.0"):
        draw_table([(7, 0, 0, 0, 0, 0)])
    with pytest.raises(ValueError, match="writes slot 99.0"):
        draw_table([uniform(99, 0, 1)])
    with pytest.raises(ValueError, match="WINDOW draw writes SIZE_X"):
        draw_table([(WINDOW, SIZE_X + 1, 0.5, 1.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match=r"expected \(N, 6\) float uniforms for this draw table, got \(4, 5\)"):
        RandomAffine().from_uniforms(torch.rand(4, 5))
    with pytest.raises(ValueError, match=r"expected \(N, 8\) uniforms for this chain \(\[2, 6\] per transform\)"):
        Augment([RandomFlip(), RandomAffine()]).from_uniforms(torch.rand(4, 7))
    with pytest.raises(ValueError, match="n \\(rows\\) must be an integer >= 0, got -1"):
        Augment([RandomFlip()]).sample(-1, "cpu")


def test_the_kernels_reject_what_they_cannot_run() -> None:
    class Custom:  # a torch-only transform: no draw table
        geometric = False
        num_uniforms = 0

        def from_uniforms(self, u):
            return None

        def apply(self, x, params):
            return x

    with pytest.raises(TypeError, match="cannot run transform Custom: it has no draw table"):
        K.encode_augment(Augment([RandomFlip(), Custom()]))
    with pytest.raises(ValueError, match="one colour transform per chain; merge the 2"):
        K.encode_augment(Augment([RandomBrightnessContrast(), RandomBrightnessContrast()]))
    with pytest.raises(TypeError, match="regpipe Augment chain"):
        K.encode_augment([RandomFlip()])
    assert K.colour_pivot(K.encode_augment(Augment([RandomFlip()]))[0]) is None
    assert K.colour_pivot(K.encode_augment(Augment([RandomBrightnessContrast()]))[0]) == K.MEAN_PIVOT


def test_sized_crop_torch_reader_and_kernels_agree_across_frames() -> None:
    """A sized crop: the source's pixel aspect shifts the window's log aspect in both readers, transforms after the
    crop work in the output frame, and the pixel matrix is D_src theta D_out^-1."""
    aug = Augment([RandomFlip(), RandomResizedCrop(scale=(0.2, 1.0), ratio=(0.5, 2.0), size=(16, 24)),
                   RandomAffine(degrees=25, shear=(8, 4)), RandomBrightnessContrast(center=128)], seed=0)
    spec, count = K.encode_augment(aug)
    u = torch.rand(64, count, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hs, ws = 30, 70
    theta, photo, pixels = np.empty((64, 2, 3)), np.empty((64, 3)), np.empty((64, 2, 3))
    K.chain_params(u.numpy(), spec, hs, ws, 16, 24, True, False, theta, photo, pixels)
    params = aug.from_uniforms(u, aspect=hs / ws)
    torch.testing.assert_close(torch.from_numpy(theta), aug.matrix(params, hs, ws).double(), atol=1e-6, rtol=0)
    crop = params[1]
    pixel_aspect = crop.size[:, 0] * ws / (crop.size[:, 1] * hs)  # window width / height in source pixels
    fitted = (crop.size < 1).all(1)
    assert bool(fitted.any()) and bool(((pixel_aspect[fitted] >= 0.5 - 1e-9) & (pixel_aspect[fitted] <= 2.0 + 1e-9)).all())

    def frame(h: int, w: int) -> torch.Tensor:
        return torch.tensor([[w / 2, 0, w / 2], [0, h / 2, h / 2], [0, 0, 1]], dtype=torch.float64)

    full = torch.cat([torch.from_numpy(theta), torch.tensor([0.0, 0.0, 1.0]).expand(64, 1, 3).double()], 1)
    want = (frame(hs, ws) @ full @ torch.linalg.inv(frame(16, 24)))[:, :2]
    torch.testing.assert_close(torch.from_numpy(pixels), want)


@pytest.mark.parametrize("include_original", [False, True])
def test_a_chain_split_at_its_crop_composes_to_the_whole_chain(include_original: bool) -> None:
    """The replication chain on top of the ImageNet crop: the crop part (source -> output size) composed with the
    rest (at the output size) is the whole chain's matrix, and the colour factors are the whole chain's."""
    crop = [RandomResizedCrop(scale=(0.2, 1.0), size=(16, 24)), RandomFlip(vertical=0.5)]
    rest = [RandomAffine(degrees=25, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=(8, 4)),
            RandomBrightnessContrast(center=128)]
    aug = Augment(crop + rest)
    spec, count = K.encode_augment(aug)
    assert K.crop_split(spec) == (len(K.encode_augment(Augment(crop))[0]), Augment(crop).num_uniforms)
    rows, uniforms = K.crop_split(spec)
    u = np.random.default_rng(4).random((16, count))
    theta, photo, pixels = np.empty((16, 2, 3)), np.empty((16, 3)), np.empty((16, 2, 3))
    K.chain_params(u, spec, 30, 70, 16, 24, True, include_original, theta, photo, pixels)
    crops, rests, parts_photo, rest_pixels = (np.empty((16, 2, 3)), np.empty((16, 2, 3)), np.empty((16, 3)),
                                              np.empty((16, 2, 3)))
    K.crop_rest_params(u, spec, rows, uniforms, 30, 70, 16, 24, True, include_original, crops, rests, parts_photo,
                       rest_pixels)
    composed = np.empty((16, 2, 3))
    K.compose_copies(crops, rests, composed)
    np.testing.assert_allclose(composed, theta, atol=1e-12)
    np.testing.assert_allclose(parts_photo, photo, atol=1e-12)
    assert np.all(crops[:, 0, 1] == 0) and np.all(crops[:, 1, 0] == 0)  # the crop part is a window (and flips)
    assert (np.abs(rests[int(include_original):, 0, 1]) > 0).all()  # the rest rotates/shears
    back = np.empty((16, 2, 3))
    K.pixel_matrices(rests, 16, 24, 16, 24, back)
    np.testing.assert_allclose(back, rest_pixels)


@pytest.mark.parametrize("chain, split", [
    ([RandomResizedCrop(size=8), RandomFlip()], False),  # crops and flips: a resize per copy, nothing to split
    ([RandomAffine(degrees=5), RandomResizedCrop(size=8)], False),  # the rotation comes first: one warp
    ([RandomFlip(), RandomAffine(degrees=5)], False),  # no crop window leads
    ([RandomResizedCrop(size=8), RandomAffine(degrees=5), RandomResizedCrop()], False),  # a second window
    ([RandomBrightnessContrast(), RandomResizedCrop(size=8), RandomAffine(scale=(0.9, 1.1))], True),
])
def test_crop_split_needs_a_leading_crop_and_a_rest_without_windows(chain: list, split: bool) -> None:
    assert (K.crop_split(K.encode_augment(Augment(chain))[0]) is not None) == split


def test_sized_replicate_op_outputs_the_crop_size_and_records_the_crop() -> None:
    from regpipe import Batch
    from regpipe.ops.augment import Replicate

    x = torch.rand(2, 3, 30, 50)
    seeds = Batch.from_labels(x, torch.arange(2), 2)
    aug = Augment([RandomResizedCrop(scale=(0.3, 1.0), size=(12, 16))], seed=1)
    out = Replicate(3, aug)(seeds)
    assert out.inputs.shape == (6, 3, 12, 16) and out.source_ids.tolist() == [0, 0, 0, 1, 1, 1]
    grid = torch.nn.functional.affine_grid(out.affine, [6, 3, 12, 16], align_corners=False)
    ref = torch.nn.functional.grid_sample(x[out.source_ids], grid, align_corners=False)
    torch.testing.assert_close(out.inputs, ref)  # the recorded affine is the whole transform, crop included
    with pytest.raises(ValueError, match="resizes once"):
        Augment([RandomResizedCrop(size=8), RandomResizedCrop(size=8)])
    with pytest.raises(ValueError, match="size must be a positive int"):
        RandomResizedCrop(size=(0, 4))


def test_the_base_chain_in_the_kernels_gives_the_torch_matrices_and_pixels() -> None:
    """The CIFAR base (pad-crop, flip) encoded for DALI/FFCV: for the same uniforms, the kernels' matrices are the
    op's (``from_uniforms`` then ``matrix``) and their uint8 warp makes the op's pixels (whole-pixel moves)."""
    aug = Augment([RandomPadCrop(4), RandomFlip()], seed=0)
    spec, count = K.encode_augment(aug)
    assert count == aug.num_uniforms == 4
    assert not K.axis_aligned(spec) and K.crop_split(spec) is None  # windows may leave the frame: one warp per copy
    u = uniforms(64, count, seed=5)
    theta, photo, pixels = np.empty((64, 2, 3)), np.empty((64, 3)), np.empty((64, 2, 3))
    K.chain_params(u.numpy(), spec, H, W, H, W, False, False, theta, photo, pixels)
    params = aug.from_uniforms(u)
    torch.testing.assert_close(torch.from_numpy(theta).float(), aug.matrix(params, H, W), atol=1e-6, rtol=0)
    assert np.all(photo[:, :2] == 1.0)
    images = torch.randint(0, 256, (64, 3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch_rows = aug.apply(Batch.from_labels(images, torch.zeros(64, dtype=torch.long), 2), params).inputs
    for i in range(64):
        dst = np.empty((1, H, W, 3), dtype=np.uint8)
        K.replicate_sample(images[i].permute(1, 2, 0).contiguous().numpy(), theta[i:i + 1], photo[i:i + 1], dst)
        assert np.array_equal(dst[0], torch_rows[i].permute(1, 2, 0).numpy()), i


def test_integer_draws_need_integer_bounds() -> None:
    assert table_uniforms([integer(PIXEL_SHIFT_X, -3, 3)]) == UNIFORMS_PER_DRAW[INTEGER] == 1
    with pytest.raises(ValueError, match=r"INTEGER draw needs integer bounds low <= high, got \[0.5, 2.0\]"):
        draw_table([(INTEGER, PIXEL_SHIFT_X, 0.5, 2.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match=r"got \[3.0, -3.0\]"):
        draw_table([integer(PIXEL_SHIFT_X, 3, -3)])
