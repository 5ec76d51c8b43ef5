"""NVIDIA DALI adapter (regpipe.loaders.dali) against regpipe's torch ops, with the real library on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

dali = pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def  # noqa: E402
from torch.utils.data import BatchSampler, RandomSampler  # noqa: E402

from regpipe import Batch  # noqa: E402
from regpipe.cli import main  # noqa: E402
from regpipe.engine.data import ArrayDataset, ImageArrays  # noqa: E402
from regpipe.functional.augment import inverse_warp, valid_mask  # noqa: E402
from regpipe.functional.sum_mix import mix_rows  # noqa: E402
from regpipe.loaders import EpochBatches, make_train_loader  # noqa: E402
from regpipe.loaders.dali import ArraySource, DaliLoader, replicate  # noqa: E402
from regpipe.ops.augment import (Augment, RandomAffine, RandomBrightnessContrast, RandomFlip,  # noqa: E402
                                 RandomResizedCrop)
from regpipe.ops.cutmix import MixUp  # noqa: E402

N, C, H, W, K, M, S = 16, 3, 12, 10, 4, 3, 8
TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def arrays() -> ImageArrays:
    g = torch.Generator().manual_seed(0)
    return ImageArrays(images=torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=g),
                       labels=torch.arange(N) % K, num_classes=K, classes=tuple("abcd"))


def smooth_images(n: int = N) -> torch.Tensor:
    """``(n, C, H, W)`` uint8 smooth patterns: bilinear resampling changes them little (unlike noise)."""
    i = torch.arange(H).view(1, 1, H, 1).float()
    j = torch.arange(W).view(1, 1, 1, W).float()
    phase = torch.arange(n * C).view(n, C, 1, 1).float()
    return (128 + 100 * torch.sin(i / 3 + phase) * torch.cos(j / 4 - phase)).round().to(torch.uint8)


def sequential(n: int = N, size: int = S) -> list[list[int]]:
    return [list(range(i, i + size)) for i in range(0, n - size + 1, size)]


def chain(center: float | None = 128.0) -> Augment:
    return Augment([RandomFlip(), RandomResizedCrop(scale=(0.5, 1.0)),
                    RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=(5, 5)),
                    RandomBrightnessContrast(center=center)], seed=0)


@pytest.fixture(scope="module", params=[128.0, None], ids=["fixed-pivot", "mean-pivot"])
def replicated(arrays: ImageArrays, request: pytest.FixtureRequest) -> tuple[dict, Batch, Augment]:
    """The pipeline's copies, contrast pivoting at 128 (DALI's ``brightness_contrast``) or at each copy's mean."""
    aug = chain(center=request.param)
    source = ArraySource(ArrayDataset(arrays), sequential())

    @pipeline_def(batch_size=S, num_threads=1, device_id=None, seed=3)
    def pipe():
        x, y, ids = fn.external_source(source=source, num_outputs=3, batch=True, layout=["HWC", "", ""])
        rep = replicate(x, M, aug)
        return rep.images, y, ids, rep.affine, rep.photometric, rep.uniforms

    loader = DaliLoader(pipe(), K, ["images", "labels", "ids", "affine", "photometric", "uniforms"], keep_uint8=True)
    raw = next(iter(loader.iterator))[0]
    return raw, loader.to_batch(raw), aug


def test_replication_layout_and_originals(arrays: ImageArrays, replicated) -> None:
    _, batch, _ = replicated
    assert batch.inputs.shape == (S * M, C, H, W) and batch.inputs.dtype == torch.uint8
    assert batch.replicas == M  # the pipeline's copies, declared for the mixing ops and the invariance loss
    assert batch.source_ids.tolist() == [s for s in range(S) for _ in range(M)]  # seed-contiguous, as Replicate
    assert torch.equal(batch.targets.argmax(1), arrays.labels[batch.source_ids])
    originals = torch.arange(S * M) % M == 0
    assert torch.equal(batch.inputs[originals], arrays.images[:S])
    assert torch.equal(batch.affine[originals], torch.eye(2, 3).expand(S, 2, 3))
    assert torch.equal(batch.photometric[originals], torch.ones(S, 2))


