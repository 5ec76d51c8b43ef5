"""Issue 16, case by case: no silent NaN, no silently dropped rows, every bad value named before work starts,
atomic writes. Each test fails on the behaviour the issue reports and passes after.

Tests marked ``xfail(strict=True, reason="needs call in <file>")`` check a validation written in a module of
this layer that still has to be called from the file named; they turn into failures (XPASS) once it is.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from regpipe.cli import main
from regpipe.core.batch import Batch
from regpipe.core.checks import check_dense_labels, check_pixel_range
from regpipe.engine.cascade import Cascade
from regpipe.engine.validate import check_output_path, check_run_outputs, infer_num_classes, read_json, read_npz
from regpipe.functional.invariance import invariance_loss
from regpipe.functional.patchup import patchup_loss, patchup_mix
from regpipe.functional.sum_mix import group_rows, sum_mix
from regpipe.sampler import LossOrderer

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]


class NanModel(nn.Module):
    """A model whose outputs are NaN (a diverged or broken model)."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * math.nan


def nan_model(num_classes: int, in_channels: int) -> nn.Module:
    """``--model test_reliability:nan_model`` (this folder is on ``sys.path`` under pytest)."""
    return NanModel(num_classes, in_channels)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# -- silently wrong -> a clear error --------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["loss-delta", "loss-delta-external"])
