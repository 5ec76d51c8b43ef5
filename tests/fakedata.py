"""Small fake datasets written in the real on-disk formats, shared by the tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX (big-endian header and payload)."""
    header = struct.pack(">BBBB", 0, 0, _CODES[array.dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fake_fmnist(directory: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: padding is detectable
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images, True)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels, True)
        out[prefix] = (images, labels)
    return out
