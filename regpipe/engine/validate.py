"""Run-level checks, made before any work starts: output paths, input files, labels.

A run that trains for an hour and then cannot write its results has lost the hour. These checks look
at the file system and the settings only (no data is read, no model built), so ``regpipe train``,
``compare`` and ``sign`` can call them first and fail in a second with one line naming the path or
setting. Files are read through :func:`read_json` / :func:`read_npz`, whose errors name the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from regpipe.core.checks import check_dense_labels
from regpipe.core.files import atomic_write

__all__ = ["NpzArrays", "check_output_path", "check_run_outputs", "infer_num_classes", "read_json", "read_npz",
           "write_json"]


def check_output_path(option: str, path: str | os.PathLike[str], kind: Literal["dir", "file"]) -> Path:
    """Check that ``path`` can be created (or overwritten) as a ``kind`` without creating anything.

    The path itself, when it exists, must be of that kind (a file can be replaced); its nearest existing
    ancestor must be a directory we may write into (a regular file on the way, e.g. ``out.txt/run``,
    or a read-only folder fail here instead of after training). Writing is tried, not inferred from the
    permission bits: ``os.access`` says yes to root everywhere, also on a read-only mount or under
    ``/proc``, so a temporary file is created (and removed) in that folder.

    Args:
        option: how the user named the path (``"--out"``), for the message.
        path: the output path.
        kind: ``"dir"`` (a folder the run writes into) or ``"file"``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: the path or the reason is named.
    """
    p = Path(path)
    if str(path) == "":
        raise ValueError(f"{option} is empty")
    if p.exists():
        if kind == "dir" and not p.is_dir():
            raise ValueError(f"{option} {p} exists and is not a directory")
        if kind == "file" and p.is_dir():
            raise ValueError(f"{option} {p} is a directory; give a file name")
        target = p if kind == "dir" else p.parent
        if not os.access(target, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {p}: no permission to write in {target}")
        failure = _try_writing(target)
        if failure is not None:
            raise ValueError(f"{option} {p}: cannot write in {target}: {failure}")
        return p
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{option} {p} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {p} cannot be created: no permission to write in {ancestor}")
    failure = _try_writing(ancestor)
    if failure is not None:
        raise ValueError(f"{option} {p} cannot be created: cannot write in {ancestor}: {failure}")
    return p


def _try_writing(folder: Path) -> str | None:
    """Create and remove an empty temporary file in ``folder``; the reason it fails, or ``None``."""
    try:
        fd, name = tempfile.mkstemp(prefix=".regpipe-write-check-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(name)
    return None


def check_run_outputs(out: str | None, checkpoint_out: str | None) -> None:
    """The output paths of one training run (``TrainConfig.out``, ``TrainConfig.checkpoint_out``).

    Raises:
        ValueError: either path cannot be written (see :func:`check_output_path`), or both name the same
            place.
    """
    if out is not None:
        check_output_path("--out", out, "dir")
    if checkpoint_out is not None:
        check_output_path("--checkpoint-out", checkpoint_out, "file")
        if out is not None and Path(checkpoint_out).resolve() == (Path(out) / "metrics.json").resolve():
            raise ValueError(f"--checkpoint-out {checkpoint_out} would overwrite the run's metrics.json")


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as JSON atomically: a temporary file in the same folder, then ``os.replace``, so a
    kill during the write never leaves a half file."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2)))


def read_json(path: str | os.PathLike[str], what: str = "JSON file") -> Any:
    """``json.loads`` of a file whose errors name the file.

    Raises:
        FileNotFoundError: no such file (named). ValueError: not valid JSON (the file, the position and
            the fix are named: a half-written file, e.g. from a killed process, is deleted or redone).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {p}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {p}: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {p} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                         "it may be a half-written file: delete it to redo what wrote it") from err


class NpzArrays(dict):
    """Every array of an ``.npz`` archive, read eagerly; a drop-in for ``np.load``'s ``NpzFile`` in a
    ``with`` block (``.files``, ``[key]``, ``in``)."""

    @property
    def files(self) -> list[str]:
        return list(self)

    def __enter__(self) -> "NpzArrays":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def read_npz(path: str | os.PathLike[str]) -> NpzArrays:
    """Read every array of an ``.npz`` file (no pickles); a missing, empty, truncated or corrupt file is
    reported with its name.

    Raises:
        FileNotFoundError: no such file. ValueError: the file is not a readable ``.npz`` archive.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"npz file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as archive:
            return NpzArrays({key: archive[key] for key in archive.files})
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as err:
        size = p.stat().st_size
        raise ValueError(f"{p} ({size} bytes) is not a readable .npz archive: "
                         f"{type(err).__name__}: {err or 'empty file'}") from err


def infer_num_classes(labels: np.ndarray | torch.Tensor, source: str | os.PathLike[str]) -> int:
    """The number of classes of a label array given without class names: ``max + 1``, provided every class
    ``0 .. max`` has a sample (labels ``{0, 5}`` would otherwise silently mean 6 classes, 4 of them empty).

    Raises:
        ValueError: negative labels or classes without samples (named, with the file).
    """
    t = torch.from_numpy(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    return check_dense_labels(f"{source}: labels", t.long() if not t.dtype.is_floating_point else t)
