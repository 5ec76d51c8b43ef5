"""FFCV adapter (regpipe.loaders.ffcv) against regpipe's torch ops, with the real library on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from ffcv.fields import FloatField, IntField, NDArrayField  # noqa: E402
from ffcv.fields.decoders import FloatDecoder, IntDecoder, NDArrayDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.transforms import ToTensor  # noqa: E402
from ffcv.writer import DatasetWriter  # noqa: E402
from torch.utils.data import BatchSampler, RandomSampler  # noqa: E402

from fakedata import write_fake_fmnist  # noqa: E402
from regpipe import Batch  # noqa: E402
from regpipe.cli import main  # noqa: E402
from regpipe.engine.data import ArrayDataset, ImageArrays, load_dataset, load_npz  # noqa: E402
from regpipe.functional.augment import inverse_warp, valid_mask  # noqa: E402
from regpipe.functional.sum_mix import mix_rows  # noqa: E402
from regpipe.loaders import _kernels as K  # noqa: E402
from regpipe.loaders import make_train_loader  # noqa: E402
from regpipe.loaders.ffcv import FfcvLoader, Replicate, write_beton, write_rows  # noqa: E402
from regpipe.ops.augment import (Augment, RandomAffine, RandomBrightnessContrast, RandomFlip,  # noqa: E402
                                 RandomResizedCrop)
from regpipe.ops.sum_mix import SumMix  # noqa: E402

N, C, H, W, Kc, M, S = 16, 3, 12, 10, 4, 3, 8
TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]


def smooth_images(n: int = N) -> torch.Tensor:
    i = torch.arange(H).view(1, 1, H, 1).float()
    j = torch.arange(W).view(1, 1, 1, W).float()
    phase = torch.arange(n * C).view(n, C, 1, 1).float()
    return (128 + 100 * torch.sin(i / 3 + phase) * torch.cos(j / 4 - phase)).round().to(torch.uint8)


@pytest.fixture(scope="module")
def arrays() -> ImageArrays:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, C, H, W), dtype=torch.uint8, generator=g)
    images[: N // 2] = smooth_images(N // 2)  # smooth rows for the inversion test, noise for the exact ones
    return ImageArrays(images=images, labels=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 2), num_classes=Kc,
                       classes=tuple("abcd"))


@pytest.fixture(scope="module")
def beton(arrays: ImageArrays, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_beton(tmp_path_factory.mktemp("beton") / "a.beton", arrays.images, arrays.labels)


def pipelines(image_ops: list, label_ops: list | None = None) -> dict:
    return {"image": [NDArrayDecoder(), *image_ops, ToTensor()], "label": [IntDecoder(), *(label_ops or []), ToTensor()],
            "index": [IntDecoder(), ToTensor()]}


AUG = Augment([RandomFlip(), RandomResizedCrop(scale=(0.5, 1.0)),
               RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=(5, 5)),
               RandomBrightnessContrast()], seed=0)


@pytest.fixture(scope="module")
def replicated(beton: Path) -> tuple[FfcvLoader, list[list[Batch]]]:
    rep = Replicate(M, AUG, seed=1)
    loader = Loader(str(beton), batch_size=S, num_workers=1, order=OrderOption.RANDOM, seed=0,
                    pipelines=pipelines([rep]))
    wrapped = FfcvLoader(loader, Kc, replicate=rep, keep_uint8=True)
    return wrapped, [list(wrapped), list(wrapped)]


def test_replication_matches_torch_augment(arrays: ImageArrays, replicated) -> None:
    wrapped, (epoch0, epoch1) = replicated
    count = AUG.num_uniforms
    for epoch, batches in enumerate((epoch0, epoch1)):
        for batch in batches:
            assert batch.inputs.shape == (S * M, C, H, W)
            seeds = batch.source_ids[::M]
            assert torch.equal(batch.source_ids, seeds.repeat_interleave(M))
            u = np.empty((S, M, count))
            for s, index in enumerate(seeds.tolist()):
                K.counter_uniforms(wrapped.replicate.seed, epoch, index, u[s])
            u = torch.from_numpy(u).reshape(S * M, count)
            copies = (torch.arange(S * M) % M != 0).nonzero().squeeze(1)
            originals = Batch.from_labels(arrays.images, arrays.labels, Kc).rows(batch.source_ids)
            assert torch.equal(batch.inputs[::M], originals.inputs[::M])
            ref = AUG.apply(originals.rows(copies), AUG.from_uniforms(u[copies]))  # the op reads the same table
            torch.testing.assert_close(batch.affine[copies], ref.affine, atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.photometric[copies], ref.photometric, atol=1e-6, rtol=0)
            diff = (batch.inputs[copies].int() - ref.inputs.int()).abs()
            assert int(diff.max()) <= 2 and float((diff > 0).float().mean()) < 0.01
    assert not torch.equal(epoch0[0].affine, epoch1[0].affine)  # fresh draws each epoch


def test_recorded_affines_invert_ffcv_images(arrays: ImageArrays, replicated) -> None:
    geometric = Augment([RandomFlip(), RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(1.0, 1.2))])
    _, (epoch0, _) = replicated
    del epoch0
    rep = Replicate(M, geometric, seed=4)
    smooth = write_beton(Path(replicated[0].loader.fname).parent / "smooth.beton", smooth_images(), arrays.labels)
    loader = Loader(str(smooth), batch_size=S, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines=pipelines([rep]))
    batch = next(iter(FfcvLoader(loader, Kc, replicate=rep)))
    back = inverse_warp(batch.inputs, batch.affine)
    mask = valid_mask(batch.affine, H, W).expand_as(back)
    original = smooth_images()[batch.source_ids].float() / 255
    assert float(mask.float().mean()) > 0.3
    err = (back - original).abs()[mask]
    assert float(err.mean()) < 0.02 and float(err.max()) < 0.25


def test_random_parameters_have_the_torch_statistics(replicated) -> None:
    wrapped, _ = replicated
    aug = Augment([RandomFlip(horizontal=0.3), RandomAffine(degrees=30)], seed=0)
    rep = Replicate(4, aug, include_original=False, seed=9)
    theta, _ = rep.params(np.arange(2000), H, W, epoch=0)
    params = aug.sample(len(theta), "cpu")
    ref = aug.matrix(params, H, W)
    det = theta[:, 0, 0] * theta[:, 1, 1] - theta[:, 0, 1] * theta[:, 1, 0]
    assert abs(float((det < 0).float().mean()) - 0.3) < 0.03
    stats = []
    for mats in (theta, ref):
        keep = mats[:, 0, 0] * mats[:, 1, 1] - mats[:, 0, 1] * mats[:, 1, 0] > 0
        stats.append(torch.stack([mats[keep].flatten(1).mean(0), mats[keep].flatten(1).std(0)]))
    torch.testing.assert_close(stats[0], stats[1], atol=0.03, rtol=0)


@pytest.mark.parametrize("mode", ["group", "permute"])
def test_device_stage_mixes_the_loaders_copies_across_seeds(beton: Path, mode: str) -> None:
    """FFCV's copies are declared (Batch.replicas = M); the wrapper's device stage mixes them with the fused kernel,
    each row with copies of other seeds, as the torch reference mixes the same plan."""
    def loader(ops: list) -> FfcvLoader:
        rep = Replicate(M, AUG, seed=3)
        ffcv = Loader(str(beton), batch_size=S, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines=pipelines([rep]))
        return FfcvLoader(ffcv, Kc, replicate=rep, ops=ops, keep_uint8=True)

    plain = next(iter(loader([])))
    assert plain.inputs.dtype == torch.uint8 and plain.replicas == M
    mixing = loader([SumMix(2, mode=mode, seed=2)])
    batch = next(iter(mixing))
    assert mixing.builder.ran["fused_mix[numba]"] == 1
    plan = SumMix(2, mode=mode, seed=2).draw(plain)  # the same draw from the same generator state
    assert torch.equal(batch.mixing.sources, plan.sources)
    seeds = batch.mixing.source_ids
    assert all(len(set(row)) == 2 for row in seeds.tolist()) and torch.equal(seeds, plain.source_ids[plan.sources])
    torch.testing.assert_close(batch.inputs, mix_rows(plain.inputs.float() / 255, plan), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(batch.targets, mix_rows(plain.targets, plan))


def test_field_of_the_wrong_type_is_named(tmp_path: Path, arrays: ImageArrays) -> None:
    path = tmp_path / "float_label.beton"
    hwc = arrays.images.permute(0, 2, 3, 1).numpy()

    class Rows:
        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int):
            return hwc[i], float(arrays.labels[i]), i

    DatasetWriter(str(path), {"image": NDArrayField(dtype=np.dtype(np.uint8), shape=hwc.shape[1:]),
                              "label": FloatField(), "index": IntField()}, num_workers=1).from_indexed_dataset(Rows())
    loader = Loader(str(path), batch_size=S, num_workers=1,
                    pipelines={"image": [NDArrayDecoder(), ToTensor()], "label": [FloatDecoder(), ToTensor()],
                               "index": [IntDecoder(), ToTensor()]})
    with pytest.raises(TypeError, match="field 'label' of .* is a FloatField; regpipe needs IntField"):
        FfcvLoader(loader, Kc)
    with pytest.raises(TypeError, match="field 'image' must be uint8"):
        write_beton(tmp_path / "x.beton", arrays.images.double(), arrays.labels)
    with pytest.raises(TypeError, match="field 'label' must be integer labels"):
        write_beton(tmp_path / "x.beton", arrays.images, arrays.labels.float())


def test_missing_fields_and_bad_labels_give_the_shared_errors(beton: Path) -> None:
    loader = Loader(str(beton), batch_size=S, num_workers=1, pipelines={"image": [NDArrayDecoder(), ToTensor()],
                                                                       "label": [IntDecoder(), ToTensor()],
                                                                       "index": None})
    with pytest.raises(ValueError, match=r"no sample indices \(no 'index' field, no WithIndices"):
        FfcvLoader(loader, Kc, replicate=Replicate(2, AUG))
    with pytest.raises(ValueError, match=r"lacks the output\(s\) \['photo'\]"):
        FfcvLoader(loader, Kc, image_field="photo")
    with pytest.raises(ValueError, match="label 3 is out of range for num_classes=3"):
        list(FfcvLoader(loader, 3))  # the torch loader's message for the same bad label


def test_replicate_on_a_float_field_is_a_type_error(tmp_path: Path) -> None:
    path = write_beton(tmp_path / "f.beton", torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match=r"Replicate needs a field of 3-D uint8 samples, got shape \(4, 4, 1\) "
                                        "dtype float32"):
        Loader(str(path), batch_size=4, num_workers=1, pipelines=pipelines([Replicate(2, AUG)]))


def test_writers_for_arrays_and_datasets(tmp_path: Path) -> None:
    # Loading a dataset by name is the engine's (regpipe.engine.data); the loader layer writes what it is given.
    np.savez(tmp_path / "toy.npz", images=np.random.randint(0, 256, (6, 28, 28), dtype=np.uint8),
             labels=np.arange(6) % 3)
    arrays = load_npz(tmp_path / "toy.npz")
    loader = Loader(str(write_beton(tmp_path / "toy.beton", arrays.images, arrays.labels)), batch_size=3, num_workers=1,
                    order=OrderOption.SEQUENTIAL)
    batches = list(FfcvLoader(loader, 3))
    assert [b.inputs.shape for b in batches] == [(3, 1, 28, 28)] * 2
    assert torch.cat([b.source_ids for b in batches]).tolist() == list(range(6))
    fm = tmp_path / "fm"
    fm.mkdir()
    write_fake_fmnist(fm, n_train=12, n_test=4)
    path = write_rows(tmp_path / "fm.beton", ArrayDataset(load_dataset("fashion-mnist", "test", data_dir=str(fm))))
    batch = next(iter(FfcvLoader(Loader(str(path), batch_size=4, num_workers=1), 10)))
    assert batch.inputs.shape == (4, 3, 32, 32)


def test_train_loader_gives_the_torch_batches(arrays: ImageArrays, tmp_path: Path) -> None:
    def sampler():
        return BatchSampler(RandomSampler(range(N), generator=torch.Generator().manual_seed(3)), 4, drop_last=True)

    kw = dict(mean=[0.5] * C, std=[0.25] * C)
    torch_sampler = sampler()  # two epochs of the same sampler: two different shuffles
    ref = [list(make_train_loader("torch", ArrayDataset(arrays), torch_sampler, Kc, **kw))]
    ref.append(list(make_train_loader("torch", ArrayDataset(arrays), torch_sampler, Kc, **kw)))
    loader = make_train_loader("ffcv", ArrayDataset(arrays), sampler(), Kc, work_dir=tmp_path, **kw)
    for epoch in range(2):
        got = list(loader)
        for a, b in zip(ref[epoch], got, strict=True):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.source_ids, b.source_ids)


def test_train_cli_with_ffcv(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--loader", "ffcv", "--recipe", "sum", "--data-dir", str(fake_dir), "--out", str(out),
                 *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loader"] == "ffcv" and metrics["epochs"][0]["train_loss"] > 0


def test_scoring_sampler_runs_over_the_ffcv_loader(fake_dir: Path, tmp_path: Path) -> None:
    # The loss-delta orderer only needs a batch iterable: here the FFCV adapter's.
    out = tmp_path / "run"
    assert main(["train", "--loader", "ffcv", "--recipe", "loss-delta", "--delta-k", "2", "--data-dir", str(fake_dir),
                 "--out", str(out), *TINY]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["loader"] == "ffcv" and "mean_score" in metrics["epochs"][0]
