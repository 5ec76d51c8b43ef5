"""``regpipe train`` with a replicating recipe makes the copies where it decodes: DALI's ``replicate`` and FFCV's
``ReplicatedCropDecoder`` for files read by those loaders (the device ``Replicate`` op is then left out of the
chain), the device op for in-memory data and ``--loader torch``; the copies are declared in ``Batch.replicas``,
map back to their files, and the mixing after them runs through the fused kernel."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from imagefolder import write_image_folder
from regpipe.cli import main
from regpipe.engine.algorithms import Copies, build_algorithms, replication_augment
from regpipe.engine.build import build_run
from regpipe.engine.config import ReplicationConfig, TrainConfig
from regpipe.engine.distributed import DistInfo
from regpipe.engine.loading import decode_copier, train_loader
from regpipe.engine.train import train
from regpipe.loaders.common import LOG_ENV
from regpipe.loaders.file_index import FileIndex
from regpipe.ops.augment import Replicate

M, BATCH, SIZE = 4, 8, 32
LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 training / 2 validation JPEGs of 64-128 px."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), train_per_class=8, val_per_class=2)


def _config(folder: Path, loader: str, cache: Path, recipe: str = "replicate") -> TrainConfig:
    return TrainConfig(recipe=recipe, dataset=f"imagefolder:{folder}", samples_per_class=None, loader=loader,
                       workers=1, epochs=1, seed=5, batch_size=BATCH, image_size=SIZE, val_resize=36, device="cpu",
                       progress=False, cache_dir=str(cache), replication=ReplicationConfig(replicas=M))


def _decoded(folder: Path) -> dict[int, np.ndarray]:
    """The training images decoded by Pillow, by id (the sorted listing of ROOT/train)."""
    from PIL import Image

    index = FileIndex(folder / "train")
    return {i: np.asarray(Image.open(index.path(i)).convert("RGB")) for i in range(len(index))}


@pytest.mark.parametrize("loader", ["dali", "ffcv", "torch"])
def test_the_loader_that_decodes_files_makes_the_copies(loader: str, folder: Path, tmp_path: Path) -> None:
    if loader in LIBRARY:
        pytest.importorskip(LIBRARY[loader])
    cfg = _config(folder, loader, tmp_path / "cache")
    algorithms = build_algorithms(cfg)
    try:
        run, _ = build_run(cfg, algorithms, torch.device("cpu"), DistInfo(), tmp_path, train)
        device_op = any(isinstance(op, Replicate) for op in run.batches.ops)
        assert device_op == (loader == "torch")  # DALI and FFCV crop the copies at decode instead
        batch = next(iter(run.batches))
    finally:
        for alg in algorithms:
            alg.close()
    assert batch.inputs.shape == (BATCH, 3, SIZE, SIZE)
    ids = batch.source_ids.view(BATCH // M, M)
    assert bool((ids == ids[:, :1]).all()) and len(set(ids[:, 0].tolist())) == BATCH // M  # seed-contiguous
    if loader == "torch":
        return
    assert batch.replicas == M  # declared by the adapter that made the copies
    theta = batch.affine.view(BATCH // M, M, 6)
    assert float(torch.cdist(theta, theta).add(torch.eye(M)).amin()) > 1e-3  # every copy its own crop and warp
    assert float(batch.affine[:, 0, 1].abs().max()) > 1e-3  # the replication chain's rotation is on top of the crop
    assert not torch.equal(batch.photometric, torch.ones_like(batch.photometric))  # and its colour change
    index = FileIndex(folder / "train")
    assert torch.equal(batch.targets.argmax(1), torch.from_numpy(index.labels)[batch.source_ids])
    # the pixels are their file's: the class colours are red, green, blue (and grey), and neither a crop, a warp
    # (zeros outside) nor a brightness/contrast change (b (p + c (x - p)), b, c > 0) changes which channel is
    # largest on average
    mean, std = torch.tensor(run.splits.mean).view(1, 3, 1, 1), torch.tensor(run.splits.std).view(1, 3, 1, 1)
    channels = (batch.inputs * std + mean).mean((2, 3)).argmax(1)
    decoded = _decoded(folder)
    coloured = 0
    for r in range(batch.size):
        source = decoded[int(batch.source_ids[r])].reshape(-1, 3).mean(0)
        if source.max() - np.median(source) > 40:  # a red, green or blue image (not the grey class)
            assert int(channels[r]) == int(source.argmax()), r
            coloured += 1
    assert coloured >= 1


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_in_memory_data_keeps_the_device_op(loader: str, fake_dir: Path, tmp_path: Path) -> None:
    """Arrays are cropped already: the DALI and FFCV loaders of in-memory data read them, the op copies them."""
    pytest.importorskip(LIBRARY[loader])
    cfg = TrainConfig(recipe="replicate", loader=loader, epochs=1, seed=5, samples_per_class=4, val_per_class=2,
                      batch_size=BATCH, data_dir=str(fake_dir), device="cpu", progress=False,
                      replication=ReplicationConfig(replicas=M))
    algorithms = build_algorithms(cfg)
    try:
        run, _ = build_run(cfg, algorithms, torch.device("cpu"), DistInfo(), tmp_path, train)
        assert any(isinstance(op, Replicate) for op in run.batches.ops)
    finally:
        for alg in algorithms:
            alg.close()


@pytest.mark.parametrize("loader", ["dali", "ffcv"])
def test_train_logs_decode_time_copies_and_the_fused_mix(loader: str, folder: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip(LIBRARY[loader])
    monkeypatch.setenv(LOG_ENV, "1")
    out = tmp_path / "run"
    assert main(["train", "--data", f"imagefolder:{folder}", "--loader", loader, "--recipe", "gradual+invariance",
                 "--epochs", "1", "--image-size", "32", "--val-resize", "36", "--batch-size", "8", "--workers", "1",
                 "--inv-layers", "layer1", "--k0", "2", "--no-progress", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    log = capsys.readouterr().err
    assert f"replicate[{loader}] 4 copies per image" in log
    assert "GradualSumMix: fused_mix[numba] uint8 -> float32" in log
    assert json.loads((out / "metrics.json").read_text())["epochs"][0]["m"] == 4


@pytest.mark.parametrize("kind, spec, needle", [
    ("dali", None, "--loader dali does not make copies at decode from in-memory arrays"),
    ("ffcv", None, "--loader ffcv does not make copies at decode from in-memory arrays"),
    ("torch", "imagefolder", "--loader torch does not make copies at decode: give the replication op"),
])
def test_no_copier_is_chosen_and_copies_are_refused_where_the_loader_does_not_decode_them(
        kind: str, spec: str | None, needle: str) -> None:
    """decode_copier and train_loader agree on which loaders make the copies: where decode_copier picks none,
    train_loader refuses copies before it builds anything (the splits are read for nothing else)."""
    splits = SimpleNamespace(spec=spec)
    algorithms = build_algorithms(TrainConfig(recipe="replicate"))
    assert decode_copier(kind, splits, algorithms) is None
    with pytest.raises(ValueError, match=needle):
        train_loader(kind, splits, [], seed=0, device=torch.device("cpu"), ops=[], channels_last=False, workers=0,
                     copies=Copies(M, replication_augment(0)))
