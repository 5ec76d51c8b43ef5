"""ImageNet-style use of the DALI and FFCV adapters, with the real libraries on CPU and small JPEG folders of varied
sizes: per-copy random-resized crops at decode resolution, seed ids from the readers, mixing across seeds, and
the fused device stage (counted) in every adapter."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from jpegfolder import SIZES, make_jpeg_folder, sample_source
from regpipe.functional.invariance import invariance_loss
from regpipe.kernels import FusedMix
from regpipe.loaders.file_index import FileIndex, path_hash
from regpipe.loaders.torch import TorchLoader
from regpipe.ops.augment import Augment, RandomFlip, RandomResizedCrop
from regpipe.core.mix_plan import MixPlan
from regpipe.functional import mix_sources
from regpipe.ops.sum_mix import GradualSumMix, SumMix, mix_batch

OUT = (24, 32)
M, S = 3, 4


def chain() -> Augment:
    return Augment([RandomResizedCrop(scale=(0.25, 1.0), size=OUT), RandomFlip()], seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("jpegs")
    return root, dict(make_jpeg_folder(root))


def check_copies_map_back(batch, index: FileIndex, decoded: dict[str, np.ndarray], max_err: float = 4.0,
                          mean_err: float = 1.0) -> None:
    """Every row, read back through its recorded affine from its source image, is the row (interpolation error)."""
    assert batch.inputs.shape[-2:] == OUT
    for r in range(batch.size):
        source = decoded[index.paths[int(batch.source_ids[r])]]
        ref, inside = sample_source(source, batch.affine[r], OUT)
        assert float(inside.float().mean()) > 0.5
        err = (batch.inputs[r].float() - ref).abs()[:, inside]
        assert float(err.max()) <= max_err and float(err.mean()) < mean_err, (r, float(err.max()), float(err.mean()))


def check_distinct_copies(batch) -> None:
    for s in range(batch.size // M):
        theta = batch.affine[s * M:(s + 1) * M].reshape(M, -1)
        assert torch.cdist(theta, theta).add(torch.eye(M)).min() > 1e-3  # m independent crops per image


# ------------------------------------------------------------------------------------------------ file index

def test_file_index_ids_labels_and_hash(folder) -> None:
    root, decoded = folder
    index = FileIndex(root)
    assert index.paths == sorted(decoded) and index.classes == ("cat", "dog")
    assert index.labels.tolist() == [0 if p.startswith("cat/") else 1 for p in index.paths]
    # FNV-1a 64 of b"a": the published test vector
    assert path_hash("a") == 0xAF63DC4C8601EC8C
    assert [index.id_of(p) for p in index.paths] == list(range(len(index)))
    with pytest.raises(KeyError, match="cat/missing.jpg"):
        index.id_of("cat/missing.jpg")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FileIndex(root / "nowhere")


def test_file_index_keeps_bytes_and_its_ids_survive_subset_and_pickle(folder) -> None:
    import pickle

    from regpipe.engine.datasets import ImageFolderDataset

    root, _ = folder
    index = FileIndex(root)
    assert index.names.dtype.kind == "S" and index.path(1) == str(root / index.paths[1])
    sub = index.subset([3, 0])
    assert list(sub.paths) == [index.paths[3], index.paths[0]] and sub.id_of(index.paths[0]) == 1
    copy = pickle.loads(pickle.dumps(ImageFolderDataset(index, 8, train=False))).index  # as DataLoader workers get it
    assert [copy.id_of(p) for p in index.paths] == list(range(len(index)))


# ------------------------------------------------------------------------------------------------ DALI

@pytest.fixture(autouse=True)
def _libraries(request: pytest.FixtureRequest) -> None:
    """DALI tests skip without DALI, FFCV tests without FFCV (the torch tests always run)."""
    if "dali" in request.node.name:
        pytest.importorskip("nvidia.dali")
    if "ffcv" in request.node.name:
        pytest.importorskip("ffcv")


def dali_pipe(root: Path, index: FileIndex | None, batch_size: int = S, augment: Augment | None = None,
              with_ids: bool = True, tail=None):
    from nvidia.dali import fn, pipeline_def

    from regpipe.loaders.dali import replicate, sample_ids

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=None, seed=3)
    def pipe():
        jpegs, labels = fn.readers.file(file_root=str(root), name="reader", random_shuffle=True, seed=1)
        images = fn.decoders.image(jpegs, device="cpu")  # varied sizes
        rep = replicate(images, M, augment or chain(), include_original=False)
        copies = rep.images if tail is None else tail(rep.images)
        if not with_ids:
            return copies, labels, rep.theta
        return copies, labels, sample_ids(jpegs, index), rep.theta

    return pipe()


def test_dali_per_copy_crops_from_varied_jpegs_map_back_with_reader_ids(folder) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, decoded = folder
    index = FileIndex(root)
    loader = DaliLoader(dali_pipe(root, index), 2, ["images", "labels", "ids", "theta"], reader_name="reader",
                        keep_uint8=True)
    seen = []
    for batch in loader:
        assert batch.inputs.shape == (S * M, 3, *OUT) and batch.inputs.dtype == torch.uint8
        ids = batch.source_ids.view(S, M)
        assert bool((ids == ids[:, :1]).all())  # every copy has its source's id
        assert torch.equal(batch.targets.argmax(1), torch.from_numpy(index.labels)[batch.source_ids])
        check_copies_map_back(batch, index, decoded)
        check_distinct_copies(batch)
        seen += ids[:, 0].tolist()
    assert sorted(seen) == list(range(len(SIZES)))  # one pass reads every image once, under its own id


def test_dali_invariance_loss_of_replicated_batch_is_positive(folder) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, _ = folder
    loader = DaliLoader(dali_pipe(root, FileIndex(root)), 2, ["images", "labels", "ids", "theta"],
                        reader_name="reader")
    batch = next(iter(loader))
    acts = batch.inputs.flatten(1)
    loss = invariance_loss(acts, batch.source_ids)
    assert 0.0 < float(loss) < 1.0  # copies of one image differ less than different images
    with pytest.raises(ValueError, match="share a seed"):  # positional ids: no copies to compare
        invariance_loss(acts, torch.arange(batch.size))


def test_dali_replication_without_ids_is_an_error_naming_it(folder) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, _ = folder
    loader = DaliLoader(dali_pipe(root, None, with_ids=False), 2, ["images", "labels", "theta"], reader_name="reader")
    with pytest.raises(ValueError, match="no 'ids' output.*sample_ids"):
        next(iter(loader))


def test_dali_ids_unknown_to_the_index_are_an_error(folder, tmp_path: Path) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, _ = folder
    other = tmp_path / "other"
    make_jpeg_folder(other, sizes=SIZES[:2])
    (other / "cat" / "img00.jpg").rename(other / "cat" / "renamed.jpg")
    loader = DaliLoader(dali_pipe(root, FileIndex(other), batch_size=2), 2, ["images", "labels", "ids", "theta"],
                        reader_name="reader")
    with pytest.raises(ValueError, match="'ids' is -1.*not in the FileIndex"):
        for _ in loader:
            pass


# A pipeline that converts its images to float itself, and what regpipe says of it (mean/std, keep_uint8).
FLOAT_TAILS = {
    "0..255 floats": (lambda x: x * 1.0, {"mean": [0.5] * 3, "std": [0.25] * 3}, "0..1 pixel scale"),
    "0..255 floats, no mean/std": (lambda x: x * 1.0, {}, "0..1 pixel scale"),
    "normalised": (lambda x: (x - 128.0) / 64.0, {"mean": [0.5] * 3, "std": [0.25] * 3}, "normalised already"),
    "keep_uint8": (lambda x: x / 255.0, {"keep_uint8": True}, "keep_uint8=True expects the decoded uint8"),
}


@pytest.mark.parametrize("case", list(FLOAT_TAILS))
def test_dali_float_images_where_uint8_is_expected_are_named(folder, case: str) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, _ = folder
    tail, options, message = FLOAT_TAILS[case]
    loader = DaliLoader(dali_pipe(root, FileIndex(root), tail=tail), 2, ["images", "labels", "ids", "theta"],
                        reader_name="reader", **options)
    with pytest.raises(ValueError, match=f"the DALI pipeline.*{message}|{message}"):
        next(iter(loader))


def test_dali_float_images_in_0_1_are_accepted(folder) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, _ = folder
    loader = DaliLoader(dali_pipe(root, FileIndex(root), tail=lambda x: x / 255.0), 2,
                        ["images", "labels", "ids", "theta"], reader_name="reader", mean=[0.5] * 3, std=[0.25] * 3)
    batch = next(iter(loader))
    assert batch.inputs.dtype == torch.float32 and -2.0 - 1e-5 <= float(batch.inputs.min())
    assert float(batch.inputs.max()) <= 2.0 + 1e-5  # (x - 0.5) / 0.25 of 0..1 pixels, normalised once


def check_mixed_across_seeds(batch, k: int) -> None:
    """Every mixed row reads copy j of k different seeds (the loader's copies, declared: Batch.replicas = M)."""
    seeds, copies = batch.mixing.source_ids, batch.mixing.sources % M
    assert all(len(set(row)) == k for row in seeds.tolist())
    assert torch.equal(copies, copies[:, :1].expand_as(copies))


def test_dali_group_mix_after_replication_mixes_distinct_seeds_fused(folder) -> None:
    from regpipe.loaders.dali import DaliLoader

    root, _ = folder
    op = SumMix(groups=2, seed=0)
    loader = DaliLoader(dali_pipe(root, FileIndex(root)), 2, ["images", "labels", "ids", "theta"],
                        reader_name="reader", mean=[0.5] * 3, std=[0.25] * 3, ops=[op])
    batch = next(iter(loader))
    assert loader.builder.ran["fused_mix[numba]"] == 1  # the fused kernel ran
    assert batch.size == S * M // 2 and batch.replicas == 1
    check_mixed_across_seeds(batch, 2)
    for j in range(M):  # group mode: each copy index mixes disjoint seed pairs
        rows = batch.mixing.source_ids[batch.mixing.sources[:, 0] % M == j]
        assert len(set(rows.flatten().tolist())) == rows.numel()


def test_dali_crop_then_rotation_resizes_the_crop_then_warps_it_from_the_given_uniforms(folder) -> None:
    """The replication chain on top of the ImageNet crop in DALI: the crop's ROI resize (as the crop + flip chain
    alone gives it, from the same uniforms), then the rotation as one ``warp_affine`` of the crops, zeros outside;
    the copies are drawn from the uniforms fed to the pipeline, whatever DALI's own seed."""
    from nvidia.dali import fn, pipeline_def

    from regpipe.loaders.dali import replicate
    from regpipe.ops.augment import warp_to

    root, _ = folder
    full = rotation_on_crop()
    crop_chain = Augment(full.transforms[:2])
    p = crop_chain.num_uniforms
    rng = np.random.default_rng(0)
    uniforms = [rng.random((1, full.num_uniforms)).astype(np.float32) for _ in range(S)]

    def outputs(seed: int) -> list[torch.Tensor]:
        @pipeline_def(batch_size=S, num_threads=1, device_id=None, seed=seed)
        def pipe():
            jpegs, _ = fn.readers.file(file_root=str(root), name="reader")
            images = fn.decoders.image(jpegs, device="cpu")
            u = fn.external_source(source=lambda: uniforms, batch=True)
            a = replicate(images, 1, crop_chain, include_original=False, uniforms=u[:, 0:p])
            b = replicate(images, 1, full, include_original=False, uniforms=u)
            return a.images, a.theta, b.images, b.theta, b.uniforms

        built = pipe()
        built.build()
        return [torch.from_numpy(np.stack([np.array(x) for x in out])) for out in built.run()]

    crops, crop_theta, rotated, theta, u = outputs(seed=1)
    assert torch.equal(u, torch.from_numpy(np.stack(uniforms)))
    assert all(torch.equal(x, y) for x, y in zip((crops, rotated), outputs(seed=2)[::2]))  # DALI's seed unused
    rest = crop_then_rest(crop_theta.reshape(S, 2, 3), theta.reshape(S, 2, 3))
    assert float(rest[:, 0, 1].abs().min()) > 1e-4  # every copy rotated
    want = warp_to(crops[:, 0].permute(0, 3, 1, 2), rest.float(), OUT)  # grid_sample of the crop, zeros outside
    diff = (rotated[:, 0].permute(0, 3, 1, 2).int() - want.int()).abs()
    assert int(diff.max()) <= 2 and float((diff > 0).float().mean()) < 0.05, (int(diff.max()), float((diff > 0).float().mean()))


# ------------------------------------------------------------------------------------------------ FFCV


@pytest.fixture(scope="module", params=["raw", "jpg"])
def beton(folder, request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FileIndex]:
    from regpipe.loaders.ffcv import write_image_folder

    root, _ = folder
    return write_image_folder(root, tmp_path_factory.mktemp("beton") / "train.beton", jpeg_quality=98,
                              write_mode=request.param)


def ffcv_loader(path: Path, decoder, batch_size: int = S, with_indices: bool = True, image_tail: tuple = ()):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from regpipe.loaders.ffcv import WithIndices

    labels = [IntDecoder(), WithIndices(), ToTensor()] if with_indices else [IntDecoder(), ToTensor()]
    return Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.RANDOM, seed=0,
                  pipelines={"image": [decoder, *image_tail, ToTensor()], "label": labels})


