"""The samples of an ImageNet-layout folder (``ROOT/CLASS/IMAGE``) as dataset ids: one listing for the streamed
training (``--data imagefolder:``), DALI's ``fn.readers.file`` (which does not number its samples) and the
``.beton`` writer, so all of them give a file the same id.

The listing (torchvision's ``ImageFolder`` rule): the class folders sorted by name (hidden ones skipped), a class's
label its position among them; a class's images (``CLASS/**/IMAGE``, symbolic links followed, hidden files
skipped) sorted by relative path; the classes one after the other. A sample's id is its position in that list.
The relative paths live in one numpy byte array (a few tens of bytes per image, no Python object per file, so
DataLoader workers share it without copy-on-write growth).

A DALI pipeline knows a sample only by its *source info* (the relative path, as bytes): :func:`path_hash`
(64-bit FNV-1a) turns that into a number that compiled code can look up in :attr:`FileIndex.hashes`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "FileIndex", "path_hash", "lookup_id"]

#: file name endings read as images (case-insensitive): those of DALI's ``readers.file`` default, and ``.gif``
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".pnm", ".ppm", ".pgm", ".pbm",
                    ".webp", ".jp2")

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@numba.njit(cache=True)
def _fnv1a(data: np.ndarray) -> np.uint64:
    h = _FNV_OFFSET
    for i in range(data.shape[0]):
        h = (h ^ np.uint64(data[i])) * _FNV_PRIME
    return h


@numba.njit(cache=True)
def _fnv1a_rows(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.empty(rows.shape[0], dtype=np.uint64)
    for r in range(rows.shape[0]):
        out[r] = _fnv1a(rows[r, :lengths[r]])
    return out


def path_hash(path: str | bytes) -> int:
    """64-bit FNV-1a hash of a relative path's UTF-8 bytes (``/`` separators), as a Python int.

    FNV-1a (Fowler, Noll, Vo): ``h_0 = 0xcbf29ce484222325``, ``h_{i+1} = (h_i XOR byte_i) * 0x100000001b3 mod 2**64``.
    """
    data = path.encode() if isinstance(path, str) else bytes(path)
    return int(_fnv1a(np.frombuffer(data, dtype=np.uint8)))


@numba.njit(cache=True)
def lookup_id(data: np.ndarray, hashes: np.ndarray, ids: np.ndarray) -> int:
    """The id of the sample whose relative path has the bytes ``data`` (``(L,)`` uint8), or -1 when unknown.

    ``hashes`` is sorted ``(N,)`` uint64 (:attr:`FileIndex.hashes`), ``ids`` the ``(N,)`` int64 ids in that order.
    """
    h = _fnv1a(data)
    pos = np.searchsorted(hashes, h)
    if pos < hashes.shape[0] and hashes[pos] == h:
        return ids[pos]
    return -1


class _Paths(Sequence[str]):
    """The relative paths of a :class:`FileIndex` as ``str``, decoded when read (the index keeps bytes)."""

    def __init__(self, names: np.ndarray) -> None:
        self.names = names

    def __len__(self) -> int:
        return int(self.names.shape[0])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [n.decode("utf-8") for n in self.names[i]]
        return self.names[i].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (n.decode("utf-8") for n in self.names)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"<{len(self)} paths>"


def _scan(root: Path, classes: Sequence[str] | None, extensions: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray,
                                                                                              tuple[str, ...]]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected the ImageNet layout {root}/<class>/<image>, "
                                "e.g. ROOT/train/<class>/* and ROOT/val/<class>/*)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/<image>)")
    if classes is not None and list(classes) != found:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(f"{root} has other classes than the training split: missing {missing[:5]}, "
                         f"unexpected {extra[:5]} ({len(found)} folders vs {len(classes)} classes)")
    names: list[bytes] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        folder = root / name
        files = sorted(Path(os.path.relpath(os.path.join(d, f), root)).as_posix()
                       for d, _, fs in os.walk(folder, followlinks=True) for f in fs
                       if f.lower().endswith(extensions) and not f.startswith("."))
        if not files:
            raise ValueError(f"class folder {folder} contains no images ({', '.join(extensions)})")
        names.extend(f.encode("utf-8") for f in files)
        labels.extend([label] * len(files))
    return np.array(names, dtype=np.bytes_), np.asarray(labels, dtype=np.int64), tuple(found)


class FileIndex:
    """The images under ``root`` in the ImageNet layout, with ids, labels and path hashes.

    Args:
        root: folder of class folders of images (a split: ``ROOT/train``).
        classes: the classes the folder must have (the training split's, for validation); ``None``: its
            sub-folders.
        extensions: endings read as images (case-insensitive).

    Attributes:
        root: the folder (``Path``).
        names: ``(N,)`` numpy ``S`` array of the relative paths (``CLASS/IMAGE``, UTF-8): sample ``i`` has id ``i``.
        labels: ``(N,)`` int64 class of each sample.
        classes: class folder names, sorted (label order).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class sub-folders, a class folder without images, or (``classes`` given) a folder whose
            class folders differ from them (the differences are named).
    """

    def __init__(self, root: str | Path, classes: Sequence[str] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        self.names, self.labels, self.classes = _scan(self.root, classes, tuple(e.lower() for e in extensions))
        self._hashes: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_arrays(cls, root: str | Path, names: np.ndarray, labels: np.ndarray,
                    classes: Sequence[str]) -> FileIndex:
        """An index of given relative paths (``S`` array) and labels, without reading the folder."""
        index = cls.__new__(cls)
        index.root, index.names, index.labels, index.classes = Path(root), names, labels, tuple(classes)
        index._hashes = None
        return index

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_hashes": None}  # workers rebuild the hashes if they need them

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def paths(self) -> Sequence[str]:
        """The relative paths (``CLASS/IMAGE``) as ``str``: ``paths[i]`` has id ``i`` (decoded when read)."""
        return _Paths(self.names)

    def path(self, i: int) -> str:
        """The file of sample ``i`` (``root`` joined with its relative path)."""
        return os.path.join(self.root, self.names[i].decode("utf-8"))

    def subset(self, indices: Any) -> FileIndex:
        """The samples at ``indices`` (in that order, renumbered from 0), same root and classes."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)}) for the {len(self)} images of {self.root}")
        return FileIndex.from_arrays(self.root, self.names[idx], self.labels[idx], self.classes)

    def _hash_table(self) -> tuple[np.ndarray, np.ndarray]:
        if self._hashes is None:
            rows = np.ascontiguousarray(self.names).view(np.uint8).reshape(len(self), self.names.dtype.itemsize)
            raw = _fnv1a_rows(rows, np.char.str_len(self.names).astype(np.int64))
            sort = np.argsort(raw, kind="stable")
            hashes = raw[sort]
            if hashes.size > 1 and bool((hashes[1:] == hashes[:-1]).any()):
                raise ValueError(f"two paths under {str(self.root)!r} share a 64-bit hash; rename one")
            self._hashes = hashes, sort.astype(np.int64)
        return self._hashes

    @property
    def hashes(self) -> np.ndarray:
        """``(N,)`` uint64 :func:`path_hash` of each path, sorted (for :func:`lookup_id`; computed when first read).

        Raises:
            ValueError: two paths share a hash.
        """
        return self._hash_table()[0]

    @property
    def hash_ids(self) -> np.ndarray:
        """``(N,)`` int64: the id of each entry of :attr:`hashes`."""
        return self._hash_table()[1]

    def id_of(self, path: str | bytes) -> int:
        """The id of a relative path (``CLASS/IMAGE``), as a DALI reader's source info gives it.

        Raises:
            KeyError: the path is not in the index (named).
        """
        data = path.encode() if isinstance(path, str) else bytes(path)
        found = int(lookup_id(np.frombuffer(data, dtype=np.uint8), self.hashes, self.hash_ids))
        if found < 0:
            raise KeyError(f"{data.decode(errors='replace')!r} is not an image of {str(self.root)!r}")
        return found
