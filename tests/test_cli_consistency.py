"""End to end: the replicate / invariance / saliency / invariance+saliency recipes and their pictures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from regpipe.cli import main

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "2", "--no-progress"]



@pytest.mark.parametrize("recipe", ["replicate", "invariance", "saliency", "invariance+saliency"])
def test_replication_recipes_train(recipe: str, fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--recipe", recipe, "--data-dir", str(fake_dir), "--out", str(out), *TINY,
                 "--replicas", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["epochs"]
    assert len(rows) == 2 and all(r["m"] == 2 for r in rows)
    # equal compute: an epoch sees as many rows as the baseline's (40 samples / batch 8 = 5 steps x 8 rows)
    assert all(r["steps"] == 5 and r["rows_per_step"] == 8 for r in rows)
    assert all(("mean_invariance" in r) == ("invariance" in recipe) for r in rows)
    assert all(("mean_saliency" in r) == ("saliency" in recipe) for r in rows)
    for r in rows:
        for term in ("mean_invariance", "mean_saliency"):
            if term in r:
                assert math.isfinite(r[term]) and r[term] > 0.0


def test_replication_bad_settings(fake_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["train", "--data-dir", str(fake_dir), "--out", str(tmp_path), *TINY]
    assert main([*args, "--recipe", "replicate", "--replicas", "3"]) == 2
    assert "batch_size=8 is not divisible by replicas=3" in capsys.readouterr().err
    assert main([*args, "--recipe", "invariance", "--replicas", "2", "--inv-layers", "layer1,nope"]) == 2
    assert "no module named 'nope'" in capsys.readouterr().err
    assert main([*args, "--recipe", "saliency", "--replicas", "1"]) == 2
    assert "replication.replicas must be an integer >= 2, got 1" in capsys.readouterr().err
    assert main([*args, "--recipe", "saliency", "--sal-weight", "nan"]) == 2
    assert "saliency.weight must be a finite number, got nan" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["replicate", "saliency"])
def test_show_replication_pictures(what: str, fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{what}.png"
    assert main(["show", what, "--data-dir", str(fake_dir), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
