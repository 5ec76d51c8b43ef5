"""``regpipe demo`` (``make demo``, issue 22 part 5): the baseline and one method on the same budget, a verdict
and a picture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from regpipe.cli import main
from regpipe.cli.demo import verdict

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--eval-limit", "20",
        "--no-progress"]


def row(recipe: str, clean: float, fgsm: float) -> dict:
    return {"recipe": recipe, "mean_test_accuracy": clean, "eval": {"fgsm": {"mean": fgsm}}}


def test_demo_trains_both_runs_names_them_and_writes_the_picture(fake_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--data-dir", str(fake_dir), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "regpipe demo: baseline vs invariance, 1 epochs each, seed 0" in printed
    assert "| baseline | 1 |" in printed and "| invariance | 1 |" in printed  # the table names both runs
    assert "- clean test accuracy: " in printed and "- FGSM 8/255 accuracy: " in printed
    assert f"picture (both runs' test accuracy per epoch, and their clean and FGSM accuracy): {out / 'demo.png'}" \
        in printed
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [r["recipe"] for r in summary] == ["baseline", "invariance"]
    # the same budget: the same optimizer steps and training rows (replication draws batch/m seeds a step)
    assert summary[0]["mean_optimizer_steps"] == summary[1]["mean_optimizer_steps"]
    assert summary[0]["mean_images_seen"] == summary[1]["mean_images_seen"]
    # the verdict printed is the one of the numbers written
    assert all(f"- {line}" in printed for line in verdict(summary))


def test_verdict_says_who_is_ahead_and_whether_the_claim_shows() -> None:
    lines = verdict([row("baseline", 0.75, 0.22), row("invariance", 0.65, 0.45)])
    assert lines[0] == "clean test accuracy: baseline is ahead (invariance 65.0 % vs baseline 75.0 %, -10.0 points)"
    assert lines[1] == "FGSM 8/255 accuracy: invariance is ahead (invariance 45.0 % vs baseline 22.0 %, +23.0 points)"
    assert lines[2].startswith("the robustness claim shows here: invariance withstands FGSM better")
    assert "invariance trails on clean accuracy at this short budget" in lines

    lines = verdict([row("baseline", 0.75, 0.22), row("sum", 0.752, 0.215)], replicates=False)
    assert lines[0].startswith("clean test accuracy: no clear difference (sum 75.2 % vs baseline 75.0 %")
    assert lines[1].startswith("FGSM 8/255 accuracy: no clear difference")
    assert lines[2] == ("at this budget sum shows no FGSM gain over the baseline: the robustness claim does not "
                        "show here")
    assert not any("trails" in line for line in lines)


def test_demo_refuses_bad_settings_before_any_work(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="not the baseline and one method|baseline with one method"):
        verdict([row("sum", 0.7, 0.1), row("baseline", 0.7, 0.1)])
    assert main(["demo", "--method", "baseline", "--out", str(tmp_path / "d")]) == 2
    assert "--method baseline" in capsys.readouterr().err
    assert main(["demo", "--method", "gradual+nope", "--out", str(tmp_path / "d")]) == 2
    assert "unknown recipe word" in capsys.readouterr().err
    assert main(["demo", "--eval-limit", "1", "--out", str(tmp_path / "d")]) == 2
    assert "limit must be an integer >= 2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
