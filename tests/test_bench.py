"""`regpipe bench --quick --json`: the rows' keys and their ratios (no timing thresholds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from regpipe.cli.bench import ROW_KEYS
from regpipe.cli import main


def test_bench_quick_writes_consistent_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0
    payload = json.loads(path.read_text())
    rows, notes = payload["rows"], payload["notes"]
    assert payload["machine"]["torch"] and payload["config"]["device"] == "cpu"
    groups: dict[str, list[dict]] = {}
    for row in rows:
        assert set(ROW_KEYS) <= row.keys(), row
        assert {"name", "provider", "shape", "dtype", "device", "median_ms", "ratio"} <= row.keys()
        assert row["device"] == "cpu" and isinstance(row["shape"], list) and len(row["shape"]) == 4
        assert row["median_ms"] > 0 and math.isfinite(row["median_ms"])
        groups.setdefault(row["group"], []).append(row)
    assert set(groups) == {"mix-uint8", "mix-float", "block-mask", "step"}
    for group_rows in groups.values():
        base = group_rows[0]
        assert base["ratio"] == pytest.approx(1.0)
        names = [r["name"] for r in group_rows]
        assert len(set(names)) == len(names)
        for row in group_rows:
            assert row["baseline"] == base["name"]
            assert row["ratio"] == pytest.approx(row["median_ms"] / base["median_ms"], rel=1e-9)
    providers = {r["provider"] for r in rows}
    assert {"torch", "regpipe"} <= providers
    # Peers are either timed or skipped with a note naming them; never an error.
    for peer, what in (("timm", "timm Mixup"), ("torchvision", "torchvision MixUp"), ("kornia", "kornia RandomMixUpV2")):
        assert peer in providers or any(n.startswith(what) for n in notes), (peer, notes)
    out = capsys.readouterr().out
    assert "median ms" in out and "eager: normalize + sum_mix k=2" in out and str(path) in out


def test_bench_rejects_cuda_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_bench_rejects_bad_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--repeats", "0"]) == 2
    assert "repeats must be >= 1, got 0" in capsys.readouterr().err


def test_timm_dropblock_is_timed_with_a_mask_per_channel_as_regpipes() -> None:
    """Newer timm couples the channels by default (one mask for all C) and ignores ``fast``: the comparison gives
    it ``couple_channels=False``; older timm (no such argument) masks each channel already, fast or not."""
    from types import SimpleNamespace

    from regpipe.cli.bench import _timm_dropblock_variants

    class Newer:
        def __init__(self, drop_prob: float = 0.1, block_size: int = 7, couple_channels: bool = True,
                     **kwargs: object) -> None: ...

    class Older:
        def __init__(self, drop_prob: float = 0.1, block_size: int = 7, batchwise: bool = False,
                     fast: bool = True) -> None: ...

    assert [o for _, o in _timm_dropblock_variants(SimpleNamespace(DropBlock2d=Newer))] == [{"couple_channels": False}]
    assert [o for _, o in _timm_dropblock_variants(SimpleNamespace(DropBlock2d=Older))] == [{"fast": True},
                                                                                             {"fast": False}]


def test_gpu_stage_check_runs_its_cases_eagerly_on_cpu(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python part of ``benchmarks/gpu_check.sh`` (its dry run here: the sync and graph checks need CUDA)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_stage_check.py"
    spec = importlib.util.spec_from_file_location("gpu_stage_check", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_stage_check", module)  # its dataclasses resolve names there
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--side", "16"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "| eager |" in line]
    assert len(rows) == len(module.CASES) and all("| pass |" in line for line in rows)
