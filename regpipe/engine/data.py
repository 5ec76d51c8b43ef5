"""In-memory image datasets as uint8 tensors, and their loaders (nothing is ever downloaded).

Every loader returns an :class:`ImageArrays` with ``images`` ``(N, C, H, W)`` uint8 and
``labels`` ``(N,)`` int64. Fashion-MNIST is read from the files of Debian's
``dataset-fashion-mnist`` package or from a folder the caller names.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from regpipe.core.optional import require
from regpipe.engine.validate import infer_num_classes, read_npz

__all__ = [
    "ImageArrays", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx", "load_fashion_mnist",
    "to_cifar_shape", "load_npz", "load_image_folder", "stratified_indices", "split_train_val",
    "ArrayDataset", "load_dataset",
]

Split = Literal["train", "test"]
Shape = Literal["cifar", "native"]
Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_SIDE = 32


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_tensor(name: str, t: Any, dtype: torch.dtype, layout: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.ndim != len(layout.split(",")):
        raise TypeError(f"{name} must be an {layout} {dtype} tensor, got "
                        f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")


def _check_index_tensor(name: str, t: Any, size: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be a 1-D integer tensor, got {t!r}")
    if size is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise ValueError(f"{name} has indices out of range [0, {size}): min {int(t.min())}, max {int(t.max())}")
    return t.long()


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image dataset held in memory.

    Attributes:
        images: ``(N, C, H, W)`` ``torch.uint8`` pixels.
        labels: ``(N,)`` ``torch.int64`` class indices in ``[0, num_classes)``.
        num_classes: Number of classes (>= 1).
        classes: ``num_classes`` class names (any sequence is coerced to a tuple of str).
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        im, lb, n = self.images, self.labels, self.num_classes
        _check_tensor("images", im, torch.uint8, "(N, C, H, W)")
        _check_tensor("labels", lb, torch.int64, "(N)")
        if len(lb) != len(im):
            raise ValueError(f"{len(im)} images but {len(lb)} labels")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_classes must be a positive int, got {n!r}")
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) != n:
            raise ValueError(f"classes has {len(self.classes)} names but num_classes={n}")
        bad = lb[(lb < 0) | (lb >= n)]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is outside [0, {n})")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageArrays:
        """Return the samples at ``indices`` (``(K,)`` integer tensor in ``[0, N)``) as new ImageArrays."""
        idx = _check_index_tensor("indices", indices, len(self))
        return ImageArrays(self.images[idx], self.labels[idx], self.num_classes, self.classes)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (header ``00 00 <dtype code> <ndim>`` + big-endian uint32 dims), plain or gzip.

    Returns:
        Array of shape ``dims`` with the stored dtype (u1/i1/i2/i4/f4/f8), native byte order.

    Raises:
        FileNotFoundError: ``path`` is missing. ValueError: corrupt gzip, bad magic, wrong payload size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path} is not a valid gzip file: {exc}") from exc
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES or data[3] < 1:
        raise ValueError(f"{path} has invalid IDX magic number {data[:4].hex()!r}")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    start = 4 + 4 * ndim
    if len(data) < start:
        raise ValueError(f"{path} is truncated inside its IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:start])
    expected, got = math.prod(dims) * dtype.itemsize, len(data) - start
    if got != expected:
        raise ValueError(f"{path}: IDX payload is {got} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(data, dtype=dtype, offset=start).astype(dtype.newbyteorder("=")).reshape(dims)


def load_fashion_mnist(split: Split, data_dir: str | Path | None = None, shape: Shape = "cifar") -> ImageArrays:
    """Load a Fashion-MNIST split (60000 train / 10000 test) from local IDX files (``.gz`` or plain).

    Args:
        split: ``"train"`` or ``"test"``.
        data_dir: ``None`` -> ``$REGPIPE_DATA_DIR`` if set, else FASHION_MNIST_DIR.
        shape: ``"cifar"`` -> images ``(N, 3, 32, 32)`` uint8; ``"native"`` -> ``(N, 1, 28, 28)`` uint8.

    Raises:
        FileNotFoundError: Files missing; the message says how to install or point at them.
    """
    _check_choice("split", split, ("train", "test"))
    _check_choice("shape", shape, ("cifar", "native"))
    directory = Path(data_dir if data_dir is not None else os.environ.get("REGPIPE_DATA_DIR") or FASHION_MNIST_DIR)
    found = {s: next((directory / n for n in (s + ".gz", s) if (directory / n).is_file()), None)
             for s in _FMNIST_FILES[split]}
    missing = [s + ".gz" for s, p in found.items() if p is None]
    if missing:
        every = ", ".join(s + ".gz" for pair in _FMNIST_FILES.values() for s in pair)
        raise FileNotFoundError(
            f"Fashion-MNIST {split} file(s) {', '.join(missing)} not found in {directory}. Install them with "
            f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; puts them in {FASHION_MNIST_DIR}), "
            f"or pass --data-dir / data_dir pointing at a folder containing the four idx .gz files ({every}). "
            "Nothing is downloaded automatically.")
    images, labels = (read_idx(p) for p in found.values())
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"inconsistent Fashion-MNIST files in {directory}: images {images.dtype} {images.shape}, "
                         f"labels {labels.dtype} {labels.shape}")
    x = torch.from_numpy(images).unsqueeze(1)
    return ImageArrays(to_cifar_shape(x) if shape == "cifar" else x, torch.from_numpy(labels).long(),
                       len(FASHION_MNIST_CLASSES), FASHION_MNIST_CLASSES)


def to_cifar_shape(images: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(N, 1, H, W)`` uint8 images (H, W <= 32) to 32x32 and repeat the channel 3 times.

    Padding is symmetric; an odd margin puts the extra pixel at the bottom/right.

    Returns:
        ``(N, 3, 32, 32)`` uint8 tensor with three identical channels.
    """
    _check_tensor("images", images, torch.uint8, "(N, 1, H, W)")
    n, c, h, w = images.shape
    if c != 1:
        raise ValueError(f"to_cifar_shape expects 1 channel, got {c} (shape {tuple(images.shape)})")
    if h > _SIDE or w > _SIDE:
        raise ValueError(f"image size {h}x{w} exceeds {_SIDE}x{_SIDE}")
    top, left = (_SIDE - h) // 2, (_SIDE - w) // 2
    out = images.new_zeros((n, 3, _SIDE, _SIDE))
    out[:, :, top:top + h, left:left + w] = images
    return out


