"""``regpipe write-beton`` and ``regpipe bench pipeline`` (smoke runs on a tiny JPEG folder; no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jpegfolder import SIZES, make_jpeg_folder
from regpipe.cli import main


def test_write_beton_writes_image_and_label_fields_in_file_index_order(tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    from ffcv.reader import Reader

    from regpipe.loaders.file_index import FileIndex

    make_jpeg_folder(tmp_path / "data")
    out = tmp_path / "out" / "train.beton"
    assert main(["write-beton", str(tmp_path / "data"), str(out), "--max-resolution", "48", "--jpeg-quality", "95",
                 "--write-mode", "jpg"]) == 0
    reader = Reader(str(out))
    assert list(reader.handlers) == ["image", "label"]
    meta = reader.metadata
    assert meta["f1"].tolist() == FileIndex(tmp_path / "data").labels.tolist()
    assert max(max(h, w) for h, w in zip(meta["f0"]["height"], meta["f0"]["width"])) <= 48
    assert main(["write-beton", str(tmp_path / "nowhere"), str(out)]) == 2
    assert main(["write-beton", str(tmp_path / "data"), str(out), "--jpeg-quality", "0"]) == 2


def test_bench_pipeline_prints_its_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_jpeg_folder(tmp_path / "data")
    out = tmp_path / "rows.json"
    assert main(["bench", "pipeline", "--data", str(tmp_path / "data"), "--loader", "torch", "--batch", "2",
                 "--copies", "2", "--size", "16", "--steps", "1", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["bare", "bare+stage", "stage-alone", "native-rep", "regpipe-rep"]
    assert all(r["loader"] == "torch" and r["images_per_s"] > 0 for r in rows)
    stage = rows[2]
    assert stage["against"] == "bare" and stage["share"] == pytest.approx(1 / stage["ratio"], rel=0.01)
    assert "regpipe-rep" in capsys.readouterr().out
    assert main(["bench", "pipeline", "--loader", "torch"]) == 2  # --data is required
    assert len(SIZES) >= 2


def test_bench_pipeline_takes_the_data_specs_of_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``imagefolder:ROOT`` times ``ROOT/train``; a bare ``ROOT`` holding splits, a folder without class folders,
    a ``.beton`` for another loader or a missing path are one line each (exit 2), before any timing."""
    from regpipe.cli.bench_pipeline import bench_source

    make_jpeg_folder(tmp_path / "root" / "train")
    make_jpeg_folder(tmp_path / "root" / "val")
    assert bench_source(f"imagefolder:{tmp_path / 'root'}", "dali") == tmp_path / "root" / "train"
    assert bench_source(tmp_path / "root" / "train", "torch") == tmp_path / "root" / "train"
    (tmp_path / "a.beton").write_bytes(b"")
    assert bench_source(f"beton:{tmp_path / 'a.beton'},{tmp_path / 'b.beton'}", "ffcv") == tmp_path / "a.beton"
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"")
    cases = {str(tmp_path / "root"): f"imagefolder:{tmp_path / 'root'}",  # splits given bare: the fix is named
             str(tmp_path / "flat"): "no class sub-folders",
             f"beton:{tmp_path / 'a.beton'},{tmp_path / 'b.beton'}": "read by FFCV: use --loader ffcv",
             f"imagefolder:{tmp_path / 'nowhere'}": "does not exist"}
    for data, message in cases.items():
        assert main(["bench", "pipeline", "--data", data, "--loader", "torch", "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
