"""Training under torchrun: 2 processes, gloo backend, CPU (issue 8, part 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regpipe.cli import main
from regpipe.engine.distributed import DistInfo, RankSlice, rank_seed, reseed_ops
from regpipe.ops.augment import Augment, RandomFlip, Replicate
from regpipe.ops.patchup import PatchUp
from regpipe.ops.sum_mix import SumMix
from regpipe.core.batch import Batch

TESTS = Path(__file__).resolve().parent
TINY = ["--samples-per-class", "8", "--val-per-class", "2", "--batch-size", "8", "--epochs", "2", "--no-progress"]



def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "regpipe", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_rank_slice_splits_global_batches() -> None:
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(RankSlice(batches, DistInfo(rank=1, world_size=2))) == [[2, 3], [6, 7]]
    assert list(RankSlice(batches, DistInfo())) == batches
    with pytest.raises(ValueError, match="6 samples cannot be split over 4"):
        list(RankSlice([list(range(6))], DistInfo(rank=0, world_size=4)))


def test_ranks_draw_different_parameters_and_rank0_is_unchanged() -> None:
    batch = Batch.from_labels(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, 2)

    def make() -> list:
        return [SumMix(2, mode="permute", seed=3), Replicate(2, Augment([RandomFlip()], seed=3)), PatchUp(seed=3)]

    ops = {rank: make() for rank in (0, 1)}
    for rank in (0, 1):
        reseed_ops(ops[rank], seed=3, rank=rank)
    assert ops[0][0].rng.seed == 3 and ops[1][0].rng.seed == rank_seed(3, 1) != 3
    assert ops[1][1].augment.rng.seed == rank_seed(3, 1)  # Replicate reseeds the Augment it holds
    assert ops[1][2].seed == rank_seed(3, 1) and ops[1][2].host_rng.seed == rank_seed(3, 1) + 0x5EED
    mixed = [ops[r][0](batch).mixing.sources for r in (0, 1)]
    assert not torch.equal(mixed[0], mixed[1])
    reference = make()
    assert torch.equal(mixed[0], reference[0](batch).mixing.sources)  # rank 0 draws what a one-process run draws
    plans = [PatchUp(seed=3).draw(batch), ops[0][2].draw(batch)]
    assert torch.equal(plans[0].perm, plans[1].perm) and plans[0].mask_seed == plans[1].mask_seed


def test_reseed_ops_is_explicit_and_idempotent() -> None:
    batch = Batch.from_labels(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, 2)
    op = SumMix(2, mode="permute", seed=0)
    op(batch)  # the generator has moved on
    reseed_ops([op], seed=11, rank=2)
    first = op(batch).mixing.sources
    reseed_ops([op], seed=11, rank=2)  # calling it again restarts from the same seed, it does not compound
    assert torch.equal(op(batch).mixing.sources, first)
    assert torch.equal(SumMix(2, mode="permute", seed=rank_seed(11, 2))(batch).mixing.sources, first)
    with pytest.raises(TypeError, match="object has no reseed"):
        reseed_ops([op, object()], seed=11, rank=1)
    with pytest.raises(ValueError, match="rank must be an integer >= 0, got -1"):
        reseed_ops([op], seed=11, rank=-1)


def test_two_processes_equal_one_without_batchnorm(fake_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--recipe", "baseline", "--model", "tinymodels:pooled_linear", "--data-dir", str(fake_dir), *TINY]
    sys.path.insert(0, str(TESTS))
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    run = torchrun([*args, "--out", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Same global batches, gradients averaged over the two halves = the whole batch's gradient.
    for a, b in zip(one["epochs"], two["epochs"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"])
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"])


@pytest.mark.parametrize("recipe", ["cascade", "invariance"])
def test_recipes_run_under_torchrun(recipe: str, fake_dir: Path, tmp_path: Path) -> None:
    # cascade: the validation metric is reduced over ranks, so every rank stops at the same epoch (a
    # disagreement would leave one rank waiting in a collective until the timeout).
    run = torchrun(["train", "--recipe", recipe, "--data-dir", str(fake_dir), *TINY, "--epochs", "3",
                    "--stages", "2,1", "--patience", "1", "--replicas", "2", "--out", str(tmp_path / recipe)])
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / recipe / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert not (tmp_path / recipe / "rank1").exists()


@pytest.mark.parametrize("loader", ["torch", "dali", "ffcv"])
def test_ranks_read_disjoint_shards_of_an_image_folder(loader: str, tmp_path: Path) -> None:
    """Under torchrun each rank trains on its slice of every global batch: the two ranks' samples never
    overlap and together are the epoch (40 images, batch 8: every image once per epoch)."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    if loader == "ffcv":
        pytest.importorskip("ffcv")
    from imagefolder import write_image_folder

    root = write_image_folder(tmp_path / "data", train_per_class=10, val_per_class=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "shard_probe.py"), str(tmp_path / "ids"), "train", "--data", f"imagefolder:{root}",
           "--loader", loader, "--recipe", "baseline", "--epochs", "2", "--batch-size", "8", "--image-size", "24",
           "--val-resize", "28", "--workers", "1", "--cache-dir", str(tmp_path / "cache"), "--no-progress",
           "--out", str(tmp_path / "out")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ids" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        a, b = (set(ids[epoch]) for ids in ranks)
        assert len(ranks[0][epoch]) == len(ranks[1][epoch]) == 20  # 5 steps x 4 rows per rank
        assert not a & b and a | b == set(range(40))
    assert ranks[0]["0"] != ranks[0]["1"]  # a fresh order every epoch
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [row["steps"] for row in metrics["epochs"]] == [5, 5]