def test_replication_matches_torch_augment_with_the_same_parameters(arrays: ImageArrays, replicated) -> None:
    raw, batch, aug = replicated
    u = raw["uniforms"].reshape(S * M, -1)
    copies = (torch.arange(S * M) % M != 0).nonzero().squeeze(1)
    seeds = Batch.from_labels(arrays.images, arrays.labels, K).rows(batch.source_ids[copies])
    ref = aug.apply(seeds, aug.from_uniforms(u[copies].double()))  # the op's own reading of DALI's uniforms
    torch.testing.assert_close(batch.affine[copies], ref.affine, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.photometric[copies], ref.photometric, atol=1e-6, rtol=0)
    diff = (batch.inputs[copies].int() - ref.inputs.int()).abs()
    # a warp rounding differing by 1 (a .5 case) is scaled by brightness * contrast <= 1.44 before rounding again
    assert int(diff.max()) <= 2 and float((diff > 0).float().mean()) < 0.01


def test_recorded_affines_invert_dali_images(arrays: ImageArrays) -> None:
    aug = Augment([RandomFlip(), RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(1.0, 1.2))], seed=0)
    arrays = ImageArrays(images=smooth_images(), labels=arrays.labels, num_classes=K, classes=arrays.classes)
    source = ArraySource(ArrayDataset(arrays), sequential())

    @pipeline_def(batch_size=S, num_threads=1, device_id=None, seed=5)
    def pipe():
        x, y, ids = fn.external_source(source=source, num_outputs=3, batch=True, layout=["HWC", "", ""])
        rep = replicate(x, M, aug)
        return rep.images, y, ids, rep.affine

    loader = DaliLoader(pipe(), K, ["images", "labels", "ids", "affine"])  # float in 0..1
    batch = next(iter(loader))
    back = inverse_warp(batch.inputs, batch.affine)
    mask = valid_mask(batch.affine, H, W, tolerance=1e-3).expand_as(back)
    original = arrays.images[batch.source_ids].float() / 255
    assert float(mask.float().mean()) > 0.3
    err = (back - original).abs()[mask]
    assert float(err.mean()) < 0.02 and float(err.max()) < 0.25  # two bilinear resamplings, uint8 rounding


def test_random_parameters_have_the_torch_statistics(arrays: ImageArrays) -> None:
    aug = Augment([RandomFlip(horizontal=0.3), RandomAffine(degrees=30)], seed=0)
    big = ImageArrays(images=arrays.images.repeat(8, 1, 1, 1), labels=arrays.labels.repeat(8), num_classes=K,
                      classes=arrays.classes)
    source = ArraySource(ArrayDataset(big), sequential(len(big.labels), 64))

    @pipeline_def(batch_size=64, num_threads=1, device_id=None, seed=11)
    def pipe():
        x, y, ids = fn.external_source(source=source, num_outputs=3, batch=True, layout=["HWC", "", ""])
        rep = replicate(x, 4, aug, include_original=False)
        return rep.images, y, ids, rep.affine

    theta = torch.cat([b.affine for b in DaliLoader(pipe(), K, ["images", "labels", "ids", "affine"])])
    params = aug.sample(len(theta), "cpu")
    ref = aug.matrix(params, H, W)
    flips_dali = float((theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0] < 0).float().mean())
    flips_torch = float(params[0].horizontal.float().mean())
    assert abs(flips_dali - 0.3) < 0.06 and abs(flips_torch - 0.3) < 0.06
    # the rotation part of the unflipped rows: the same distribution of matrix entries in both
    stats = []
    for mats in (theta, ref):
        keep = mats[:, 0, 0] * mats[:, 1, 1] - mats[:, 0, 1] * mats[:, 1, 0] > 0
        stats.append(torch.stack([mats[keep].flatten(1).mean(0), mats[keep].flatten(1).std(0)]))
    torch.testing.assert_close(stats[0], stats[1], atol=0.05, rtol=0)