def test_ffcv_decoder_crops_each_decoded_image_m_times_with_indices_as_ids(folder, beton) -> None:
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder

    _, decoded = folder
    path, index = beton
    assert list(ffcv_loader(path, ReplicatedCropDecoder(M, chain(), seed=1)).reader.handlers) == ["image", "label"]
    decoder = ReplicatedCropDecoder(M, chain(), seed=1)
    loader = FfcvLoader(ffcv_loader(path, decoder), 2, replicate=decoder, keep_uint8=True)
    epochs = []
    for _ in range(2):
        seen = []
        for batch in loader:
            assert batch.inputs.shape == (S * M, 3, *OUT)
            ids = batch.source_ids.view(S, M)
            assert bool((ids == ids[:, :1]).all())
            assert torch.equal(batch.targets.argmax(1), torch.from_numpy(index.labels)[batch.source_ids])
            # raw: the pixels pillow decoded; jpg: FFCV re-encoded them (cv2, 4:2:0 chroma), which adds its error
            jpeg = loader.loader.reader.metadata["f0"]["mode"][0] == 0
            check_copies_map_back(batch, index, decoded, *((24.0, 3.0) if jpeg else (4.0, 1.0)))
            check_distinct_copies(batch)
            seen.append(batch)
        assert sorted(torch.cat([b.source_ids[::M] for b in seen]).tolist()) == list(range(len(SIZES)))
        epochs.append(seen)
    assert not torch.equal(epochs[0][0].affine, epochs[1][0].affine)  # new crops every epoch