def _pick_key(archive: Any, names: tuple[str, ...], path: Path) -> np.ndarray:
    for name in names:
        if name in archive.files:
            return archive[name]
    raise KeyError(f"{path} has none of the keys {list(names)}; keys found: {sorted(archive.files)}")


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
        return images[..., :3].transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise ValueError(f"{path}: cannot interpret images of shape {images.shape}; expected (N,H,W), "
                     "(N,H,W,C) with C in {1,3,4} or (N,C,H,W) with C in {1,3}")


def load_npz(path: str | Path, shape: Shape = "native", num_classes: int | None = None) -> ImageArrays:
    """Load ``(N, C, H, W)`` uint8 images and int64 labels from a ``.npz`` archive.

    Keys: ``"images"``/``"x"``, ``"labels"``/``"y"``, optional ``"classes"`` (str array). Layout:
    ``(N, H, W)`` gets a channel axis; 4-D with last axis 1, 3 or 4 is NHWC (checked first; alpha
    dropped), else axis 1 of size 1 or 3 means NCHW. Non-uint8 images raise TypeError.

    Args:
        shape: ``"cifar"`` applies to_cifar_shape to 1-channel images <= 32 px (others kept).
        num_classes: Default ``len(classes)`` if given, else ``labels.max() + 1``.
    """
    _check_choice("shape", shape, ("cifar", "native"))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with read_npz(path) as archive:
        images, labels = _pick_key(archive, ("images", "x"), path), _pick_key(archive, ("labels", "y"), path)
        names = [str(c) for c in archive["classes"]] if "classes" in archive.files else None
    if images.dtype != np.uint8:
        raise TypeError(f"{path}: images have dtype {images.dtype}; convert to uint8 0..255")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    x = torch.from_numpy(np.ascontiguousarray(_to_nchw(images, path)))
    if shape == "cifar" and x.shape[1] == 1 and max(x.shape[-2:]) <= _SIDE:
        x = to_cifar_shape(x)
    if num_classes is None:
        num_classes = len(names) if names is not None else infer_num_classes(labels, path)
    names = names if names is not None else [str(i) for i in range(num_classes)]
    return ImageArrays(x, torch.from_numpy(labels.astype(np.int64)), num_classes, tuple(names))


