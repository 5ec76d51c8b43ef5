"""Issue 20, point 5: bad input never hangs and is never silent.

Each case was measured on the code before the fix (a hang, a silent result, an error after work started,
or an unclear error) and is checked here: a clear error naming the value or file, before work starts
(or, for decoding workers, one error naming the bad file, after which the parent stops). Cases that could
hang run in a subprocess with a timeout, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagefolder import write_image_folder
from regpipe.cli import main

#: Seconds a subprocess may take before the test fails as a hang (a run takes ~10 s on a loaded 2-core machine).
HANG_SECONDS = 180
TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python ARGS`` with a timeout: a hang fails the test (``TimeoutExpired``) instead of blocking it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=HANG_SECONDS,
                              cwd=cwd, env=env)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hung for {HANG_SECONDS} s: {args}\n{(err.stderr or b'')[-2000:]!r}")


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else ""


# -- 1. bad image files: one error naming the file, never a hang ----------------------------------------------
def _spoil(path: Path, kind: str) -> Path:
    """Turn a JPEG into a bad file: ``truncated`` keeps its first half (the header parses, the data ends),
    ``text`` writes text under the JPEG's name."""
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("not an image\n")
    return path


@pytest.fixture
def bad_folder(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A 4-class folder (3 training, 1 validation JPEG per class) whose training image 1 of class 2 is bad
    (``request.param``: ``truncated`` or ``text``); returns ``(root, bad file)``."""
    root = write_image_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    bad = _spoil(root / "train" / "n02_green" / "img0001.JPEG", getattr(request, "param", "truncated"))
    return root, bad


WRITE_SCRIPT = """
import sys
from regpipe.loaders.ffcv import write_image_folder
write_image_folder(sys.argv[1], sys.argv[2], num_workers=int(sys.argv[3]))
"""


@pytest.mark.parametrize("bad_folder,workers", [("truncated", 2), ("text", 1)], indirect=["bad_folder"])
def test_beton_writer_names_a_bad_file_and_stops(bad_folder: tuple[Path, Path], workers: int, tmp_path: Path) -> None:
    """FFCV's DatasetWriter worker used to die on the file while the parent waited forever."""
    pytest.importorskip("ffcv")
    root, bad = bad_folder
    out = tmp_path / "betons" / "train.beton"
    run = _subprocess(["-c", WRITE_SCRIPT, str(root / "train"), str(out), str(workers)], tmp_path)
    assert run.returncode != 0
    assert _last_line(run.stderr).startswith(f"ValueError: cannot decode image {bad}: "), run.stderr[-2000:]
    assert list(out.parent.iterdir()) == []  # neither the .beton nor its temporary file


@pytest.mark.parametrize("bad_folder", ["text"], indirect=True)
def test_write_beton_command_names_a_bad_file(bad_folder: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    root, bad = bad_folder
    out = tmp_path / "train.beton"
    run = _subprocess(["-m", "regpipe", "write-beton", str(root / "train"), str(out)], tmp_path)
    assert run.returncode == 2
    assert _last_line(run.stderr).startswith(f"regpipe write-beton: error: cannot decode image {bad}: ")
    assert not out.exists()


FOLDER_BETON_SCRIPT = """
import sys
from pathlib import Path
from regpipe.engine.distributed import DistInfo
from regpipe.engine.ffcv_files import folder_beton
from regpipe.engine.splits import folder_splits, parse_data_spec
splits = folder_splits(parse_data_spec("imagefolder:" + sys.argv[1]), 32, 36, 0, None)
Path(sys.argv[2]).write_bytes(Path(sys.argv[2]).read_bytes()[:1000])  # spoiled after the statistics were read
folder_beton(splits, sys.argv[3], 36, DistInfo())
"""


def test_ffcv_conversion_of_a_training_folder_names_a_bad_file(tmp_path: Path) -> None:
    """``--data imagefolder:ROOT --loader ffcv`` converts the folder once: that conversion used to hang."""
    pytest.importorskip("ffcv")
    root = write_image_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    bad = root / "train" / "n03_blue" / "img0002.JPEG"
    run = _subprocess(["-c", FOLDER_BETON_SCRIPT, str(root), str(bad), str(tmp_path / "cache")], tmp_path)
    assert run.returncode != 0
    assert _last_line(run.stderr).startswith(f"ValueError: cannot decode image {bad}: "), run.stderr[-2000:]
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("loader", ["torch", "ffcv"])
def test_train_on_a_folder_with_a_bad_file_stops_naming_it(loader: str, tmp_path: Path) -> None:
    """One line naming the file; no metrics, no state. The torch loader's DataLoader workers wrapped the error
    in their traceback ("Caught ValueError in DataLoader worker process 0. Original Traceback ...")."""
    if loader == "ffcv":
        pytest.importorskip("ffcv")
    root = write_image_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    bad = _spoil(root / "train" / "n01_red" / "img0002.JPEG", "truncated")
    out = tmp_path / "run"
    run = _subprocess(["-m", "regpipe", "train", "--data", f"imagefolder:{root}", "--loader", loader, "--workers", "1",
                       "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--recipe", "baseline",
                       "--no-progress", "--out", str(out), "--cache-dir", str(tmp_path / "cache")], tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    line = _last_line(run.stderr)
    assert line.startswith(f"regpipe train: error: cannot decode image {bad}: ") and "Traceback" not in run.stderr
    assert not (out / "metrics.json").exists() and not (out / "state.pt").exists()


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_dali_folder_loader_names_a_bad_file(kind: str, tmp_path: Path) -> None:
    """DALI's decoder reported "Failed to decode sample #1" without the file."""
    pytest.importorskip("nvidia.dali")
    from regpipe.engine.dali_files import dali_folder_loader
    from regpipe.engine.datasets import ImageFolderDataset
    from regpipe.loaders.file_index import FileIndex

    root = write_image_folder(tmp_path / "images", train_per_class=3, val_per_class=1)
    bad = _spoil(root / "train" / "n02_green" / "img0001.JPEG", kind)
    dataset = ImageFolderDataset(FileIndex(root / "train"), 32, train=True, resize=36)
    with pytest.raises(ValueError, match=rf"^cannot (decode|read) image {bad}: "):
        batches = dali_folder_loader(dataset, [[0, 4, 8], [1, 2, 3]], 4, seed=0, threads=1,
                                     device=torch.device("cpu"), ops=[], mean=(0.5,) * 3, std=(0.25,) * 3,
                                     channels_last=False)
        for _ in batches:
            pass


@pytest.mark.parametrize("kind", ["truncated", "text"])
def test_torch_dataset_names_a_bad_file(kind: str, tmp_path: Path) -> None:
    from regpipe.engine.datasets import ImageFolderDataset
    from regpipe.loaders.file_index import FileIndex

    root = write_image_folder(tmp_path / "images", train_per_class=2, val_per_class=1)
    bad = _spoil(root / "train" / "n01_red" / "img0001.JPEG", kind)
    dataset = ImageFolderDataset(FileIndex(root / "train"), 32, train=False, resize=36)
    assert dataset[0][0].shape == (3, 32, 32)  # the good file next to it decodes
    with pytest.raises(ValueError, match=rf"^cannot decode image {bad}: "):
        dataset[1]


# -- 2. silent results -> errors -------------------------------------------------------------------------------
def _checkpoint(path: Path, num_classes: int = 10, nan: bool = False) -> Path:
    """A preact-small checkpoint for 3 x 32 x 32 inputs (untrained; ``nan``: every weight NaN, as after a
    diverged run)."""
    from regpipe.engine.checkpoint import save_checkpoint
    from regpipe.engine.models import build_model

    torch.manual_seed(0)
    model = build_model("preact-small", num_classes=num_classes, in_channels=3)
    if nan:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(math.nan)
    return save_checkpoint(path, model, "preact-small", num_classes, (3, 32, 32), (0.5,) * 3, (0.25,) * 3,
                           {"dataset": "fashion-mnist"})


@pytest.mark.parametrize("nan", [True, False])
def test_eval_refuses_a_checkpoint_with_nan_weights(nan: bool, fake_dir: Path, tmp_path: Path, capsys) -> None:
    """It used to print an accuracy (the NaN model predicts class 0 everywhere)."""
    ckpt = _checkpoint(tmp_path / "model.pt", nan=nan)
    code = main(["eval", "--checkpoint", str(ckpt), "--attacks", "none", "--data-dir", str(fake_dir)])
    out, err = capsys.readouterr()
    if nan:
        assert code == 2 and "clean accuracy" not in out
        assert err.startswith(f"regpipe eval: error: checkpoint {ckpt} (model 'preact-small'): parameter "
                              "'conv1.weight' holds ") and "non-finite" in err and len(err.strip().splitlines()) == 1
    else:  # the valid neighbour is evaluated
        assert code == 0 and "clean accuracy" in out, err


def test_eval_refuses_a_test_set_with_more_classes_than_the_model(tmp_path: Path, capsys) -> None:
    """Rows of classes the model has no output for used to be scored as errors, silently."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, classes in (("train", 10), ("test", 12)):
        np.savez(tmp_path / f"{name}.npz", images=rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8),
                 labels=np.arange(24) % classes)
    ckpt = _checkpoint(tmp_path / "model.pt")
    code, err = _run(["eval", "--checkpoint", str(ckpt), "--attacks", "none", "--data",
                      f"npz:{tmp_path / 'train.npz'},{tmp_path / 'test.npz'}"], capsys)
    assert code == 2 and "labels up to 11 (12 classes)" in err and "model has 10 classes" in err


@pytest.mark.parametrize("value", [-math.inf, math.inf, math.nan])
def test_loaders_refuse_non_finite_pixels(value: float) -> None:
    """The pixel check read only the largest value: ``-inf`` (and NaN, depending on its place) passed."""
    from regpipe.loaders.torch import TorchLoader

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = TorchLoader([(x.clone(), torch.arange(4) % 2, torch.arange(4))], 2, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.isfinite(next(iter(loader)).inputs).all()  # the valid neighbour
    x[2, 1, 3, 4] = value
    loader = TorchLoader([(x, torch.arange(4) % 2, torch.arange(4))], 2, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ValueError, match=r"non-finite pixel values \(smallest "):
        next(iter(loader))


@pytest.mark.parametrize("value", [-math.inf, math.nan])
def test_decoded_images_check_refuses_non_finite_pixels(value: float) -> None:
    """DALI/FFCV float outputs: ``-inf`` used to be reported as "normalised already", NaN passed."""
    from regpipe.loaders.common import check_decoded_images

    x = torch.rand(2, 8, 8, 3)
    check_decoded_images(x, "the DALI pipeline", keep_uint8=False, normalising=True)
    x[1, 2, 3, 0] = value
    with pytest.raises(ValueError, match=r"^the DALI pipeline: non-finite pixel values"):
        check_decoded_images(x, "the DALI pipeline", keep_uint8=False, normalising=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_torch_loader_on_cuda_without_cuda_is_a_clear_error(device: object) -> None:
    """It used to fail at the first batch with torch's "AssertionError: Torch not compiled with CUDA enabled"."""
    from regpipe.loaders.torch import TorchLoader

    with pytest.raises(ValueError, match=r"device '(cuda|cuda:[01])' \(device\) requested but CUDA is not available"):
        TorchLoader([], 2, device=device)
    assert TorchLoader([], 2, device="cpu").device == torch.device("cpu")


def _run_context(model: torch.nn.Module, image_shape: tuple[int, int, int]):
    """A :class:`RunContext` for attaching one algorithm outside a run (the callbacks are never called)."""
    from regpipe.engine.algorithms import RunContext
    from regpipe.functional.losses import soft_target_cross_entropy

    def unused(*args: object) -> None:
        raise AssertionError("attach read data")

    return RunContext(seed=0, epochs=1, batch_size=8, steps_per_epoch=1, model=model,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=soft_target_cross_entropy,
                      num_train=8, train=None, prepare=unused, validation=unused, image_shape=image_shape)


def _no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make reading the training batches an error: a check that runs before it never meets it."""
    import regpipe.engine.build as engine_build

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the training batches were read before the settings were checked")

    monkeypatch.setattr(engine_build, "train_loader", no_data)


@pytest.mark.parametrize("length", [32, 100])
def test_cutout_refuses_a_hole_as_large_as_the_image(length: int) -> None:
    """``CutOut(length=100)`` on 32 px images blanked every image: training ran at chance."""
    from regpipe import Batch
    from regpipe.ops.cutmix import CutOut

    batch = Batch.from_labels(torch.rand(4, 3, 32, 32), torch.arange(4) % 2, num_classes=2)
    assert CutOut(length=16).draw(batch).boxes.shape == (4, 4)  # the paper's CIFAR-10 hole is fine
    with pytest.raises(ValueError, match=rf"CutOut length={length} is not smaller than the 32x32 images"):
        CutOut(length=length).draw(batch)


def test_cutout_algorithm_refuses_the_hole_when_attached() -> None:
    from regpipe.engine.algorithms.boxes import CutOutAlgorithm
    from regpipe.engine.config import CutOutConfig

    model = torch.nn.Linear(4, 2)
    CutOutAlgorithm(CutOutConfig(length=100)).attach(_run_context(model, (0, 0, 0)))  # no shape: checked per batch
    CutOutAlgorithm(CutOutConfig(length=16)).attach(_run_context(model, (3, 32, 32)))
    with pytest.raises(ValueError, match=r"CutOut length=100 is not smaller than the 32x32 images"):
        CutOutAlgorithm(CutOutConfig(length=100)).attach(_run_context(model, (3, 32, 32)))


def test_train_refuses_cutout_as_large_as_the_image_before_reading_data(fake_dir: Path, tmp_path: Path, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    code, err = _run(["train", "--recipe", "cutout", "--cutout-length", "100", "--data-dir", str(fake_dir),
                      "--out", str(tmp_path / "run"), *TINY], capsys)
    assert code == 2 and "CutOut length=100 is not smaller than the 32x32 images" in err


def test_patchup_hook_refuses_a_layer_without_a_feature_map() -> None:
    """``--patchup-layers fc`` failed only at the first step that drew the layer."""
    from regpipe.engine.models import build_model
    from regpipe.hooks.patchup import PatchUpHook

    torch.manual_seed(0)
    model = build_model("preact-small", num_classes=10, in_channels=3).train()
    model.layer1.eval()  # a module the caller froze stays frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = PatchUpHook(model, ["conv1", "layer2"]).check_feature_maps(torch.zeros(1, 3, 32, 32))
    assert shapes == {1: (1, 16, 32, 32), 2: (1, 32, 16, 16)}
    with pytest.raises(ValueError, match=r"PatchUp layer 2 \('fc'\) gives a \(1, 10\) tensor; PatchUp mixes "
                                         r"\(N, C, H, W\) feature maps"):
        PatchUpHook(model, ["conv1", "fc"]).check_feature_maps(torch.zeros(1, 3, 32, 32))
    # nothing changed: no BatchNorm statistics updated, every module in its mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model.conv1.training and not model.layer1.training


def test_patchup_algorithm_checks_its_layers_when_attached() -> None:
    from regpipe.engine.algorithms.patchup import PatchUpAlgorithm
    from regpipe.engine.config import PatchUpConfig
    from regpipe.engine.models import build_model

    model = build_model("preact-small", num_classes=10, in_channels=3)
    PatchUpAlgorithm("soft", PatchUpConfig(layers=("conv1", "layer1"))).attach(_run_context(model, (3, 32, 32)))
    with pytest.raises(ValueError, match=r"PatchUp layer 1 \('fc'\) gives a \(1, 10\) tensor"):
        PatchUpAlgorithm("soft", PatchUpConfig(layers=("fc",))).attach(_run_context(model, (3, 32, 32)))
    with pytest.raises(ValueError, match=r"PatchUp layer 2 \('layer2'\) gives 4x4 feature maps, smaller than its "
                                         r"7x7 blocks"):
        PatchUpAlgorithm("hard", PatchUpConfig(layers=("conv1", "layer2"))).attach(_run_context(model, (3, 8, 8)))


def test_train_refuses_patchup_on_the_classifier_before_reading_data(fake_dir: Path, tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _no_loading(monkeypatch)
    code, err = _run(["train", "--recipe", "patchup-soft", "--patchup-layers", "fc", "--data-dir", str(fake_dir),
                      "--out", str(tmp_path / "run"), *TINY], capsys)
    assert code == 2 and "PatchUp layer 1 ('fc') gives a (1, 10) tensor" in err


# -- 3. errors that came after work started -------------------------------------------------------------------
def test_output_check_tries_writing(tmp_path: Path) -> None:
    """As root ``os.access`` says yes everywhere; writing under /proc fails only when the run ends."""
    from regpipe.engine.validate import check_output_path, check_run_outputs

    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")
    with pytest.raises(ValueError, match=r"^--out /proc/regpipe-test/run cannot be created: (cannot write in|no "
                                         r"permission to write in) /proc"):
        check_run_outputs("/proc/regpipe-test/run", None)
    with pytest.raises(ValueError, match=r"^--json /proc/rows.json cannot be created"):
        check_output_path("--json", "/proc/rows.json", "file")
    check_run_outputs(str(tmp_path / "run"), str(tmp_path / "model.pt"))  # a writable place passes
    assert list(tmp_path.iterdir()) == []  # and the trial file is gone


def test_train_refuses_an_unwritable_out_before_reading_data(fake_dir: Path, capsys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import regpipe.engine.train as engine_train

    if not Path("/proc").is_dir():
        pytest.skip("needs /proc")

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was read before the output path was checked")

    monkeypatch.setattr(engine_train, "prepare_data", no_data)
    code, err = _run(["train", "--recipe", "baseline", "--data-dir", str(fake_dir), "--out", "/proc/regpipe-test/run",
                      *TINY], capsys)
    assert code == 2 and err.startswith("regpipe train: error: --out /proc/regpipe-test/run cannot be created")


def test_compare_refuses_a_conflicting_recipe_before_training(fake_dir: Path, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The conflict used to be found when the recipe's turn came, after the recipes before it had trained."""
    import regpipe.engine.train as engine_train

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a recipe trained before every recipe was checked")

    monkeypatch.setattr(engine_train, "train", no_training)
    code, err = _run(["compare", "--recipes", "baseline,sum+gradual", "--seeds", "1", "--data-dir", str(fake_dir),
                      "--out", str(tmp_path / "cmp"), *TINY], capsys)
    assert code == 2 and "'sum' and 'gradual' both take over the input mixing schedule" in err
    assert not (tmp_path / "cmp").exists()


def test_write_beton_refuses_a_folder_as_out_before_reading_images(tmp_path: Path, capsys,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ffcv")
    import regpipe.loaders.ffcv as ffcv_adapter

    def no_listing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image folder was read before OUT was checked")

    monkeypatch.setattr(ffcv_adapter, "FileIndex", no_listing)
    (tmp_path / "existing").mkdir()
    code, err = _run(["write-beton", str(tmp_path / "images"), str(tmp_path / "existing")], capsys)
    assert code == 2 and f"OUT {tmp_path / 'existing'} is a directory; give a file name" in err
    assert list((tmp_path / "existing").iterdir()) == []
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path / 'existing'} is a directory"):  # the library too
        ffcv_adapter.write_image_folder(tmp_path / "images", tmp_path / "existing")


@pytest.mark.parametrize("mode", ["ops", "pipeline"])
def test_bench_refuses_a_json_path_under_a_file_before_timing(mode: str, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import regpipe.cli.bench as bench
    import regpipe.cli.bench_pipeline as bench_pipeline

    def no_timing(*args: object, **kwargs: object) -> None:
        raise AssertionError("timed before --json was checked")

    monkeypatch.setattr(bench, "run_bench", no_timing)
    monkeypatch.setattr(bench_pipeline, "run_pipeline", no_timing)
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    argv = ["bench", "--quick"] if mode == "ops" else ["bench", "pipeline", "--data", str(tmp_path)]
    code, err = _run([*argv, "--json", str(regular / "rows.json")], capsys)
    assert code == 2 and f"--json {regular}/rows.json cannot be created: {regular} is a file" in err


# -- 4. unclear errors -> clear ones ---------------------------------------------------------------------------
@pytest.mark.parametrize("threads", ["-1", "0"])
def test_bench_pipeline_names_threads(threads: str, tmp_path: Path, capsys) -> None:
    """``--threads -1`` was passed on to the loaders, whose error did not name the option."""
    code, err = _run(["bench", "pipeline", "--data", str(tmp_path), "--threads", threads], capsys)
    assert code == 2 and err.strip() == f"regpipe bench: error: --threads must be a positive integer, got {threads}"


def test_cli_prints_a_dataloader_workers_error_as_its_original_line() -> None:
    from torch.utils.data import DataLoader, Dataset

    from regpipe.cli.command import user_message

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> None:
            raise ValueError(f"cannot decode image /data/img{i}.jpg: broken data")

    with pytest.raises(ValueError) as caught:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # torch's wrapping
    assert user_message(caught.value) == "cannot decode image /data/img0.jpg: broken data"
    assert user_message(ValueError("plain message")) == "plain message"


# -- 5. atomic writes ------------------------------------------------------------------------------------------
def _half_then_killed(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
    """Replace ``cls.name`` (a writer taking the path first) by one that writes half a file, then is killed."""
    def half(self: object, path: object, *args: object, **kwargs: object) -> None:
        target = self if isinstance(self, Path) else path
        Path(target).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, name, half)


def test_show_writes_its_png_atomically(fake_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from matplotlib.figure import Figure

    _half_then_killed(monkeypatch, Figure, "savefig")
    out = tmp_path / "pictures" / "sum.png"
    assert main(["show", "sum", "--out", str(out), "--data-dir", str(fake_dir)]) == 130
    assert list(out.parent.iterdir()) == []  # neither a half PNG nor its temporary file


def test_bench_writes_its_json_atomically(tmp_path: Path, monkeypatch) -> None:
    from regpipe.cli.bench import BenchConfig, write_json

    out = tmp_path / "rows.json"
    write_json(out, [{"name": "a"}], [], BenchConfig.quick())
    assert json.loads(out.read_text())["rows"] == [{"name": "a"}]
    _half_then_killed(monkeypatch, Path, "write_text")
    with pytest.raises(KeyboardInterrupt):
        write_json(out, [{"name": "b"}], [], BenchConfig.quick())
    monkeypatch.undo()
    assert json.loads(out.read_text())["rows"] == [{"name": "a"}]  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


def test_beton_write_removes_the_temporary_files_of_dead_writers(tmp_path: Path) -> None:
    """A killed write left ``.X.beton.tmp-PID`` behind for good."""
    pytest.importorskip("ffcv")
    from regpipe.loaders.ffcv import write_beton

    path = tmp_path / "train.beton"
    dead = tmp_path / ".train.beton.tmp-2147483646"  # no such process
    live = tmp_path / f".train.beton.tmp-{os.getppid()}"  # pytest's parent: alive, maybe still writing
    other = tmp_path / ".val.beton.tmp-2147483646"  # another file's leftover: not this write's business
    for leftover in (dead, live, other):
        leftover.write_bytes(b"partial")
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_beton(path, images, torch.arange(6) % 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])
    from ffcv.reader import Reader

    assert Reader(str(path)).num_samples == 6


# -- 6. --val-resize follows --image-size ----------------------------------------------------------------------
@pytest.mark.parametrize("image_size,expected", [(224, 256), (64, 73), (96, 110), (32, 37)])
def test_val_resize_defaults_to_the_imagenet_ratio_of_the_image_size(image_size: int, expected: int) -> None:
    """It was 256 whatever the image size: at 96 px validation saw the central 37 % of the image's side."""
    from regpipe.cli.train import parse_train
    from regpipe.engine.config import TrainConfig

    assert TrainConfig(image_size=image_size).val_resize == expected == round(image_size * 256 / 224)
    assert parse_train(["--image-size", str(image_size)]).val_resize == expected
    assert TrainConfig(image_size=image_size, val_resize=image_size).val_resize == image_size  # a given value stays


@pytest.mark.parametrize("image_size,val_resize,needle", [
    (96, 256, "train.val_resize=256 is 2.67 x train.image_size=96"),
    (32, 49, "train.val_resize=49 is 1.53 x train.image_size=32"),
    (32, 16, "train.val_resize=16 must be >= train.image_size=32"),
])
def test_val_resize_far_from_the_image_size_is_refused(image_size: int, val_resize: int, needle: str,
                                                       tmp_path: Path, capsys) -> None:
    from regpipe.engine.config import TrainConfig
    from regpipe.engine.config_checks import check_config

    check_config(TrainConfig(image_size=32, val_resize=48))  # ratio 1.5, the bound, is accepted
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        check_config(TrainConfig(image_size=image_size, val_resize=val_resize))
    code, err = _run(["train", "--data", f"imagefolder:{tmp_path}", "--image-size", str(image_size), "--val-resize",
                      str(val_resize), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_default_val_resize_validates_well_at_64_px(tmp_path: Path) -> None:
    """A learnable folder trained and validated at --image-size 64 with the default resize (73): far above chance
    (0.25 for 4 classes)."""
    root = write_image_folder(tmp_path / "images", train_per_class=8, val_per_class=4)
    out = tmp_path / "run"
    assert main(["train", "--data", f"imagefolder:{root}", "--image-size", "64", "--epochs", "3", "--batch-size", "8",
                 "--recipe", "baseline", "--model", "tinymodels:pooled_linear", "--lr", "0.2", "--workers", "0",
                 "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["val_resize"] == 73
    assert metrics["test_accuracy"] >= 0.75, metrics["epochs"]


def test_a_corrupt_state_is_refused_before_a_teacher_trains(fake_dir: Path, tmp_path: Path, capsys,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``sign --resume`` with a corrupt ``state.pt`` failed only after the baseline teacher had trained."""
    import regpipe.engine.build as engine_build

    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(b"not a state")
    monkeypatch.setattr(engine_build, "prepare_data", lambda *a, **k: pytest.fail("data was read first"))
    code, err = _run(["train", "--recipe", "sign", "--resume", "--data-dir", str(fake_dir), "--out", str(out),
                      *TINY], capsys)
    assert code == 2 and f"{out / 'state.pt'} is not a readable regpipe training state" in err
    assert not (out / "teacher.pt").exists()