def test_loss_delta_recipes_stop_on_a_nan_model(recipe: str, fake_dir: Path, tmp_path: Path, capsys) -> None:
    """Used to exit 0 with train_loss NaN in metrics.json."""
    out = tmp_path / recipe
    code, err = _run(["train", "--recipe", recipe, "--model", "test_reliability:nan_model", "--data-dir",
                      str(fake_dir), "--out", str(out), *TINY], capsys)
    assert code == 2, err
    # the loop's own step refuses it (the orderer takes its trials through it), naming the candidate
    assert f"training loss became nan at epoch 1 step 1 (recipe '{recipe}')" in err and "candidate 0" in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--recipe", "sum", "--k", "3", "--batch-size", "64", "--samples-per-class", "7"], "never read 1 rows"),
    (["--recipe", "gradual", "--k0", "4", "--batch-size", "7"], "never read 3 rows"),
])
def test_group_mixing_that_would_drop_rows_is_refused(argv: list[str], needle: str, fake_dir: Path, tmp_path: Path,
                                                      capsys) -> None:
    code, err = _run(["train", *TINY, *argv, "--data-dir", str(fake_dir), "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and needle in err


def test_opted_in_drop_is_announced_with_its_count() -> None:
    with pytest.warns(UserWarning, match="leaves out the last 1 of 65 rows"):
        assert group_rows(65, 4, drop_remainder=True) == 16


@pytest.mark.parametrize("lam", [math.nan, math.inf, 2.5, -0.1, torch.tensor([0.5, math.nan, 0.5, 0.5])])
def test_patchup_mix_refuses_a_lam_outside_the_unit_interval(lam: object) -> None:
    h = torch.rand(4, 2, 5, 5)
    holes = torch.zeros(2, 5, 5)
    holes[:, 1:3, 1:3] = 1
    with pytest.raises(ValueError, match=r"^lam must be (in \[0, 1\]|a finite number)"):
        patchup_mix(h, holes, torch.tensor([1, 0, 3, 2]), lam, "soft")


@pytest.mark.parametrize("kwargs", [{"degrees": math.nan}, {"degrees": math.inf}])
def test_random_affine_refuses_non_finite_settings(kwargs: dict) -> None:
    from regpipe.ops.augment import RandomAffine

    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RandomAffine(**kwargs)


@pytest.mark.parametrize("perms,needle", [
    (torch.zeros(1, 6, dtype=torch.long), "not a permutation of range(6): index 0 appears 6 times"),
    (torch.tensor([[0, 1, 2, 3, 4, 4]]), "index 4 appears 2 times"),
    (torch.tensor([[0, 1, 2, 3, 4, 6]]), "holds index 6 at position 5, outside [0, 6)"),
    (torch.tensor([[0, 1, 2, 3, 4, -1]]), "holds index -1"),
])
def test_sum_mix_refuses_perms_that_are_not_permutations(perms: torch.Tensor, needle: str) -> None:
    x, y = torch.rand(6, 3, 4, 4), torch.eye(3)[torch.arange(6) % 3]
    with pytest.raises(ValueError, match=r"^perms row 0") as err:
        sum_mix(x, y, [0.5, 0.5], perms=perms)
    assert needle in str(err.value)


@pytest.mark.parametrize("targets,needle", [
    (torch.full((4, 2), 2.5), "row 0 sums to 5"),
    (torch.tensor([[1.5, -0.5]] * 4), "non-negative"),
    (torch.tensor([[math.nan, 1.0]] * 4), "non-finite"),
])
def test_batch_refuses_targets_that_are_not_soft_targets(targets: torch.Tensor, needle: str) -> None:
    with pytest.raises(ValueError, match="Batch.targets") as err:
        Batch(torch.rand(4, 3, 4, 4), targets, torch.arange(4))
    assert needle in str(err.value)


def test_batch_refuses_tensors_on_different_devices() -> None:
    # 'meta' stands in for a second device on a CPU-only machine: only .device is read
    with pytest.raises(ValueError, match=r"Batch tensors must be on one device.*inputs on cpu, targets on meta"):
        Batch(torch.rand(4, 3, 4, 4), torch.full((4, 2), 0.5, device="meta"), torch.arange(4))


def test_torch_loader_refuses_float_images_in_0_255() -> None:
    from regpipe.loaders.torch import TorchLoader

    x = torch.rand(8, 3, 8, 8) * 255
    loader = TorchLoader([(x, torch.arange(8) % 2, torch.arange(8))], 2, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ValueError, match="0..1 pixel scale"):
        next(iter(loader))


def test_torch_loader_accepts_sign_rows_outside_0_1() -> None:
    """SIGN's unclamped iterates leave [0, 1] by several units (mean |delta| about 1 at K = 100): not a slip."""
    from regpipe.loaders.torch import TorchLoader

    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 20 - 9  # values in [-9, 11]
    loader = TorchLoader([(x, torch.arange(8) % 2, torch.arange(8))], 2, mean=(0.5,) * 3, std=(0.25,) * 3)
    batch = next(iter(loader))
    torch.testing.assert_close(batch.inputs, (x - 0.5) / 0.25)


def test_pixel_range_check_names_the_range() -> None:
    check_pixel_range("images", torch.rand(2, 3, 4, 4))  # 0..1: fine
    check_pixel_range("images", torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8))  # uint8: fine
    with pytest.raises(ValueError, match=r"images are floating point with values in \[0, 255\]"):
        check_pixel_range("images", torch.tensor([0.0, 255.0]).view(1, 1, 1, 2))


@pytest.mark.parametrize("metric", [math.inf, -math.inf, math.nan])
def test_cascade_refuses_a_non_finite_metric(metric: float) -> None:
    """``report(inf)`` used to become the best metric forever."""
    cascade = Cascade(stages=(4, 2, 1), patience=1)
    with pytest.raises(ValueError, match=r"validation metric must be finite.*stage k=4"):
        cascade.report(metric)
    assert cascade.best == -math.inf and cascade.history == []


def test_cascade_state_records_and_checks_the_settings() -> None:
    """``state_dict`` lacked ``patience``: loaded into another cascade it silently changed the schedule."""
    saved = Cascade(stages=(4, 2, 1), patience=3)
    saved.report(0.5)
    state = saved.state_dict()
    assert state["patience"] == 3
    with pytest.raises(ValueError, match=r"patience: 3 in the state vs 1 here"):
        Cascade(stages=(4, 2, 1), patience=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"mode: 'max' in the state vs 'min' here"):
        Cascade(stages=(4, 2, 1), patience=3, mode="min").load_state_dict(state)
    same = Cascade(stages=(4, 2, 1), patience=3)
    same.load_state_dict(state)
    assert same.state_dict() == state


def test_load_npz_refuses_labels_with_empty_classes(tmp_path: Path) -> None:
    from regpipe.engine.data import load_npz

    path = tmp_path / "gaps.npz"
    np.savez(path, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.array([0, 5, 0, 5]))
    with pytest.raises(ValueError, match=r"no sample of class\(es\) \[1, 2, 3, 4\] of 6"):
        load_npz(path)


def test_label_inference_names_the_empty_classes(tmp_path: Path) -> None:
    assert infer_num_classes(np.array([0, 1, 2, 1]), "a.npz") == 3
    with pytest.raises(ValueError, match=r"a.npz: labels has no sample of class\(es\) \[1, 2, 3, 4\] of 6 "
                                         r"\(labels found: \[0, 5\]\)"):
        infer_num_classes(np.array([0, 5, 0, 5]), "a.npz")
    with pytest.raises(ValueError, match="negative label -1"):
        check_dense_labels("labels", torch.tensor([0, -1]))


def test_invariance_loss_refuses_a_batch_without_replicas() -> None:
    """Used to return 0.0 (no within-seed variance to measure) whatever the model did."""
    with pytest.raises(ValueError, match=r"all 6 rows are their own seed"):
        invariance_loss(torch.randn(6, 4), torch.arange(6))
    with pytest.raises(ValueError, match=r"all 6 rows are their own seed"):
        invariance_loss(torch.randn(6, 4), 1)  # Batch.replicas = 1: nothing replicated
    assert float(invariance_loss(torch.randn(6, 4), torch.arange(6) // 2)) > 0
    assert float(invariance_loss(torch.randn(6, 4), 2)) > 0


# -- errors that came too late or unclear ---------------------------------------------------------------------
def test_output_path_checks(tmp_path: Path) -> None:
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    check_run_outputs(str(tmp_path / "new" / "run"), str(tmp_path / "new" / "model.pt"))  # creatable: fine
    assert not (tmp_path / "new").exists()  # and nothing was created
    with pytest.raises(ValueError, match=rf"--out {regular}/run cannot be created: {regular} is a file"):
        check_run_outputs(str(regular / "run"), None)
    with pytest.raises(ValueError, match=rf"--checkpoint-out {regular}/m.pt cannot be created: {regular} is a file"):
        check_run_outputs(None, str(regular / "m.pt"))
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_path("--out", regular, "dir")
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        check_output_path("--checkpoint-out", tmp_path, "file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_path_without_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ValueError, match="no permission to write"):
            check_run_outputs(str(locked / "run"), None)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("option", ["--out", "--checkpoint-out"])
def test_train_refuses_an_output_under_a_regular_file_before_training(option: str, fake_dir: Path, tmp_path: Path,
                                                                      capsys, monkeypatch) -> None:
    import regpipe.engine.train as engine_train

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was read before the output path was checked")

    monkeypatch.setattr(engine_train, "load_dataset", no_data, raising=False)
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    argv = ["train", "--recipe", "baseline", "--data-dir", str(fake_dir), *TINY, "--out", str(tmp_path / "run")]
    argv += [option, str(regular / "sub" / ("model.pt" if option == "--checkpoint-out" else "run"))]
    code, err = _run(argv, capsys)
    assert code == 2 and f"{option} " in err and "is a file" in err


@pytest.mark.parametrize("argv,needle", [
    (["--recipe", "sign", "--sign-iters", "0"], "sign.iters must be integers >= 1"),
    (["--recipe", "sign", "--sign-eta", "nan"], "sign.eta must be a finite number, got nan"),
    (["--lr", "nan"], "train.lr must be a finite number, got nan"),
    (["--lr", "inf"], "train.lr must be a finite number, got inf"),
    (["--recipe", "cascade", "--stages", ""], "cascade.stages must be strictly decreasing"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "cuda:abc"], "unknown device 'cuda:abc'"),
    (["--model", "builtins:dict"], "returned dict, not a torch.nn.Module"),
    (["--seed", str(2**70)], "train.seed must be an integer in [0, 2**63)"),
    (["--tta-draws", "-1"], "train.tta_draws must be an integer >= 0, got -1"),
])
def test_bad_settings_give_one_line(argv: list[str], needle: str, fake_dir: Path, tmp_path: Path, capsys) -> None:
    code, err = _run(["train", *TINY, "--data-dir", str(fake_dir), "--out", str(tmp_path / "run"), *argv], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_patchup_bce_on_nan_logits_is_a_nan_loss_not_a_range_error() -> None:
    """``F.binary_cross_entropy`` raised "all elements of input should be between 0 and 1" (a device-side
    assert on CUDA); the loss is now NaN, which the training loop reports with its step."""
    logits = torch.full((4, 3), math.nan)
    y = torch.eye(3)[torch.tensor([0, 1, 2, 0])]
    loss = patchup_loss(logits, y, torch.tensor([1, 0, 3, 2]), 0.5, 0.7, "soft", kind="bce")
    assert math.isnan(float(loss))


def test_patchup_bce_matches_torch_on_finite_logits() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, requires_grad=True)
    y = torch.eye(5)[torch.randint(0, 5, (6,), generator=g)]
    perm = torch.tensor([1, 0, 3, 2, 5, 4])
    ours = patchup_loss(logits, y, perm, 0.3, 0.6, "soft", kind="bce")
    from regpipe.functional.patchup import patchup_targets

    tb, trw = patchup_targets(y, perm, 0.3, 0.6, "soft")
    probs = torch.softmax(logits, 1)
    bce = torch.nn.functional.binary_cross_entropy
    ref = (bce(probs, y, reduction="none").mean(1) * 0.6 + bce(probs, tb, reduction="none").mean(1) * 0.4
           + bce(probs, trw, reduction="none").mean(1)).mean()
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
def test_unreadable_npz_is_named(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path} \({len(content)} bytes\) is not a readable .npz archive"):
        read_npz(path)
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((2, 1, 4, 4), np.uint8), labels=np.array([0, 1]))
    with read_npz(good) as arrays:
        assert sorted(arrays.files) == ["images", "labels"] and arrays["labels"].tolist() == [0, 1]


def test_load_npz_names_a_truncated_file(tmp_path: Path) -> None:
    from regpipe.engine.data import load_npz

    path = tmp_path / "half.npz"
    np.savez(path, images=np.zeros((64, 1, 8, 8), np.uint8), labels=np.arange(64) % 2)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=rf"{path} \(300 bytes\) is not a readable .npz archive"):
        load_npz(path)


def test_loss_orderer_with_the_wrong_num_classes() -> None:
    data = (torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8), torch.arange(12) % 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    with pytest.raises(ValueError, match=r"logits of shape \(12, 3\) but the targets are \(12, 5\)"):
        list(LossOrderer(data, model, 4, num_classes=5))

    class Arrays:
        num_classes = 3
        images, labels = data

        def __len__(self) -> int:
            return 12

    with pytest.raises(ValueError, match="num_classes=5 differs from the data's num_classes=3"):
        LossOrderer(Arrays(), model, 4, num_classes=5)


@pytest.mark.parametrize("command", ["compare", "sign", "train"])
def test_interrupt_prints_one_line(command: str, monkeypatch, capsys) -> None:
    """Ctrl-C used to print a KeyboardInterrupt traceback."""
    import regpipe.cli.compare
    import regpipe.cli.sign
    import regpipe.cli.train

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    module = {"compare": regpipe.cli.compare, "sign": regpipe.cli.sign, "train": regpipe.cli.train}[command]
    monkeypatch.setattr(module, "run", interrupted)
    argv = {"compare": ["compare"], "sign": ["sign", "--checkpoint", "c.pt", "--out", "o"], "train": ["train"]}[command]
    code, err = _run(argv, capsys)
    hint = "nothing was written" if command == "train" else "rerun the same command to resume"
    assert code == 130 and err.strip() == f"regpipe {command}: interrupted; {hint}"


def test_sign_with_a_bad_setting_writes_nothing(tmp_path: Path) -> None:
    """``--eta nan`` used to write manifest.json first: the corrected rerun into the same folder was refused."""
    from regpipe.engine.sign_dataset import generate

    out = tmp_path / "sign"
    for bad in ({"eta": math.nan}, {"eta": 0.0}, {"shard_size": 0}, {"at": "middle"}, {"batch_size": -1}):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            generate(tmp_path / "missing.pt", out, **bad)
        assert not out.exists()


def test_interrupted_shard_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    from regpipe.engine import sign_dataset

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", killed)
    with pytest.raises(KeyboardInterrupt):
        sign_dataset.write_npz(tmp_path / "shard-00000.npz", {"a": np.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_stale_beton_temporaries_are_recognised(tmp_path: Path) -> None:
    from regpipe.core.files import writer_gone

    assert writer_gone(tmp_path / f"sign_k50.beton.tmp-{os.getpid()}")  # our own leftover
    assert not writer_gone(tmp_path / f"sign_k50.beton.tmp-{os.getppid()}")  # a live writer
    assert writer_gone(tmp_path / "sign_k50.beton.tmp-2147483646")  # no such process


def test_compare_names_a_half_written_metrics_file(fake_dir: Path, tmp_path: Path, capsys) -> None:
    """A half metrics.json made compare fail with a JSON error that did not name the file."""
    out = tmp_path / "cmp"
    argv = ["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out", str(out), *TINY]
    half = out / "baseline" / "seed0" / "metrics.json"
    half.parent.mkdir(parents=True)
    half.write_text('{"recipe": "baseline", "config": {"epo')
    code, err = _run(argv, capsys)
    assert code == 2 and f"{half} is not valid JSON" in err and "delete it" in err


def test_read_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text("{")
    with pytest.raises(ValueError, match=rf"{path} is not valid JSON"):
        read_json(path)
    with pytest.raises(FileNotFoundError, match="JSON file not found"):
        read_json(tmp_path / "none.json")
    path.write_text(json.dumps({"a": 1}))
    assert read_json(path) == {"a": 1}


def test_compare_writes_its_outputs_atomically(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out", str(out),
                 *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["baseline", "compare.json", "compare.md", "compare.png"]
    assert json.loads((out / "compare.json").read_text())["summary"][0]["recipe"] == "baseline"