def test_ffcv_replication_without_indices_is_an_error_naming_the_fix(beton) -> None:
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder

    path, _ = beton
    decoder = ReplicatedCropDecoder(M, chain())
    with pytest.raises(ValueError, match="no sample indices.*WithIndices"):
        FfcvLoader(ffcv_loader(path, decoder, with_indices=False), 2, replicate=decoder)


def test_ffcv_decoder_needs_a_sized_crop() -> None:
    from regpipe.loaders.ffcv import ReplicatedCropDecoder

    with pytest.raises(ValueError, match="RandomResizedCrop\\(size="):
        ReplicatedCropDecoder(M, Augment([RandomFlip()]))
    with pytest.raises(ValueError, match="m \\(copies per image\\)"):
        ReplicatedCropDecoder(0, chain())


@pytest.mark.parametrize("case", ["normalised", "0..255 floats", "keep_uint8"])
def test_ffcv_float_images_where_uint8_is_expected_are_named(beton, case: str) -> None:
    """ffcv-imagenet's CPU tail (NormalizeImage: float32, normalised) or a cast to float before regpipe."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import NormalizeImage

    from regpipe.loaders.ffcv import FfcvLoader

    path, _ = beton
    mean, std = np.array([0.5, 0.5, 0.5]), np.array([0.25, 0.25, 0.25])
    tails = {"normalised": (NormalizeImage(mean * 255, std * 255, np.float32),),
             "0..255 floats": (NormalizeImage(np.zeros(3), np.ones(3), np.float32),),
             "keep_uint8": (NormalizeImage(np.zeros(3), np.full(3, 255.0), np.float32),)}
    _, options, message = FLOAT_TAILS[case]
    loader = FfcvLoader(ffcv_loader(path, RandomResizedCropRGBImageDecoder(OUT), image_tail=tails[case]), 2,
                        **options)
    with pytest.raises(ValueError, match=f"the FFCV pipeline.*{message}|{message}"):
        next(iter(loader))


@pytest.mark.parametrize("mode", ["group", "permute"])
def test_ffcv_gradual_mix_after_replication_is_fused_normalised_and_across_seeds(beton, mode: str) -> None:
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder

    path, _ = beton
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    decoder = ReplicatedCropDecoder(M, chain(), seed=2)
    op = GradualSumMix(k0=2, gradual_steps=10, mode=mode, seed=0)
    op.step_count = 4  # mid-schedule: two unequal weights
    loader = FfcvLoader(ffcv_loader(path, decoder), 2, replicate=decoder, mean=mean, std=std, ops=[op],
                        keep_uint8=True)
    batch = next(iter(loader))
    assert loader.builder.ran["fused_mix[numba]"] == 1
    assert batch.size == (S * M // 2 if mode == "group" else S * M)
    check_mixed_across_seeds(batch, 2)
    # normalised (mean/std applied, not 0..255 values): within the normalised range of 0..255 pixels
    lo = min((0 - m) / s for m, s in zip(mean, std))
    hi = max((1 - m) / s for m, s in zip(mean, std))
    assert lo - 1e-4 <= float(batch.inputs.min()) and float(batch.inputs.max()) <= hi + 1e-4


# FFCV decoder: crop + flip chains as FFCV's own C resize of whole-pixel windows, reproducible per epoch


@pytest.fixture(scope="module")
def raw_beton(folder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FileIndex]:
    """The JPEG folder's decoded pixels stored raw (no re-encoding: the pixels the decoder resizes are known)."""
    from regpipe.loaders.ffcv import write_image_folder

    root, _ = folder
    return write_image_folder(root, tmp_path_factory.mktemp("raw") / "train.beton", write_mode="raw")