def test_device_stage_mixes_the_pipelines_copies_across_seeds(arrays: ImageArrays, replicated) -> None:
    """The pipeline replicates (decode-time copies); the loader's device stage mixes them with the fused kernel
    (MixUp: each row with a copy of another seed), as the torch reference mixes the same plan."""
    _, plain, _ = replicated
    loader = DaliLoader.__new__(DaliLoader)
    from regpipe.loaders.common import BatchBuilder
    loader.builder = BatchBuilder(K, ops=[MixUp(seed=5)], mean=[0.4] * C, std=[0.2] * C)
    batch = loader.apply(plain)
    assert loader.builder.ran["fused_mix[numba]"] == 1
    plan = MixUp(seed=5).draw(plain)
    assert torch.equal(batch.mixing.sources, plan.sources)
    assert not (plan.sources[:, 1] // M == plan.sources[:, 0] // M).any()  # never a copy of the row's own seed
    expected = mix_rows((plain.inputs.float() / 255 - 0.4) / 0.2, plan)
    torch.testing.assert_close(batch.inputs, expected, atol=1e-5, rtol=1e-5)  # normalised once, then mixed
    torch.testing.assert_close(batch.targets, mix_rows(plain.targets, plan))


def test_missing_outputs_are_named(arrays: ImageArrays) -> None:
    source = ArraySource(ArrayDataset(arrays), sequential())

    @pipeline_def(batch_size=S, num_threads=1, device_id=None)
    def pipe():
        x, y, ids = fn.external_source(source=source, num_outputs=3, batch=True, layout=["HWC", "", ""])
        return x, ids

    with pytest.raises(ValueError, match=r"lacks the output\(s\) \['labels'\]"):
        DaliLoader(pipe(), K, ["images", "ids"])
    with pytest.raises(ValueError, match=r"lacks the output\(s\) \['images', 'labels'\]"):
        DaliLoader(pipe(), K, ["pictures", "ids"])
    with pytest.raises(ValueError, match="give output_map"):
        DaliLoader(pipe(), K)
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    built = DALIGenericIterator([pipe()], ["images", "ids"], size=N)  # a ready iterator: its output map is checked
    with pytest.raises(ValueError, match=r"lacks the output\(s\) \['labels'\]"):
        DaliLoader(built, K)


def test_bad_input_gives_the_torch_loaders_errors(arrays: ImageArrays) -> None:
    loader = DaliLoader.__new__(DaliLoader)
    from regpipe.loaders.common import BatchBuilder
    loader.builder = BatchBuilder(K)
    images = arrays.images[:4].permute(0, 2, 3, 1)
    with pytest.raises(ValueError, match=f"label 7 is out of range for num_classes={K}"):
        loader.to_batch({"images": images, "labels": torch.tensor([0, 1, 7, 2])})
    with pytest.raises(TypeError, match="integer tensor"):
        loader.to_batch({"images": images, "labels": torch.tensor([0.0, 1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="one value per sample"):
        loader.to_batch({"images": images, "labels": torch.zeros(4, 2, dtype=torch.long)})


def test_bad_m_is_named() -> None:
    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe(aug, m):
        x = fn.random.uniform(shape=[4, 4, 3])
        return replicate(x, m, aug).images

    with pytest.raises(ValueError, match="m \\(copies per sample\\) must be an integer >= 1, got 0"):
        pipe(chain(), 0)


def test_train_loader_gives_the_torch_batches(arrays: ImageArrays) -> None:
    def sampler():
        return BatchSampler(RandomSampler(range(N), generator=torch.Generator().manual_seed(3)), 4, drop_last=True)

    kw = dict(mean=[0.5] * C, std=[0.25] * C)
    torch_batches = [list(make_train_loader("torch", ArrayDataset(arrays), sampler(), K, **kw)) for _ in range(1)]
    dali_loader = make_train_loader("dali", ArrayDataset(arrays), sampler(), K, **kw)
    assert len(dali_loader) == N // 4
    got = list(dali_loader)
    for a, b in zip(torch_batches[0], got, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.source_ids, b.source_ids)
    assert len(list(dali_loader)) == N // 4  # the next epoch runs too
    assert isinstance(EpochBatches(sampler()).first, list)


def test_train_cli_with_dali(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--loader", "dali", "--recipe", "gradual", "--data-dir", str(fake_dir), "--out", str(out),
                 *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loader"] == "dali" and metrics["epochs"][0]["train_loss"] > 0


def test_scoring_sampler_runs_over_the_dali_loader(fake_dir: Path, tmp_path: Path) -> None:
    # The loss-delta orderer only needs a batch iterable: here the DALI adapter's.
    out = tmp_path / "run"
    assert main(["train", "--loader", "dali", "--recipe", "loss-delta", "--delta-k", "2", "--data-dir", str(fake_dir),
                 "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loader"] == "dali" and "mean_score" in metrics["epochs"][0]
