"""Training on data streamed from disk: ``--data imagefolder:ROOT`` through each loader, ``beton:``, memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagefolder import CLASSES, write_image_folder
from regpipe.cli import main
from regpipe.engine.datasets import ImageFolderDataset, centre_crop_box, training_chain, training_crop
from regpipe.loaders import _kernels as K
from regpipe.loaders.file_index import FileIndex

TESTS = Path(__file__).resolve().parent
SMALL = ["--recipe", "baseline", "--epochs", "2", "--image-size", "32", "--val-resize", "36", "--batch-size", "8",
         "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 10 training / 3 validation JPEGs of 64-128 px."""
    return write_image_folder(tmp_path_factory.mktemp("imagenet"), train_per_class=10, val_per_class=3)


def test_scan_lists_classes_and_files_in_order(folder: Path) -> None:
    index = FileIndex(folder / "train")
    assert index.classes == CLASSES and len(index) == 40 and index.names.dtype.kind == "S"
    assert index.labels.tolist() == [c for c in range(4) for _ in range(10)]
    assert index.path(11) == str(folder / "train" / CLASSES[1] / "img0001.JPEG")
    sub = index.subset([39, 0])
    assert sub.labels.tolist() == [3, 0] and sub.path(0) == index.path(39)


def test_bad_folders_are_named(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere"):
        FileIndex(tmp_path / "nowhere")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="class folder .*cat contains no images"):
        FileIndex(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        FileIndex(tmp_path / "flat")
    with pytest.raises(ValueError, match=r"missing \['n05_x'\], unexpected \['n04_grey'\]"):
        FileIndex(folder / "train", classes=(*CLASSES[:3], "n05_x"))


def test_crop_box_follows_the_recipe() -> None:
    # Every box lies inside the image on whole pixels; area fraction in [0.08, 1] and pixel ratio in [3/4, 4/3]
    # (up to the rounding) whenever a try fits, else the whole image.
    chain = K.encode_augment(training_chain(32))
    fractions, flips = [], []
    for index in range(400):
        (left, top, right, bottom), flip = training_crop(chain, 32, 5, 0, index, 120, 90)
        w, h = right - left, bottom - top
        assert all(v == int(v) for v in (left, top, right, bottom))
        assert 0 <= left and 0 <= top and right <= 120 and bottom <= 90 and w >= 1 and h >= 1
        fractions.append(w * h / (120 * 90))
        whole = (w, h) == (120, 90)
        assert whole or (0.06 <= w * h / (120 * 90) <= 1.0 and 0.7 <= w / h <= 1.4)
        flips.append(flip)
    # E[s] = 0.54 for s ~ U(0.08, 1), less the large draws that do not fit and are tried again
    assert 0.35 < float(np.mean(fractions)) < 0.6
    assert 0.4 < float(np.mean(flips)) < 0.6
    assert training_crop(chain, 32, 5, 0, 7, 120, 90) == training_crop(chain, 32, 5, 0, 7, 120, 90)
    assert training_crop(chain, 32, 5, 0, 7, 120, 90) != training_crop(chain, 32, 5, 1, 7, 120, 90)
    assert centre_crop_box(200, 100, 32, 64) == (75.0, 25.0, 125.0, 75.0)


def test_crop_box_is_the_ops_crop_rounded_to_whole_pixels() -> None:
    """One crop definition: the dataset's box is the torch op's window (RandomResizedCrop's draw table read by
    Augment.from_uniforms from the same counter-based uniforms), its edges rounded to the nearest pixel."""
    augment = training_chain(32)
    chain = K.encode_augment(augment)
    for index in range(50):
        (left, top, right, bottom), flip = training_crop(chain, 32, 3, 2, index, 120, 90)
        u = np.empty((1, augment.num_uniforms))
        K.counter_uniforms(3, 2, index, u)
        crop, flips = augment.from_uniforms(torch.from_numpy(u), aspect=90 / 120)
        (w, h), (cx, cy) = crop.size[0].tolist(), crop.center[0].tolist()
        edges = [(cx - w + 1) * 60, (cy - h + 1) * 45, (cx + w + 1) * 60, (cy + h + 1) * 45]
        assert max(abs(a - b) for a, b in zip((left, top, right, bottom), edges)) <= 0.5 + 1e-9, index
        assert flip == bool(flips.horizontal[0])


def test_validation_transform_matches_resize_then_centre_crop(folder: Path) -> None:
    from PIL import Image

    index = FileIndex(folder / "val")
    ds = ImageFolderDataset(index, 32, train=False, resize=40)
    image, label, i = ds[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and int(label) == 1 and int(i) == 5
    with Image.open(index.path(5)) as img:  # the reference: resize the shorter side to 40, crop the centre 32
        w, h = img.size
        scale = 40 / min(w, h)
        big = img.convert("RGB").resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (big.width - 32) // 2, (big.height - 32) // 2
        ref = torch.from_numpy(np.array(big.crop((left, top, left + 32, top + 32)))).permute(2, 0, 1)
    assert (image.float() - ref.float()).abs().mean() < 6  # JPEG noise; a shifted crop differs by ~25


def test_training_crops_depend_on_seed_epoch_and_index_only(folder: Path) -> None:
    ds = ImageFolderDataset(FileIndex(folder / "train"), 24, train=True, resize=32, seed=1)
    first = ds[3][0]
    assert torch.equal(ImageFolderDataset(ds.index, 24, train=True, resize=32, seed=1)[3][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], first)


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
def test_train_two_epochs_through_each_loader(loader: str, folder: Path, tmp_path: Path) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    if loader == "ffcv":
        pytest.importorskip("ffcv")
    out = tmp_path / loader
    assert main(["train", "--data", f"imagefolder:{folder}", "--loader", loader, "--workers", "2", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), *SMALL]) == 0
    metrics = _metrics(out)
    assert metrics["train_samples"] == 40 and metrics["data"]["kind"] == "imagefolder"
    assert len(metrics["epochs"]) == 2
    for row in metrics["epochs"]:
        assert row["steps"] == 5 and row["rows_per_step"] == 8 and math.isfinite(row["train_loss"])
        assert row["test_accuracy"] * 12 == pytest.approx(round(row["test_accuracy"] * 12))  # over the 12 val images
    assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"] * 1.5
    assert metrics["config"]["samples_per_class"] is None  # the small-data option is off
    assert not (out / "state.pt").exists()  # the resume state goes when the run finishes


def test_beton_spec_trains_with_ffcv(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    from regpipe.loaders.ffcv import write_image_folder

    paths = [write_image_folder(folder / split, tmp_path / f"{split}.beton", max_resolution=512, index_field=True)[0]
             for split in ("train", "val")]
    out = tmp_path / "run"
    assert main(["train", "--data", f"beton:{paths[0]},{paths[1]}", "--loader", "ffcv", "--workers", "1",
                 "--out", str(out), *SMALL]) == 0
    metrics = _metrics(out)
    assert [row["steps"] for row in metrics["epochs"]] == [5, 5]
    assert metrics["test_accuracy"] * 12 == pytest.approx(round(metrics["test_accuracy"] * 12))


def test_bad_data_specs_and_options_are_named_before_reading(folder: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["--data", f"imagefolder:{tmp_path / 'none'}"], "image folder not found"),
        (["--data", "imagefolder:"], "names no folder"),
        (["--data", "beton:a.beton"], "beton:TRAIN.beton,VAL.beton"),
        (["--data", "beton:a.beton,b.beton"], "add --loader ffcv"),
        (["--data", f"imagefolder:{folder}", "--samples-per-class", "5"], "small-data option, off for imagefolder"),
        (["--data", f"imagefolder:{folder}", "--recipe", "sign"], "not available with --data imagefolder"),
        (["--data", f"imagefolder:{folder}", "--val-resize", "16"], "val_resize=16 must be >= train.image_size=32"),
        (["--data", f"imagefolder:{folder}", "--resume"], "nothing to resume"),
        (["--data", f"imagefolder:{folder}", "--model", "timm:resnet50"], "needs 'timm', which is not installed"),
    ]
    for extra, message in cases:
        args = ["train", "--out", str(tmp_path / "o"), *SMALL, *extra]
        assert main(args) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_cascade_carves_its_validation_from_train(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cascade"
    assert main(["train", "--data", f"imagefolder:{folder}", "--workers", "0", "--out", str(out), *SMALL,
                 "--recipe", "cascade", "--stages", "2,1", "--val-per-class", "2"]) == 0
    metrics = _metrics(out)
    assert metrics["train_samples"] == 32  # 40 - 2 per class held out
    assert all("val_accuracy" in row for row in metrics["epochs"])


PEAK_RSS = """
import resource, sys
from regpipe.cli import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def _peak_rss_mb(root: Path, out: Path) -> tuple[float, float]:
    """Peak resident memory (MB) of a one-epoch run: the training process, and its largest loader worker."""
    args = ["train", "--data", f"imagefolder:{root}", "--loader", "torch", "--workers", "1", "--out", str(out),
            "--recipe", "baseline", "--epochs", "1", "--image-size", "32", "--val-resize", "36", "--batch-size", "32",
            "--no-progress"]
    run = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    main_kb, worker_kb = (int(v) for v in run.stdout.split("PEAK_KB")[-1].split()[:2])
    return main_kb / 1024, worker_kb / 1024


def test_memory_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    small = write_image_folder(tmp_path / "small", train_per_class=40, val_per_class=4, seed=1)
    large = write_image_folder(tmp_path / "large", train_per_class=400, val_per_class=4, seed=1)
    (main_small, worker_small), (main_large, worker_large) = (_peak_rss_mb(root, tmp_path / root.name)
                                                              for root in (small, large))
    print(f"peak RSS MB, 160 vs 1600 training images: process {main_small:.1f} vs {main_large:.1f}, "
          f"worker {worker_small:.1f} vs {worker_large:.1f}")
    assert main_large - main_small < 50 and worker_large - worker_small < 50


def test_evaluation_workers_start_from_a_fork_server_beside_dali_and_ffcv(folder: Path) -> None:
    # DALI's and FFCV's native threads run in the process while evaluation passes start their workers:
    # those runs start workers from a fork server, and the batches are the ones forked workers read.
    from regpipe.engine.loading import clean_loader, eval_loader, worker_start_method
    from regpipe.engine.splits import folder_splits, parse_data_spec

    assert [worker_start_method(k) for k in ("torch", "dali", "ffcv")] == [None, "forkserver", "forkserver"]
    splits = folder_splits(parse_data_spec(f"imagefolder:{folder}"), 32, 36, seed=0, val_per_class=None)

    def read(start: str | None) -> list[torch.Tensor]:
        test = eval_loader(splits, splits.test, 5, torch.device("cpu"), 2, resize=36, start_method=start)
        clean = clean_loader(splits, 8, torch.Generator().manual_seed(3), torch.device("cpu"), 2, count=16,
                             resize=36, start_method=start)
        assert [getattr(t.iterable.multiprocessing_context, "get_start_method", lambda: None)()
                for t in (test, clean)] == [start, start]
        return [t for b in [*test, *clean] for t in (b.inputs, b.targets)]

    forked, served = read(None), read("forkserver")
    assert len(forked) == 2 * (3 + 5) and all(torch.equal(a, b) for a, b in zip(forked, served, strict=True))