def crop_flip_chain(colour: bool = False) -> Augment:
    from regpipe.ops.augment import RandomBrightnessContrast

    tail = [RandomBrightnessContrast(brightness=(0.7, 1.3), contrast=(0.7, 1.3))] if colour else []
    return Augment([RandomResizedCrop(size=OUT), RandomFlip(horizontal=0.5, vertical=0.5), *tail])


def pixel_window(theta: torch.Tensor, height: int, width: int) -> np.ndarray:
    """``[row start, row end, column start, column end]`` source pixel edges of an axis-aligned matrix."""
    t = theta.double()
    return np.array([(t[1, 2] - t[1, 1].abs() + 1) * height / 2, (t[1, 2] + t[1, 1].abs() + 1) * height / 2,
                     (t[0, 2] - t[0, 0].abs() + 1) * width / 2, (t[0, 2] + t[0, 0].abs() + 1) * width / 2])


def interpolation_bound(source: np.ndarray, window: np.ndarray) -> float:
    """Largest difference allowed between FFCV's resize of ``window`` (``[r0, r1, c0, c1]``) of ``source`` to ``OUT``
    and bilinear sampling of ``source`` at the same points, per axis with ``s`` source pixels per output pixel.

    Where the window grows (``s < 1``), OpenCV's ``INTER_AREA`` spreads each source pixel over its output
    pixels: it weighs the same two neighbours as bilinear sampling, with weights at most ``(1 - s) / 2``
    apart, so it adds at most ``(1 - s) / 2`` of the largest step ``g`` between neighbours along that axis.
    Where it shrinks, it averages the footprint (``s`` pixels wide): against the point sample that is
    ``s^2 / 24`` of the largest second difference ``c`` (the box's variance ``s^2 / 12`` times ``c / 2``),
    plus ``c / 8`` for bilinear sampling's own error between pixel centres. Plus 1 for the roundings.
    """
    x = source.astype(np.float64)
    scales = (window[1] - window[0]) / OUT[0], (window[3] - window[2]) / OUT[1]
    bound = 1.0
    for axis, s in enumerate(scales):
        g = np.abs(np.diff(x, axis=axis)).max()
        c = np.abs(np.diff(x, n=2, axis=axis)).max()
        bound += 0.5 * (1.0 - s) * g if s < 1.0 else (s * s / 24.0 + 1.0 / 8.0) * c
    return float(bound)


