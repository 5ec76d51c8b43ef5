"""`regpipe eval` and the robustness engine: deformed sets, TTA under EOT attacks, the CLI and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from regpipe.cli import main
from regpipe.engine.robustness import (
    DEFORMATIONS,
    EvalSettings,
    TTAEnsemble,
    deform,
    deformation_affine,
    tta_log_probs,
)
from regpipe.functional import tta as functional_tta
from regpipe.ops.tta import draw_partners

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]
BY_NAME = {d.name: d for d in DEFORMATIONS}


@pytest.fixture(scope="module")
def trained(fake_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A baseline checkpoint trained 1 epoch on the fake data, and its metrics."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = root / "model.pt"
    assert main(["train", "--recipe", "baseline", "--data-dir", str(fake_dir), "--out", str(root / "run"), *TINY,
                 "--checkpoint-out", str(ckpt)]) == 0
    return ckpt, json.loads((root / "run" / "metrics.json").read_text())


def _point_image(size: int, row: int, col: int) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, col] = 1.0
    return image


def _peak(image: torch.Tensor) -> tuple[int, int]:
    flat = int(image[0, 0].flatten().argmax())
    return divmod(flat, image.shape[-1])


@pytest.mark.parametrize("name, scale", [("zoom-0.6", 0.6), ("zoom-0.8", 0.8), ("zoom-1.2", 1.2), ("zoom-1.4", 1.4)])
def test_zoom_sets_move_a_known_point_by_the_documented_scale(name: str, scale: float) -> None:
    # 41x41: the centre is pixel 20; a point 10 px right and 5 px up lands at scale * (10, -5) from it.
    out = deform(_point_image(41, 15, 30), BY_NAME[name])
    assert _peak(out) == (20 + round(-5 * scale), 20 + round(10 * scale))


@pytest.mark.parametrize("name, limit", [("rotate-20", 20.0), ("rotate-40", 40.0)])
def test_rotation_sets_turn_a_known_point_by_their_drawn_angle(name: str, limit: float) -> None:
    n = 64
    theta = deformation_affine(BY_NAME[name], n, 41, 41)
    # the drawn angles, read back from the matrices (output -> input: the inverse rotation, y down)
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    assert bool((angles.abs() <= limit + 1e-4).all()) and float(angles.abs().max()) > 0.8 * limit
    images = _point_image(41, 20, 34).repeat(n, 1, 1, 1)  # 14 px right of the centre
    out = deform(images, BY_NAME[name])
    for i in range(0, n, 9):
        a = math.radians(float(angles[i]))
        expected = (20 - 14 * math.sin(a), 20 + 14 * math.cos(a))  # counter-clockwise on screen, y down
        peak = _peak(out[i:i + 1])
        assert abs(peak[0] - expected[0]) <= 1 and abs(peak[1] - expected[1]) <= 1, (i, peak, expected)


@pytest.mark.parametrize("name, limit", [("shear-28.6", 28.6), ("shear-57.3", 57.3)])
def test_shear_sets_slide_rows_along_x_by_tan_of_their_angle(name: str, limit: float) -> None:
    n = 32
    theta = deformation_affine(BY_NAME[name], n, 41, 41)
    # output -> input of x' = x + tan(s) y is x = x' - tan(s) y'
    shear = torch.rad2deg(torch.atan(-theta[:, 0, 1]))
    assert bool((shear.abs() <= limit + 1e-3).all()) and torch.allclose(theta[:, 1], torch.tensor([0.0, 1.0, 0.0]))
    images = _point_image(41, 28, 20).repeat(n, 1, 1, 1)  # 8 px below the centre
    out = deform(images, BY_NAME[name])
    for i in range(0, n, 5):
        expected_col = 20 + 8 * math.tan(math.radians(float(shear[i])))
        row, col = _peak(out[i:i + 1])
        assert row == 28 and abs(col - expected_col) <= 1


def test_deformed_sets_are_the_same_images_for_every_call() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for d in DEFORMATIONS:
        first = deform(images, d)
        assert first.dtype == torch.uint8 and torch.equal(first, deform(images, d))
    assert sum(d.paper for d in DEFORMATIONS) == 8


def test_tta_log_probs_is_the_log_of_the_tta_predictor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x = torch.randn(7, 3, 2, 2)
    partners = draw_partners(5, 7, 3, torch.Generator().manual_seed(1))
    expected = functional_tta.test_time_sum_predict(model, x, partners, weight=1.5)
    torch.testing.assert_close(tta_log_probs(model, x, partners, weight=1.5).exp(), expected, rtol=1e-5, atol=1e-6)


def test_the_eot_attack_differentiates_through_every_draw() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x = torch.randn(6, 3, 2, 2, requires_grad=True)
    ensemble = TTAEnsemble(model, 4, torch.Generator().manual_seed(0))
    logp = ensemble(x)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(6))
    (grad,) = torch.autograd.grad(logp[:, 0].sum(), x)
    assert bool((grad.abs().flatten(1).sum(1) > 0).all())  # every row moves the ensemble (itself or as a partner)


def test_eval_reports_clean_attacks_deformed_and_tta(trained: tuple[Path, dict], fake_dir: Path,
                                                     tmp_path: Path, capsys) -> None:
    ckpt, metrics = trained
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(fake_dir), "--attacks", "fgsm,pgd",
                 "--steps", "2", "--deformed", "--tta", "2", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # the clean accuracy is the run's own final test accuracy (the same 30 images, the same weights)
    assert result["clean_accuracy"] == metrics["test_accuracy"] and result["test_rows"] == 30
    assert set(result["attacks"]) == {"fgsm", "pgd"}
    assert result["attacks"]["pgd"]["steps"] == 2 and result["attacks"]["fgsm"]["steps"] == 1
    assert result["attacks"]["pgd"]["step_size"] == pytest.approx(2.5 * (8 / 255) / 2)
    assert set(result["deformed"]) == {d.name for d in DEFORMATIONS}
    paper = [v["accuracy"] for v in result["deformed"].values() if v["paper"]]
    assert result["deformed_mean"] == pytest.approx(sum(paper) / 8)
    assert set(result["tta"]["attacks"]) == {"fgsm", "pgd"} and result["tta"]["draws"] == 2
    every = [result["clean_accuracy"], *(v["accuracy"] for v in result["attacks"].values()),
             *(v["accuracy"] for v in result["deformed"].values()), result["tta"]["clean_accuracy"],
             *(v["accuracy"] for v in result["tta"]["attacks"].values())]
    for acc in every:  # counts over the 30 test images
        assert 0.0 <= acc <= 1.0 and acc * 30 == pytest.approx(round(acc * 30))
    text = capsys.readouterr().out
    assert "clean accuracy" in text and "deformed mean" in text and f"written: {out}" in text


def test_zero_budget_leaves_the_clean_accuracy(trained: tuple[Path, dict], fake_dir: Path, tmp_path: Path) -> None:
    ckpt, _ = trained
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data-dir", str(fake_dir), "--eps", "0", "--steps", "1",
                 "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert all(v["accuracy"] == result["clean_accuracy"] for v in result["attacks"].values())


def test_eval_settings_name_bad_values() -> None:
    for kwargs, fragment in [({"attacks": ("fgsm", "cw")}, "unknown attack"), ({"eps": -1.0}, "eps must be"),
                             ({"eps": float("inf")}, "eps must be"), ({"steps": 0}, "steps must be"),
                             ({"step_size": 0.0}, "step_size must be"), ({"tta_draws": -1}, "tta_draws"),
                             ({"eps_space": "pixels"}, "eps_space"), ({"attacks": ("pgd", "pgd")}, "more than once")]:
        with pytest.raises(ValueError, match=fragment):
            EvalSettings(**kwargs)


@pytest.mark.parametrize("argv, fragment", [
    (["--checkpoint", "{tmp}/missing.pt"], "checkpoint not found"),
    (["--checkpoint", "{tmp}/garbage.pt"], "is not a readable regpipe checkpoint"),
    (["--checkpoint", "{ckpt}", "--attacks", "fgsm,deepfool"], "unknown attack(s) ['deepfool']"),
    (["--checkpoint", "{ckpt}", "--eps", "-0.1"], "eps must be a finite number >= 0"),
    (["--checkpoint", "{ckpt}", "--eps", "nan"], "eps must be a finite number >= 0"),
    (["--checkpoint", "{ckpt}", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--checkpoint", "{ckpt}", "--tta", "-2"], "tta_draws must be an integer >= 0, got -2"),
    (["--checkpoint", "{ckpt}", "--json", "{tmp}"], "is a directory"),
    (["--checkpoint", "{ckpt}", "--shape", "native"], "the checkpoint was trained on (3, 32, 32)"),
    (["--checkpoint", "{ckpt}", "--data", "imagefolder:{tmp}"], "in-memory datasets"),
])
def test_bad_eval_arguments_give_one_clear_line(argv: list[str], fragment: str, trained: tuple[Path, dict],
                                                fake_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = [a.format(tmp=tmp_path, ckpt=trained[0]) for a in argv]
    assert main(["eval", *argv, "--data-dir", str(fake_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regpipe eval: error:") and fragment in err, err


def test_compare_eval_adds_accuracy_columns(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out", str(out),
            *TINY, "--eval", "fgsm,pgd,deformed", "--eval-steps", "2", "--eval-limit", "30", "--device", "cpu"]
    assert main(argv) == 0
    table = (out / "compare.md").read_text()
    assert "fgsm accuracy (mean ± std)" in table and "pgd accuracy" in table and "deformed accuracy" in table
    summary = json.loads((out / "compare.json").read_text())["summary"][0]
    assert set(summary["eval"]) == {"fgsm", "pgd", "deformed"}
    # the column is what `regpipe eval` reports for the run's kept checkpoint
    single = tmp_path / "single.json"
    assert main(["eval", "--checkpoint", str(out / "baseline" / "seed0" / "model.pt"), "--data-dir", str(fake_dir),
                 "--attacks", "fgsm,pgd", "--steps", "2", "--deformed", "--limit", "30", "--device", "cpu",
                 "--json", str(single)]) == 0
    result = json.loads(single.read_text())
    assert summary["eval"]["fgsm"]["accuracies"] == [result["attacks"]["fgsm"]["accuracy"]]
    assert summary["eval"]["pgd"]["accuracies"] == [result["attacks"]["pgd"]["accuracy"]]
    assert summary["eval"]["deformed"]["accuracies"] == [result["deformed_mean"]]
    assert result["test_rows"] == 30
    cached = json.loads((out / "baseline" / "seed0" / "eval.json").read_text())
    assert cached["key"]["settings"]["limit"] == 30  # --eval-limit: the first 30 test images
    assert cached["result"]["attacks"]["fgsm"]["accuracy"] == result["attacks"]["fgsm"]["accuracy"]
    assert main(argv) == 0  # a rerun reuses the run and its evaluation


def test_compare_eval_names_an_unknown_column(fake_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out",
                 str(tmp_path / "cmp"), *TINY, "--eval", "fgsm,cw"]) == 2
    assert "--eval: unknown column(s) ['cw']" in capsys.readouterr().err
    assert main(["compare", "--recipes", "baseline", "--seeds", "1", "--data-dir", str(fake_dir), "--out",
                 str(tmp_path / "cmp"), *TINY, "--eval", "fgsm", "--eval-limit", "1"]) == 2
    assert "--eval-limit must be an integer >= 2, got 1" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()  # refused before anything trained
