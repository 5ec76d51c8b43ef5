"""Same seed, same machine, same thread count: the same per-epoch losses, bit for bit.

The cause found (README, "Determinism"): advanced indexing ``t[index]`` of a tensor that needs a gradient,
with repeated rows in ``index``, has a backward (``index_put_`` with ``accumulate=True``) that on CPU adds
the repeated rows with parallel atomic float adds once it has 32768 elements or more and more than one
thread runs, so the sum's order, and its last bits, change from run to run. The invariance loss (a seed's
mean, gathered once per copy) and the saliency loss (a reference row, once per copy) did this; they now
gather with ``index_select``, whose backward (``index_add_``) adds in row order. The loss tests run the
gradients many times at a size and a row pattern that reach the parallel path with two threads; the
training tests run two same-seed trainings each and compare every epoch's loss exactly, on each loader.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from imagefolder import write_image_folder
from regpipe.engine.config import GradualConfig, InvarianceConfig, TrainConfig
from regpipe.engine.train import train
from regpipe.functional import invariance_loss, saliency_consistency_loss

REPEATS = 20


@pytest.fixture
def two_threads():
    """Two intra-op threads (what a 2-core machine runs with by default): the racy path needs more than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _gradients(loss_of, x: torch.Tensor) -> list[torch.Tensor]:
    grads = []
    for _ in range(REPEATS):
        leaf = x.detach().clone().requires_grad_(True)
        loss_of(leaf).backward()
        grads.append(leaf.grad)
    return grads


def test_invariance_loss_gradient_is_repeatable(two_threads) -> None:
    # 8 rows of 8192 values, two seeds interleaved: the 65536-element gather of the seed means reaches the
    # parallel path, and each half of the rows (one thread's share) holds copies of both seeds.
    acts = torch.randn(8, 8192, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(8) % 2
    grads = _gradients(lambda a: invariance_loss(a, ids), acts)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_saliency_loss_gradient_is_repeatable(two_threads) -> None:
    # 48 maps of 32x32, three seeds interleaved: the 45 non-reference rows gather their seed's reference map
    # (46080 elements), each reference repeated in both threads' shares.
    maps = torch.rand(48, 32, 32, generator=torch.Generator().manual_seed(1))
    affine = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(48, 2, 3)
    ids = torch.arange(48) % 3
    grads = _gradients(lambda m: saliency_consistency_loss(m, affine, ids), maps)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def _epoch_losses(cfg: TrainConfig, out: Path) -> list[float]:
    return [row["train_loss"] for row in train(replace(cfg, out=str(out)))["epochs"]]


def _assert_repeats(cfg: TrainConfig, tmp_path: Path) -> None:
    first, second = _epoch_losses(cfg, tmp_path / "a"), _epoch_losses(cfg, tmp_path / "b")
    assert len(first) == cfg.epochs
    assert first == second  # exact: the same bits, not approximately


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 training / 2 validation JPEGs of 64-128 px."""
    return write_image_folder(tmp_path_factory.mktemp("images"), train_per_class=8, val_per_class=2)


def _folder_config(folder: Path, loader: str) -> TrainConfig:
    # gradual+invariance: mixing, copies per seed and the invariance loss (the gather that raced) at once;
    # layer1 at 32 px is 64x32x32 values per row, past the parallel threshold.
    return TrainConfig(recipe="gradual+invariance", dataset=f"imagefolder:{folder}", samples_per_class=None,
                       loader=loader, workers=2, epochs=2, seed=5, batch_size=8, image_size=32, val_resize=36,
                       device="cpu", progress=False, gradual=GradualConfig(k0=2),
                       invariance=InvarianceConfig(layers=("layer1",)))


def test_image_folder_torch_loader_repeats(folder: Path, tmp_path: Path) -> None:
    """DataLoader workers decoding (2), the default intra-op thread count in the training process."""
    _assert_repeats(_folder_config(folder, "torch"), tmp_path)


def test_image_folder_dali_loader_repeats(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    _assert_repeats(_folder_config(folder, "dali"), tmp_path)


def test_image_folder_ffcv_loader_repeats(folder: Path, tmp_path: Path) -> None:
    """FFCV's decoder threads crop with counter-based draws of (seed, epoch, index), not numpy's global
    generator, so the .beton path repeats too."""
    pytest.importorskip("ffcv")
    _assert_repeats(replace(_folder_config(folder, "ffcv"), cache_dir=str(tmp_path / "cache")), tmp_path)


def test_in_memory_gradual_invariance_repeats(fake_dir: Path, tmp_path: Path) -> None:
    """The default k0 = 4 mixes the 16 rows (4 seeds x 4 copies) into 4 rows, one group of 4 views, whose mean the
    invariance loss gathers 4 times: the race with the old gather, in most runs."""
    cfg = TrainConfig(recipe="gradual+invariance", epochs=2, seed=3, samples_per_class=8, val_per_class=2,
                      batch_size=16, data_dir=str(fake_dir), device="cpu", progress=False)
    _assert_repeats(cfg, tmp_path)