def test_ffcv_crop_flip_copies_resize_whole_pixel_windows_the_recorded_affine_describes(folder, raw_beton) -> None:
    from regpipe.loaders import _kernels as K
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder

    _, decoded = folder
    path, index = raw_beton
    decoder = ReplicatedCropDecoder(M, crop_flip_chain(), seed=5)
    assert decoder.axis_aligned
    loader = FfcvLoader(ffcv_loader(path, decoder), 2, replicate=decoder, keep_uint8=True)
    flips, mixed, warp_errors = np.zeros(2), 0, []
    for batch in loader:
        for r in range(batch.size):
            source = decoded[index.paths[int(batch.source_ids[r])]]
            height, width = source.shape[:2]
            theta = batch.affine[r]
            assert float(theta[0, 1]) == 0.0 and float(theta[1, 0]) == 0.0
            edges = pixel_window(theta, height, width)
            np.testing.assert_allclose(edges, np.round(edges), atol=1e-3)  # whole source pixels
            r0, r1, c0, c1 = np.round(edges)
            assert 0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width
            flips += [float(theta[0, 0]) < 0, float(theta[1, 1]) < 0]
            mixed += (r1 - r0 > OUT[0]) != (c1 - c0 > OUT[1])  # shrinks along one axis, grows along the other
            bound = interpolation_bound(source, edges)
            ref, _ = sample_source(source, theta, OUT)  # grid_sample of the recorded affine
            err = (batch.inputs[r].float() - ref).abs()
            assert float(err.max()) <= bound and float(err.mean()) < 1.5, (r, float(err.max()), bound)
            warped = np.empty((*OUT, 3), dtype=np.uint8)
            K.warp_u8(np.ascontiguousarray(source), theta.double().numpy(), warped)  # the general path's pixels
            warp_err = (batch.inputs[r].permute(1, 2, 0).float() - torch.from_numpy(warped).float()).abs()
            assert float(warp_err.max()) <= bound + 1.0, (r, float(warp_err.max()), bound)
            warp_errors.append(float(warp_err.mean()))
    assert flips.min() >= 1 and mixed >= 1  # both flips and the one-axis-at-a-time resize were exercised
    assert float(np.mean(warp_errors)) < 1.5


def test_ffcv_crop_flip_colour_is_applied_to_the_resized_pixels(raw_beton) -> None:
    from regpipe.functional.augment import brightness_contrast
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder

    path, _ = raw_beton
    # one copy: the colour transform's uniforms come after the crop's and flip's, so both draw the same windows
    plain, coloured = (ReplicatedCropDecoder(1, crop_flip_chain(colour), seed=6) for colour in (False, True))
    assert coloured.axis_aligned
    a, b = (next(iter(FfcvLoader(ffcv_loader(path, d), 2, replicate=d, keep_uint8=True))) for d in (plain, coloured))
    assert torch.equal(a.source_ids, b.source_ids) and torch.equal(a.affine, b.affine)
    assert not torch.equal(b.photometric, torch.ones_like(b.photometric))
    want = brightness_contrast(a.inputs, b.photometric[:, 0], b.photometric[:, 1])  # pivot: each copy's mean
    assert int((b.inputs.int() - want.int()).abs().max()) <= 1