def load_image_folder(root: str | Path, size: int | tuple[int, int] | None = None) -> ImageArrays:
    """Load ``root/<class>/**/*.{png,jpg,jpeg,bmp,gif,webp}`` as ``(N, 3, H, W)`` uint8 RGB (Pillow).

    Sorted sub-folder names give class indices, like torchvision's ImageFolder.

    Args:
        size: ``(H, W)`` (int -> square) bilinear resize; ``None`` requires one common size.
    """
    require("PIL", needed_by="load_image_folder")
    from PIL import Image
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{root} has no class sub-folders")
    hw = (size, size) if isinstance(size, int) else size
    if hw is not None and (len(hw) != 2 or min(hw) < 1):
        raise ValueError(f"size must be a positive int or (H, W), got {size!r}")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_EXTS)
        if not files:
            raise ValueError(f"class folder {folder} contains no images")
        for file in files:
            with Image.open(file) as img:
                rgb = img.convert("RGB")
            rgb = rgb.resize((hw[1], hw[0]), Image.Resampling.BILINEAR) if hw is not None else rgb
            arrays.append(np.asarray(rgb, dtype=np.uint8))
            labels.append(label)
            if arrays[-1].shape != arrays[0].shape:
                raise ValueError(f"{file} is {rgb.width}x{rgb.height} (WxH) but earlier images are "
                                 f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass size= to resize")
    names = tuple(p.name for p in class_dirs)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageArrays(x, torch.tensor(labels, dtype=torch.int64), len(names), names)


def _draw(labels: torch.Tensor, pool: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Draw ``per_class`` positions of ``pool`` for every class present in ``labels``."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    gen = torch.Generator().manual_seed(seed)
    chosen = [torch.empty(0, dtype=torch.int64)]
    for cls in torch.unique(labels).tolist():
        members = pool[labels[pool] == cls]
        if members.numel() < per_class:
            raise ValueError(f"class {cls} has only {members.numel()} available samples, need {per_class}")
        chosen.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.sort(torch.cat(chosen)).values


def stratified_indices(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Draw ``per_class`` indices of every class in ``labels`` (``(N,)`` int) without replacement.

    Returns:
        ``(per_class * num_classes_present,)`` int64 indices sorted ascending; drawn with
        ``torch.Generator().manual_seed(seed)``, so deterministic per seed.
    """
    labels = _check_index_tensor("labels", labels)
    return _draw(labels, torch.arange(len(labels)), per_class, seed)


def split_train_val(labels: torch.Tensor, val_per_class: int, seed: int,
                    exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Stratified validation indices (sorted int64), disjoint from ``exclude``.

    Args:
        labels: ``(N,)`` integer tensor; every class needs ``val_per_class`` samples outside ``exclude``.
        seed: Seed for ``torch.Generator().manual_seed``.
        exclude: Optional ``(K,)`` integer indices never to pick (e.g. the training subset).
    """
    labels = _check_index_tensor("labels", labels)
    keep = torch.ones(len(labels), dtype=torch.bool)
    if exclude is not None:
        keep[_check_index_tensor("exclude", exclude, len(labels))] = False
    return _draw(labels, keep.nonzero().flatten(), val_per_class, seed)


class ArrayDataset(Dataset):
    """Map-style dataset over ImageArrays yielding ``(image, label, index)``.

    ``image`` is ``(C, H, W)`` uint8; ``label`` and ``index`` are int64 scalar tensors, so a
    DataLoader with the default collate yields ``(images, labels, indices)``.
    """

    def __init__(self, arrays: ImageArrays) -> None:
        if not isinstance(arrays, ImageArrays):
            raise TypeError(f"ArrayDataset needs ImageArrays, got {type(arrays).__name__}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> Sample:
        return self.__getitems__([int(i)])[0]

    def __getitems__(self, indices: list[int]) -> list[Sample]:
        """Batched fetch used by DataLoader: one Sample per index (negative indices allowed)."""
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        idx = torch.where(idx < 0, idx + len(self), idx)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"index out of range for dataset of size {len(self)}: {list(indices)}")
        images, labels = self.arrays.images[idx], self.arrays.labels[idx]
        return list(zip(images.unbind(0), labels.unbind(0), idx.unbind(0)))


def load_dataset(spec: str, split: Split, data_dir: str | Path | None = None, shape: Shape = "cifar") -> ImageArrays:
    """Load one split of the dataset named by ``spec``.

    Specs: ``"fashion-mnist"`` (reads ``data_dir``); ``"npz:DIR"`` (``DIR/train.npz``, ``DIR/test.npz``);
    ``"npz:TRAIN.npz,TEST.npz"``; ``"npz:FILE.npz"`` (train split only); ``"folder:ROOT"``
    (``ROOT/train``, ``ROOT/test``; ``shape="cifar"`` resizes to 32x32, ``"native"`` keeps the size).

    Returns:
        ImageArrays for ``split``.
    """
    _check_choice("split", split, ("train", "test"))
    _check_choice("shape", shape, ("cifar", "native"))
    kind, _, arg = spec.partition(":")
    if spec.strip().lower() == "fashion-mnist":
        return load_fashion_mnist(split, data_dir, shape)
    parts = arg.split(",")
    if kind == "npz" and len(parts) == 2 and all(parts):
        return load_npz(parts[0] if split == "train" else parts[1], shape)
    if kind == "npz" and arg and len(parts) == 1:
        if Path(arg).is_dir():
            return load_npz(Path(arg) / f"{split}.npz", shape)
        if split == "test":
            raise ValueError(f"spec {spec!r} names one file; for the test split use 'npz:TRAIN.npz,TEST.npz' "
                             "or 'npz:DIR' with DIR/train.npz and DIR/test.npz")
        return load_npz(arg, shape)
    if kind == "folder" and arg:
        return load_image_folder(Path(arg) / split, _SIDE if shape == "cifar" else None)
    raise ValueError(f"unknown dataset spec {spec!r}; accepted: 'fashion-mnist', 'npz:DIR', "
                     "'npz:TRAIN.npz,TEST.npz', 'folder:ROOT'")
