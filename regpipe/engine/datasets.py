"""Datasets read from disk by reference: ImageNet-layout image folders, decoded sample by sample.

``--data imagefolder:ROOT`` reads ``ROOT/train/<class>/**/*`` and ``ROOT/val/<class>/**/*`` (class indices
from the sorted folder names, as torchvision's ``ImageFolder``). Nothing is decoded up front: a
:class:`~regpipe.loaders.file_index.FileIndex` holds the relative file names in one numpy byte array (a few
tens of bytes per image, no Python object per file, so DataLoader workers share it without copy-on-write
growth; the ids DALI's ``sample_ids`` and the ``.beton`` writer give the same files), and
:class:`ImageFolderDataset` decodes one image per ``__getitem__`` with Pillow.

The standard ImageNet recipe (Szegedy et al. 2015, "Going deeper with convolutions", section 6; the
parameters torchvision's ``RandomResizedCrop`` uses): a training crop covers a fraction ``s ~ U(0.08, 1)``
of the image area with aspect ratio ``r`` log-uniform in ``[3/4, 4/3]`` (in pixels), at a uniform position,
resized to ``size x size`` and flipped horizontally with probability 1/2; validation resizes the shorter side
to ``resize`` and takes the centred ``size x size`` crop. The crop is regpipe's one definition of it: the
chain ``Augment([RandomResizedCrop(size=(size, size)), RandomFlip()])`` read by the loaders' kernels from
counter-based uniforms of ``(seed, epoch, index)`` (:func:`regpipe.loaders._kernels.counter_uniforms`), its
window rounded to whole pixels as FFCV's :class:`~regpipe.loaders.ffcv.ReplicatedCropDecoder` rounds it, so
every worker, loader and resumed run crops a sample the same way in the same epoch, and this dataset's crop of
a file is the FFCV decoder's (``m = 1``, same seed and epoch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from regpipe.core.optional import require
from regpipe.loaders._kernels import copy_params, encode_augment
from regpipe.loaders.file_index import FileIndex
from regpipe.ops.augment import Augment, RandomFlip, RandomResizedCrop, RandomTransform

__all__ = ["ImageFolderDataset", "centre_crop_box", "training_crop", "training_chain"]

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in pixels

#: What Pillow raises on a file it cannot decode: mostly ``OSError`` (truncated data, an unknown format), but
#: some plugins raise ``SyntaxError``, ``ValueError`` or ``EOFError`` on broken headers (and a huge image
#: ``Image.DecompressionBombError``, added where Pillow is imported).
DECODE_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError, EOFError)


def training_chain(size: int, then: Sequence[RandomTransform] = ()) -> Augment:
    """The ImageNet training augmentation as a regpipe chain: a random-resized crop to ``size x size`` (area
    ``U(0.08, 1)``, pixel aspect log-uniform in ``[3/4, 4/3]``) and a horizontal flip with probability 1/2, then
    the transforms ``then`` (a replicating recipe's chain, drawn per copy by DALI and FFCV)."""
    return Augment([RandomResizedCrop(size=(size, size)), RandomFlip(horizontal=0.5), *then])


def training_crop(chain: tuple[np.ndarray, int], size: int, seed: int, epoch: int, index: int, width: int,
                  height: int) -> tuple[Box, bool]:
    """Sample ``index``'s training crop box (pixels of the ``width x height`` original) and whether it is flipped,
    in ``epoch``: the chain's crop drawn from the counter-based uniforms of ``(seed, epoch, index)`` and rounded
    to whole pixels (:func:`regpipe.loaders._kernels.copy_params`, as FFCV's decoder draws it).

    Args:
        chain: the encoded :func:`training_chain` (``encode_augment``'s table and uniform count).
    """
    spec, count = chain
    theta, _, windows = copy_params(seed, epoch, np.array([index], np.int64), np.array([height], np.int64),
                                    np.array([width], np.int64), spec, count, 1, size, size, True, False, True)
    r0, r1, c0, c1 = (float(v) for v in windows[0, 0])
    return (c0, r0, c1, r1), bool(theta[0, 0, 0, 0] < 0.0)


def centre_crop_box(width: int, height: int, size: int, resize: int) -> Box:
    """The validation crop: resize the shorter side to ``resize``, take the centred ``size x size`` square.

    In the original image's pixels the square has side ``size * min(width, height) / resize``, centred.
    """
    side = size * min(width, height) / resize
    side_w, side_h = min(side, width), min(side, height)
    left, top = (width - side_w) / 2.0, (height - side_h) / 2.0
    return left, top, left + side_w, top + side_h


class ImageFolderDataset(Dataset):
    """Map-style dataset over a :class:`~regpipe.loaders.file_index.FileIndex`: ``(image (3, size, size) uint8, label, index)``.

    Training (``train=True``): random-resized crop + horizontal flip drawn from ``(seed, epoch, index)``
    (:func:`training_crop`; call :meth:`set_epoch` before each pass, as with ``DistributedSampler``);
    evaluation: resize + centre crop. Decoding: Pillow, JPEGs through ``draft`` (DCT scaling to the
    smallest power-of-two reduction that still covers the crop at ``size`` pixels), then one resize of the
    crop box (bilinear, antialiased), so the work per image does not depend on the dataset's size.

    Args:
        index: the split's files.
        size: output side in pixels (``--image-size``).
        train: training augmentation, else the validation transform.
        resize: the validation resize of the shorter side (``--val-resize``), ``>= size``.
        seed: seed of the training draws.
    """

    def __init__(self, index: FileIndex, size: int, train: bool, resize: int | None = None, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        resize = size if resize is None else resize
        if isinstance(resize, bool) or not isinstance(resize, int) or resize < size:
            raise ValueError(f"resize must be an integer >= size={size}, got {resize!r}")
        require("PIL", needed_by="image-folder datasets (Pillow decodes them)")  # before any file is read
        self.index, self.size, self.train, self.resize, self.seed = index, size, train, resize, seed
        self.epoch = 0
        self.chain = encode_augment(training_chain(size)) if train else None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose crops the next reads draw (set before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ImageFolderDataset:
        """The same dataset over ``index.subset(indices)`` (positions renumbered from 0)."""
        out = ImageFolderDataset(self.index.subset(indices), self.size, self.train, self.resize, self.seed)
        out.epoch = self.epoch
        return out

    def window(self, i: int, width: int, height: int, epoch: int | None = None) -> tuple[Box, bool]:
        """Sample ``i``'s crop box (original pixels) and whether it is flipped, for an image of that size, in
        ``epoch`` (default: the current one)."""
        if not self.train:
            return centre_crop_box(width, height, self.size, self.resize), False
        return training_crop(self.chain, self.size, self.seed, self.epoch if epoch is None else epoch, i, width,
                             height)

    def load(self, i: int) -> np.ndarray:
        """Decode and crop sample ``i``: ``(size, size, 3)`` uint8 RGB."""
        from PIL import Image

        path = self.index.path(i)
        try:
            with Image.open(path) as img:
                width, height = img.size
                box, flip = self.window(i, width, height)
                # JPEG DCT scaling: decode at 1/2, 1/4 or 1/8 when the crop still has >= size pixels per side.
                img.draft("RGB", (max(1, int(width * self.size / (box[2] - box[0]))),
                                  max(1, int(height * self.size / (box[3] - box[1])))))
                sx, sy = img.size[0] / width, img.size[1] / height
                scaled = (box[0] * sx, box[1] * sy, min(box[2] * sx, img.size[0]), min(box[3] * sy, img.size[1]))
                rgb = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR, box=scaled)
        except (*DECODE_ERRORS, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        if flip:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} outside [0, {len(self)})")
        image = torch.from_numpy(self.load(i)).permute(2, 0, 1)
        return image, torch.tensor(int(self.index.labels[i])), torch.tensor(i)
