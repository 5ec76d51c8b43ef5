"""Tests for regpipe.engine.data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fakedata import idx_bytes, write_fake_fmnist, write_idx
from regpipe.engine.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ArrayDataset,
    ImageArrays,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    read_idx,
    split_train_val,
    stratified_indices,
    to_cifar_shape,
)

# ---------------------------------------------------------------- read_idx
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("a.idx.gz" if compress else "a.idx"), array, compress)
    got = read_idx(path)
    assert got.dtype == array.dtype and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, array)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    data[0] = 1
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    data[0], data[2] = 0, 0x42  # unknown dtype code
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_truncated_payload(tmp_path: Path, compress: bool) -> None:
    data = idx_bytes(np.zeros((3, 4), dtype=np.uint8))[:-1]
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(ValueError, match="payload"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- fashion-mnist
def test_load_fashion_mnist_fake_cifar_and_native(tmp_path: Path) -> None:
    raw = write_fake_fmnist(tmp_path)
    for split, prefix, n in (("train", "train", 20), ("test", "t10k", 10)):
        images, labels = raw[prefix]
        cifar = load_fashion_mnist(split, tmp_path, shape="cifar")
        assert cifar.images.shape == (n, 3, 32, 32) and cifar.images.dtype == torch.uint8
        assert cifar.classes == FASHION_MNIST_CLASSES and cifar.num_classes == 10
        torch.testing.assert_close(cifar.labels, torch.from_numpy(labels).long())
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert (cifar.images[:, :, border] == 0).all()
        for c in range(3):
            np.testing.assert_array_equal(cifar.images[:, c, 2:30, 2:30].numpy(), images)
        native = load_fashion_mnist(split, tmp_path, shape="native")
        assert native.images.shape == (n, 1, 28, 28)
        np.testing.assert_array_equal(native.images[:, 0].numpy(), images)


def test_load_fashion_mnist_env_var_and_plain_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.array([3, 1], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, False)
    monkeypatch.setenv("REGPIPE_DATA_DIR", str(tmp_path))
    data = load_fashion_mnist("test", shape="native")
    assert data.labels.tolist() == [3, 1]


def test_load_fashion_mnist_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("train", missing)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(missing) in message and "train-images-idx3-ubyte" in message and "data_dir" in message


def test_load_fashion_mnist_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        load_fashion_mnist("train", tmp_path, shape="square")  # type: ignore[arg-type]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_load_fashion_mnist_real() -> None:
    train = load_fashion_mnist("train", FASHION_MNIST_DIR, shape="native")
    test = load_fashion_mnist("test", FASHION_MNIST_DIR)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert test.images.shape == (10000, 3, 32, 32)
    assert train.num_classes == 10
    assert torch.bincount(train.labels, minlength=10).tolist() == [6000] * 10


# ---------------------------------------------------------------- to_cifar_shape
def test_to_cifar_shape_odd_size_and_errors() -> None:
    x = torch.full((2, 1, 5, 31), 7, dtype=torch.uint8)
    out = to_cifar_shape(x)
    assert out.shape == (2, 3, 32, 32)
    assert int(out.sum()) == 7 * 2 * 3 * 5 * 31 and (out[:, :, 13:18, 0:31] == 7).all()
    with pytest.raises(ValueError, match="33"):
        to_cifar_shape(torch.zeros(1, 1, 33, 10, dtype=torch.uint8))
    with pytest.raises(ValueError):
        to_cifar_shape(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


# ---------------------------------------------------------------- sampling
def test_stratified_indices() -> None:
    labels = torch.arange(100) % 4
    idx = stratified_indices(labels, 5, seed=1)
    assert idx.dtype == torch.int64 and len(idx) == 20
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 20
    assert torch.bincount(labels[idx], minlength=4).tolist() == [5] * 4
    assert torch.equal(idx, stratified_indices(labels, 5, seed=1))
    assert not torch.equal(idx, stratified_indices(labels, 5, seed=2))
    with pytest.raises(ValueError, match="class 0 has only 25"):
        stratified_indices(labels, 26, seed=0)
    with pytest.raises(ValueError, match="per_class"):
        stratified_indices(labels, 0, seed=0)


def test_split_train_val_disjoint() -> None:
    labels = torch.arange(60) % 3
    train = stratified_indices(labels, 10, seed=0)
    val = split_train_val(labels, 10, seed=0, exclude=train)
    assert len(val) == 30 and not set(val.tolist()) & set(train.tolist())
    assert torch.bincount(labels[val], minlength=3).tolist() == [10] * 3
    assert torch.equal(val, val.sort().values)
    assert torch.equal(val, split_train_val(labels, 10, seed=0, exclude=train))
    with pytest.raises(ValueError, match="only 10"):
        split_train_val(labels, 11, seed=0, exclude=train)
    assert len(split_train_val(labels, 20, seed=3)) == 60


# ---------------------------------------------------------------- npz
def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 2, 1, 2])
    nhwc = rng.integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    data = load_npz(save_npz(tmp_path / "a.npz", x=nhwc, y=labels))
    assert data.images.shape == (4, 3, 8, 6) and data.num_classes == 3 and data.classes == ("0", "1", "2")
    np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), nhwc)
    assert data.labels.tolist() == labels.tolist() and data.labels.dtype == torch.int64

    nhw = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    data = load_npz(save_npz(tmp_path / "b.npz", images=nhw, labels=labels), num_classes=5)
    assert data.images.shape == (4, 1, 28, 28) and data.num_classes == 5
    cifar = load_npz(tmp_path / "b.npz", shape="cifar")
    assert cifar.images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(cifar.images[:, 1, 2:30, 2:30].numpy(), nhw)

    nchw = rng.integers(0, 256, (4, 3, 40, 40), dtype=np.uint8)
    names = np.array(["cat", "dog", "owl"])
    data = load_npz(save_npz(tmp_path / "c.npz", images=nchw, labels=labels, classes=names), shape="cifar")
    assert data.images.shape == (4, 3, 40, 40) and data.classes == ("cat", "dog", "owl")
    np.testing.assert_array_equal(data.images.numpy(), nchw)


def test_load_npz_errors(tmp_path: Path) -> None:
    labels = np.array([0, 1])
    for dtype in (np.float32, np.float64, np.int64):
        with pytest.raises(TypeError, match="convert to uint8"):
            load_npz(save_npz(tmp_path / "f.npz", images=np.zeros((2, 8, 8), dtype), labels=labels))
    with pytest.raises(KeyError, match="pixels"):
        load_npz(save_npz(tmp_path / "k.npz", pixels=np.zeros((2, 8, 8), np.uint8), labels=labels))
    with pytest.raises(KeyError, match="labels"):
        load_npz(save_npz(tmp_path / "l.npz", images=np.zeros((2, 8, 8), np.uint8), targets=labels))
    with pytest.raises(ValueError, match="shape"):
        load_npz(save_npz(tmp_path / "s.npz", images=np.zeros((2, 5, 8, 8), np.uint8), labels=labels))
    with pytest.raises(FileNotFoundError):
        load_npz(tmp_path / "absent.npz")


# ---------------------------------------------------------------- image folder
def _write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_load_image_folder(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    _write_png(tmp_path / "zebra" / "a.png", (6, 4), (255, 0, 0))
    _write_png(tmp_path / "ant" / "b.PNG", (6, 4), (0, 255, 0))
    _write_png(tmp_path / "ant" / "c.png", (6, 4), (0, 0, 255))
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    data = load_image_folder(tmp_path)
    assert data.classes == ("ant", "zebra") and data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 3, 4, 6) and data.images.dtype == torch.uint8
    assert data.images[0, :, 0, 0].tolist() == [0, 255, 0] and data.images[2, :, 0, 0].tolist() == [255, 0, 0]
    resized = load_image_folder(tmp_path, size=(8, 10))
    assert resized.images.shape == (3, 3, 8, 10)

    _write_png(tmp_path / "zebra" / "big.png", (7, 4), (1, 2, 3))
    with pytest.raises(ValueError, match="big.png"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, size=5).images.shape == (4, 3, 5, 5)


def test_load_image_folder_empty(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    with pytest.raises(ValueError, match="no class"):
        load_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class"):
        load_image_folder(tmp_path)


# ---------------------------------------------------------------- ImageArrays / ArrayDataset
def _arrays(n: int = 10) -> ImageArrays:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageArrays(images, torch.arange(n) % 3, 3, ("a", "b", "c"))


def test_image_arrays_validation() -> None:
    good = _arrays()
    with pytest.raises(ValueError, match="label 3"):
        ImageArrays(good.images, torch.tensor([0, 1, 3] + [0] * 7), 3, ("a", "b", "c"))
    with pytest.raises(TypeError, match="int32"):
        ImageArrays(good.images, good.labels.int(), 3, ("a", "b", "c"))
    with pytest.raises(TypeError, match="float32"):
        ImageArrays(good.images.float(), good.labels, 3, ("a", "b", "c"))
    with pytest.raises(ValueError, match="9 labels"):
        ImageArrays(good.images, good.labels[:9], 3, ("a", "b", "c"))
    with pytest.raises(ValueError, match="2 names"):
        ImageArrays(good.images, good.labels, 3, ("a", "b"))


def test_image_arrays_subset() -> None:
    sub = _arrays().subset(torch.tensor([7, 2]))
    assert sub.labels.tolist() == [1, 2] and sub.images[:, 0, 0, 0].tolist() == [7, 2]
    assert sub.classes == ("a", "b", "c")
    with pytest.raises(ValueError, match="out of range"):
        _arrays().subset(torch.tensor([10]))


def test_array_dataset_dataloader() -> None:
    arrays = _arrays(10)
    dataset = ArrayDataset(arrays)
    image, label, index = dataset[4]
    assert image.shape == (1, 2, 2) and int(label) == 1 and int(index) == 4 and index.dtype == torch.int64
    assert int(dataset[-1][2]) == 9
    with pytest.raises(IndexError):
        dataset[10]
    loader = DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen = []
    for images, labels, indices in loader:
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 2, 2) and labels.dtype == torch.int64
        torch.testing.assert_close(images, arrays.images[indices])
        torch.testing.assert_close(labels, arrays.labels[indices])
        seen += indices.tolist()
    assert sorted(seen) == list(range(10)) and len(loader) == 3


# ---------------------------------------------------------------- load_dataset
def test_load_dataset_specs(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path)
    assert load_dataset("fashion-mnist", "test", tmp_path).images.shape == (10, 3, 32, 32)
    images, labels = np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 1])
    save_npz(tmp_path / "train.npz", images=images, labels=labels)
    save_npz(tmp_path / "test.npz", images=images[:2], labels=labels[:2])
    assert len(load_dataset(f"npz:{tmp_path}", "test")) == 2
    pair = f"npz:{tmp_path / 'train.npz'},{tmp_path / 'test.npz'}"
    assert len(load_dataset(pair, "train", shape="native")) == 3 and len(load_dataset(pair, "test")) == 2
    assert len(load_dataset(f"npz:{tmp_path / 'train.npz'}", "train")) == 3
    with pytest.raises(ValueError, match="TRAIN.npz,TEST.npz"):
        load_dataset(f"npz:{tmp_path / 'train.npz'}", "test")
    with pytest.raises(ValueError, match="folder:ROOT"):
        load_dataset("cifar10", "train")


def test_load_dataset_folder(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    for split in ("train", "test"):
        _write_png(tmp_path / split / "x" / "1.png", (20, 10), (9, 9, 9))
        _write_png(tmp_path / split / "y" / "1.png", (20, 10), (8, 8, 8))
    assert load_dataset(f"folder:{tmp_path}", "test").images.shape == (2, 3, 32, 32)
    assert load_dataset(f"folder:{tmp_path}", "train", shape="native").images.shape == (2, 3, 10, 20)