def crop_then_rest(crop: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``(N, 2, 3)`` matrices ``R`` with ``whole = crop o R``: what the chain does after its crop (output -> crop frame)."""
    def square(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.double(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(len(t), 1, 3)], 1)

    return (torch.linalg.inv(square(crop)) @ square(whole))[:, :2]


def rotation_on_crop(affine_first: bool = False) -> Augment:
    from regpipe.ops.augment import RandomAffine

    crop, rest = [RandomResizedCrop(scale=(0.25, 1.0), size=OUT), RandomFlip()], [RandomAffine(degrees=20)]
    return Augment(rest + crop if affine_first else crop + rest)


def test_ffcv_crop_then_rotation_resizes_the_crop_then_warps_it(raw_beton) -> None:
    """The replication chain on top of the ImageNet crop: FFCV's resize of the crop (as the crop + flip chain alone
    gives it), then the rotation as a bilinear warp of that crop, zeros outside it."""
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder
    from regpipe.ops.augment import warp_to

    path, _ = raw_beton
    crop_chain = Augment(rotation_on_crop().transforms[:2])
    crop, rotated = ReplicatedCropDecoder(1, crop_chain, seed=1), ReplicatedCropDecoder(1, rotation_on_crop(), seed=1)
    assert crop.axis_aligned and not rotated.axis_aligned
    assert rotated.split == (len(crop.spec), crop_chain.num_uniforms)
    # one copy: the rotation's uniforms come after the crop's and flip's, so both draw the same windows
    a, b = (next(iter(FfcvLoader(ffcv_loader(path, d), 2, replicate=d, keep_uint8=True))) for d in (crop, rotated))
    assert torch.equal(a.source_ids, b.source_ids)
    rest = crop_then_rest(a.affine, b.affine)
    assert float(rest[:, 0, 1].abs().min()) > 1e-4  # every copy rotated
    np.testing.assert_allclose(rest[:, :, :2].det().numpy(), 1.0, atol=1e-4)  # a rotation (the record composes)
    want = warp_to(a.inputs, rest.float(), OUT)  # grid_sample of the crop, zeros outside, rounded
    assert int((b.inputs.int() - want.int()).abs().max()) <= 1


def test_ffcv_rotation_before_the_crop_warps_each_copy_from_the_decoded_image(folder, raw_beton) -> None:
    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder

    _, decoded = folder
    path, index = raw_beton
    decoder = ReplicatedCropDecoder(M, rotation_on_crop(affine_first=True), seed=1)
    assert not decoder.axis_aligned and decoder.split is None
    batch = next(iter(FfcvLoader(ffcv_loader(path, decoder), 2, replicate=decoder, keep_uint8=True)))
    assert batch.replicas == M
    assert float(batch.affine[:, 0, 1].abs().max()) > 0.01  # rotated
    check_copies_map_back(batch, index, decoded)  # bilinear warp: the tolerance of the grid_sample reference


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf = [np.searchsorted(np.sort(x), grid, side="right") / len(x) for x in (a, b)]
    return float(np.abs(cdf[0] - cdf[1]).max())


def test_ffcv_single_crop_decoder_draws_ffcvs_imagenet_crop_and_fair_flips(tmp_path: Path) -> None:
    from ffcv.fields.rgb_image import get_random_crop

    from regpipe.loaders.ffcv import ReplicatedCropDecoder, write_image_folder

    sizes = ((256, 256), (240, 300), (300, 240), (270, 330))  # aspects inside [3/4, 4/3]: both fall back to all
    make_jpeg_folder(tmp_path / "big", sizes=sizes)
    path, index = write_image_folder(tmp_path / "big", tmp_path / "big.beton")
    decoder = ReplicatedCropDecoder(1, Augment([RandomResizedCrop(size=(32, 32)), RandomFlip()]), seed=7)
    ffcv_loader(path, decoder)  # the decoder reads the images' sizes from the loader
    epochs = 1000
    theta = torch.stack([decoder.params(np.arange(len(sizes)), epoch=e)[0] for e in range(epochs)])  # (E, 4, 2, 3)
    hw = np.stack(decoder.source_sizes(np.arange(len(sizes))), 1)  # (4, [height, width]) from the .beton
    state = np.random.get_state()
    np.random.seed(0)
    try:  # FFCV's own draw (numpy's global generator): the reference
        ref = np.array([[get_random_crop(h, w, (0.08, 1.0), (3 / 4, 4 / 3)) for h, w in hw] for _ in range(epochs)])
    finally:
        np.random.set_state(state)
    ours = np.stack([np.stack([pixel_window(theta[e, i], *hw[i]) for i in range(len(sizes))])
                     for e in range(epochs)])  # (E, 4, [r0, r1, c0, c1])
    np.testing.assert_allclose(ours, np.round(ours), atol=1e-3)
    h, w = ours[..., 1] - ours[..., 0], ours[..., 3] - ours[..., 2]
    area = h * w / hw.prod(1)
    # the recipe, up to the half-pixel rounding of each window edge
    assert area.max() <= 1.0 and area.min() >= 0.08 - hw.sum(1).max() / hw.prod(1).min()
    assert (np.abs(np.log(w / h)) <= np.log(4 / 3) + 1 / (w - 1) + 1 / (h - 1)).all()
    ref_h, ref_w = ref[..., 2], ref[..., 3]
    centre_y = (ours[..., 0] + ours[..., 1]) / 2 / hw[:, 0]  # window centre, fraction of the source
    ref_centre_y = (ref[..., 0] + ref_h / 2) / hw[:, 0]
    # two-sample KS at alpha = 0.001: 1.95 * sqrt(2 / n), n = 4000 draws each
    critical = 1.95 * math.sqrt(2 / area.size)
    assert ks_distance(area.ravel(), (ref_h * ref_w / hw.prod(1)).ravel()) < critical
    assert ks_distance(np.log(w / h).ravel(), np.log(ref_w / ref_h).ravel()) < critical
    assert ks_distance(centre_y.ravel(), ref_centre_y.ravel()) < critical
    flipped = (theta[..., 0, 0] < 0).double().mean().item()
    assert abs(flipped - 0.5) < 5 * math.sqrt(0.25 / area.size)  # five binomial standard deviations
    assert torch.equal(theta[..., 1, 1] > 0, torch.ones(epochs, len(sizes), dtype=torch.bool))  # no vertical flip


@pytest.mark.parametrize("index_field", [True, False])
def test_ffcv_beton_train_loader_redraws_an_epochs_crops_in_a_fresh_loader(folder, tmp_path: Path,
                                                                           index_field: bool) -> None:
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from regpipe.engine.ffcv_files import beton_train_loader
    from regpipe.loaders import EpochBatches, sampler_order
    from regpipe.loaders.ffcv import FfcvLoader, write_image_folder

    root, _ = folder
    path, index = write_image_folder(root, tmp_path / "train.beton", index_field=index_field)
    order = [[5, 0, 7, 2], [1, 6, 3, 4]]  # the run's index lists, the same every epoch here
    options = dict(size=16, workers=1, device=torch.device("cpu"), ops=[], mean=[0.5] * 3, std=[0.25] * 3,
                   channels_last=False)

    def make(seed: int = 3):
        return beton_train_loader(path, order, 2, seed=seed, **options)

    first = make()
    epoch0, epoch1 = list(first), list(first)
    for batch, rows in zip(epoch0, order, strict=True):  # shapes, labels and ids as FFCV's own decoder gives them
        assert batch.inputs.shape == (4, 3, 16, 16) and batch.inputs.dtype == torch.float32
        assert batch.source_ids.tolist() == rows
        assert torch.equal(batch.targets.argmax(1), torch.from_numpy(index.labels[rows]))
    if index_field:  # the pipeline before: FFCV's random crop and flip (numpy's global generator)
        pipelines = {"image": [RandomResizedCropRGBImageDecoder((16, 16)), RandomHorizontalFlip(), ToTensor()],
                     "label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]}
        native = Loader(str(path), batch_size=4, num_workers=1, order=sampler_order(EpochBatches(order)),
                        drop_last=True, pipelines=pipelines)
        for old, new in zip(FfcvLoader(native, 2, mean=[0.5] * 3, std=[0.25] * 3), epoch0, strict=True):
            assert old.inputs.shape == new.inputs.shape and old.inputs.dtype == new.inputs.dtype
            assert torch.equal(old.targets, new.targets) and torch.equal(old.source_ids, new.source_ids)

    def same(a: list, b: list) -> bool:
        return all(torch.equal(x.inputs, y.inputs) and torch.equal(x.affine, y.affine)
                   for x, y in zip(a, b, strict=True))

    assert same(list(make()), epoch0)  # a second run, same seed: the same crops
    assert not same(epoch1, epoch0)  # a new epoch: new crops (same order)
    resumed = make()
    resumed.set_epoch(1)  # a run resumed at epoch 1
    assert same(list(resumed), epoch1)
    assert not same(list(make(seed=4)), epoch0)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer, got -1"):
        resumed.set_epoch(-1)


# ------------------------------------------------------------------------------------------------ torch

def replicated_uint8(s: int = 16, m: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (s, 3, 6, 5), dtype=torch.uint8, generator=g).repeat_interleave(m, 0)
    labels = torch.arange(s).remainder(5).repeat_interleave(m)
    ids = (100 + torch.arange(s)).repeat_interleave(m)
    return images, labels, ids


@pytest.mark.parametrize("mode", ["group", "permute"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_loader_fused_stage_equals_normalise_then_mix(mode: str, channels_last: bool) -> None:
    images, labels, ids = replicated_uint8()
    mean, std = [0.2, 0.5, 0.7], [0.25, 0.5, 0.125]
    op = GradualSumMix(k0=4, gradual_steps=9, mode=mode, seed=5)
    op.step_count = 2
    loader = TorchLoader([], 5, mean=mean, std=std, ops=[op], channels_last=channels_last)
    # the copies of each seed, declared as a replicating loader declares them
    batch = loader.apply(loader.builder.build(images, labels, ids, replicas=4, raw=True))
    assert loader.builder.ran == {"fused_mix[numba]": 1}
    assert batch.inputs.dtype == torch.float32 and batch.inputs.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the reference: the loader's normalisation, then the same rows mixed by the torch composite
    x = ((images.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    rows, w = batch.mixing.sources, batch.mixing.weights[0].tolist()
    want = sum(w[g] * x[rows[:, g]] for g in range(4) if w[g] > 0)
    torch.testing.assert_close(batch.inputs.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(batch.mixing.source_ids, ids[rows])
    targets = torch.nn.functional.one_hot(labels, 5).double()
    torch.testing.assert_close(batch.targets.double(), sum(w[g] * targets[rows[:, g]] for g in range(4)))
    seeds = batch.mixing.source_ids.tolist()
    assert all(len(set(r)) == 4 for r in seeds)


def test_replicate_then_group_mix_mixes_four_seeds_per_row() -> None:
    """The issue's case: 16 seeds x m = 4, GradualSumMix(k0=4): 16 rows, each copy j of 4 different seeds."""
    images, labels, ids = replicated_uint8()
    from regpipe.core.batch import Batch

    batch = Batch.from_labels(images.float(), labels, 5, source_ids=ids).replace(replicas=4)
    out = GradualSumMix(k0=4, seed=0)(batch)
    seeds = out.mixing.source_ids
    assert out.size == 16 and all(len(set(r)) == 4 for r in seeds.tolist())
    assert sorted(out.mixing.sources.flatten().tolist()) == list(range(64))  # every row used once
    for j in range(4):  # the 4 rows of copy index j: 16 different seeds between them
        assert len(set(seeds[out.mixing.sources[:, 0] % 4 == j].flatten().tolist())) == 16
    # replay: the same plan gives the same batch
    op = SumMix(groups=4, seed=3)
    plan = op.draw(batch)
    torch.testing.assert_close(op.apply(batch, plan).inputs, op.apply(batch, plan).inputs)


def test_mixing_across_seeds_needs_a_batch_that_allows_it() -> None:
    from regpipe.core.batch import Batch

    images, labels, ids = replicated_uint8(s=3, m=2)
    batch = Batch.from_labels(images.float(), labels, 5, source_ids=ids).replace(replicas=2)
    with pytest.raises(ValueError, match="needs at least 4 seeds: the batch of 6 rows holds S=3 seeds of m=2"):
        SumMix(groups=4, mode="permute")(batch)
    with pytest.raises(ValueError, match="k=2 must divide|so k must divide the number of seeds: the batch of 6 rows "
                                         "holds S=3 seeds of m=2"):
        SumMix(groups=2)(batch)


def test_keep_uint8_gradual_mix_is_normalised_not_raw_pixels() -> None:
    images, labels, ids = replicated_uint8(s=8, m=1)
    mean, std = [0.5] * 3, [0.25] * 3
    op = GradualSumMix(k0=2, seed=0)
    batch = next(iter(TorchLoader([(images, labels, ids)], 5, mean=mean, std=std, keep_uint8=True, ops=[op])))
    x = (images.float() / 255 - 0.5) / 0.25
    want = mix_batch(TorchLoader([], 5).builder.build(x, labels, ids), MixPlan.uniform(mix_sources(8, 2),
                                                                                        (0.5, 0.5))).inputs
    torch.testing.assert_close(batch.inputs, want, atol=1e-5, rtol=1e-5)


def test_log_kernels_prints_once_per_op(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("REGPIPE_LOG_KERNELS", "1")
    images, labels, ids = replicated_uint8(s=8, m=1)
    loader = TorchLoader([(images, labels, ids)] * 3, 5, mean=[0.5] * 3, std=[0.25] * 3,
                         ops=[GradualSumMix(k0=2, seed=0)])
    list(loader)
    err = capsys.readouterr().err
    assert err.count("GradualSumMix: fused_mix[numba] uint8 -> float32") == 1, err


def test_sum_mix_op_on_uint8_keeps_the_0_255_scale_with_either_executor() -> None:
    images, labels, ids = replicated_uint8(s=8, m=1)
    from regpipe.core.batch import Batch

    batch = Batch.from_labels(images, labels, 5, source_ids=ids)
    op = SumMix(groups=2)
    plan = op.draw(batch)
    want = (images[:4].float() + images[4:].float()) / 2
    torch.testing.assert_close(op.apply(batch, plan).inputs, want)  # the op alone: the torch reference
    kernel = FusedMix([0.0] * 3, [1.0 / 255.0] * 3, backend="numba")  # the caller's executor: the same values
    torch.testing.assert_close(op.apply(batch, plan, executor=kernel).inputs, want)


def test_torch_dataloader_uint8_without_mix_is_normalised_once() -> None:
    images, labels, _ = replicated_uint8(s=4, m=1)
    dl = DataLoader(TensorDataset(images, labels), batch_size=4)
    batch = next(iter(TorchLoader(dl, 5, mean=[0.5] * 3, std=[0.25] * 3)))
    torch.testing.assert_close(batch.inputs, (images.float() / 255 - 0.5) / 0.25)
