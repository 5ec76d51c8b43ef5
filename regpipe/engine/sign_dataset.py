"""Offline SIGN (Asgari Taghanaki et al., Signed Input Regularization): transform a dataset with a trained model and write it out (``regpipe sign``).

Layout of ``OUT``:

* ``manifest.json``: the settings (checkpoint hash, dataset, subset, ``iters``, ``eta``, ``at``, clamp,
  feature layer, shard size, storage dtype) and the sizes. A resume with other settings is an error
  that names the differing keys.
* ``shard-00000.npz``, ...: ``shard_size`` consecutive samples each, with ``labels`` (int64),
  ``indices`` (int64, the samples' positions in the dataset split) and ``images_k50``,
  ``images_k100``, ... (one array per requested ``K``, ``(n, C, H, W)``).
* with the FFCV extra installed: ``sign_k50.beton``, ... (fields ``image`` float32 ``(C, H, W)``,
  ``label``, ``index``), written once every shard exists (float32: FFCV's ``NDArrayDecoder`` is
  compiled with numba, which has no float16).

Storage **(ours)**: SIGN iterates are floats that leave the pixel range (the paper's point is
that variables turn negative), so they are stored unclamped as float16 (``--dtype float32`` for full
precision) in the pixel scale ``x / 255`` (de-normalised: independent of the model's mean/std, and
what ``TorchLoader`` normalises like a float image). ``--clamp`` projects every iterate onto the valid
range ``[0, 1]`` instead.

Resumable: a shard is written to a temporary name and renamed with ``os.replace`` (atomic) when
complete, so a shard file that exists is finished and is skipped; a temporary left by an interrupted
run is removed. The ``.npz`` files are written byte-for-byte deterministically (fixed zip timestamps),
so an interrupted and resumed run produces the same files as an uninterrupted one.

Under ``torchrun`` every rank transforms the shards ``s`` with ``s % WORLD_SIZE == RANK`` (rank and
world size from ``torch.distributed`` when it is initialised, else the ``RANK``/``WORLD_SIZE``
variables torchrun sets); the ranks share no state beyond the output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from regpipe.core.checks import check_finite_number, check_int
from regpipe.core.files import writer_gone
from regpipe.core.optional import import_optional
from regpipe.engine.checkpoint import Checkpoint, load_checkpoint
from regpipe.engine.config import SignConfig
from regpipe.engine.distributed import resolve_device
from regpipe.engine.validate import check_output_path, read_json
from regpipe.engine.data import ImageArrays, load_dataset, stratified_indices
from regpipe.functional.sign import check_snapshots, sign
from regpipe.functional.normalize import normalize
from regpipe.hooks.features import tapped_features

__all__ = [
    "MANIFEST",
    "SignOutput",
    "generate",
    "load_sign_output",
    "pixel_bounds",
    "rank_and_world",
    "rank_device",
    "sign_training_set",
    "transform_images",
    "write_npz",
]

MANIFEST = "manifest.json"
_FORMAT = ("regpipe-sign", 1)
_DTYPES = {"float16": np.float16, "float32": np.float32}


def pixel_bounds(mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid pixel range ``[0, 1]`` in normalised units: ``((0 - mean) / std, (1 - mean) / std)``, ``(C, 1, 1)``."""
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return (0.0 - m) / s, (1.0 - m) / s


def transform_images(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     iters: Sequence[int], eta: float = 1.0, at: Literal["current", "input"] = "current",
                     clamp: bool = False, layer: str | None = None, batch_size: int = 256,
                     device: torch.device | str = "cpu",
                     on_batch: Callable[[int], None] | None = None) -> dict[int, torch.Tensor]:
    """SIGN iterates of a whole image tensor, in batches, from one pass of ``max(iters)`` iterations.

    Args:
        model: the trained model (used in the mode it is in: pass it in eval mode).
        images: ``(N, C, H, W)`` uint8 (0..255) or float in the 0..1 pixel scale.
        mean, std: the model's normalisation (0..1 scale), as in its checkpoint.
        iters: the ``K`` values to return, e.g. ``(50, 100)``.
        clamp: project every iterate onto the valid pixel range ``[0, 1]``.
        layer: the feature layer (default: the model's ``features()``; see
            :func:`regpipe.hooks.features.tapped_features`).
        on_batch: called with the number of images after each batch (a progress bar's ``update``).

    Returns:
        ``{K: (N, C, H, W) float32}`` on the CPU, in the 0..1 pixel scale (de-normalised).
    """
    steps = _steps(iters)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    m, s = mean_t.to(device).view(1, -1, 1, 1), std_t.to(device).view(1, -1, 1, 1)
    bounds = pixel_bounds(mean, std, device) if clamp else None
    out: dict[int, list[torch.Tensor]] = {k: [] for k in steps}
    with tapped_features(model, layer) as features:  # hook removed and buffers written back on exit
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(device)
            x = normalize(chunk, mean_t, std_t)
            result = sign(features, x, steps[-1], eta=eta, at=at, snapshots=steps, clamp=bounds)
            for k, xk in result.items():
                out[k].append((xk * s + m).cpu())
            if on_batch is not None:
                on_batch(chunk.shape[0])
    return {k: torch.cat(v) for k, v in out.items()}


def _steps(iters: Sequence[int]) -> list[int]:
    """The requested ``K`` values, ascending (``ValueError`` for none, or one below 1)."""
    iters = list(iters)
    if not iters:
        raise ValueError("iters must name at least one iteration count K")
    return check_snapshots(max(iters), iters)


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``: from ``torch.distributed`` when initialised, else torchrun's ``RANK``/``WORLD_SIZE``
    (``(0, 1)`` when neither is set)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid rank {rank} for world size {world}")
    return rank, world


def rank_device(name: str = "auto") -> torch.device:
    """The device a rank works on: ``"auto"`` or ``"cuda"`` under torchrun -> ``cuda:LOCAL_RANK``; else as
    :func:`regpipe.engine.distributed.resolve_device`."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write an ``.npz`` (uncompressed) atomically and byte-for-byte deterministically.

    The archive goes to ``PATH.tmp-PID`` first, is flushed to disk and then renamed to ``path``
    (``os.replace``), so ``path`` only ever names a complete file. Zip entries get a fixed timestamp
    (``np.savez`` stamps the current time), so the same arrays always give the same bytes.
    """
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
                for name, array in arrays.items():
                    info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    with archive.open(info, "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:  # interrupted (Ctrl-C included): leave no half file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.npz"


def _check_manifest(out: Path, manifest: dict[str, Any], rank: int) -> None:
    """Write the manifest, or check that the one in ``out`` has the same settings (every rank does the
    same: identical content, atomic rename, so concurrent ranks need no coordination)."""
    path = out / MANIFEST
    if path.exists():
        stored = read_json(path, "SIGN manifest")
        differ = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
        if differ:
            detail = ", ".join(f"{k}: {stored.get(k)!r} there vs {manifest.get(k)!r} now" for k in differ[:4])
            raise ValueError(f"{out} holds a SIGN run with other settings ({detail}); "
                             "use another --out or the same settings to resume")
        return
    tmp = out / f"{MANIFEST}.tmp-{rank}-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, path)


def generate(checkpoint: str | Path, out: str | Path, iters: Sequence[int] = (50, 100), *, dataset: str | None = None,
             data_dir: str | None = None, shape: Literal["cifar", "native"] | None = None,
             split: Literal["train", "test"] = "train", samples_per_class: int | None = None, seed: int = 0,
             eta: float = 1.0, at: Literal["current", "input"] = "current", clamp: bool = False,
             layer: str | None = None, model: str | None = None, shard_size: int = 1024, batch_size: int = 256,
             dtype: Literal["float16", "float32"] = "float16", device: torch.device | str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Transform a dataset split with the model of ``checkpoint`` and write shards to ``out`` (see the module doc).

    ``dataset``/``shape`` default to the checkpoint's training config. ``samples_per_class`` draws a
    stratified subset (``seed``), else the whole split is transformed. ``model``, when given, is the
    architecture the caller expects the checkpoint to hold.

    Returns:
        ``{"out", "rank", "world_size", "num_shards", "written": [...], "skipped": [...], "beton": [...]}``.

    Raises:
        ValueError: bad settings, a checkpoint that does not fit the data (channels, image size, classes),
            or an output folder holding a run with other settings.
    """
    # Every setting is checked before anything is read or written: a bad one must not leave a manifest
    # behind that refuses the corrected rerun into the same folder.
    steps = _steps(iters)
    eta = check_finite_number("eta", eta, 0.0, low_open=True)
    check_int("shard_size", shard_size, low=1)
    check_int("batch_size", batch_size, low=1)
    check_int("seed", seed, low=0)
    if samples_per_class is not None:
        check_int("samples_per_class", samples_per_class, low=0)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if at not in ("current", "input"):
        raise ValueError(f"at must be 'current' or 'input', got {at!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    check_output_path("out", out, "dir")
    # the .beton files are written last, when FFCV is installed: an FFCV that is installed but broken
    # fails here, before any work, rather than after every shard
    import_optional("ffcv", needed_by=_BETON_USER)
    rank, world = rank_and_world()
    ckpt = load_checkpoint(checkpoint, model_name=model, device=device)
    dataset = dataset or ckpt.config.get("dataset", "fashion-mnist")
    shape = shape or ckpt.config.get("shape", "cifar")
    arrays = load_dataset(dataset, split, data_dir=data_dir, shape=shape)
    _check_fits(ckpt, arrays, f"dataset {dataset!r} ({split}, shape {shape!r})")
    if samples_per_class:
        positions = stratified_indices(arrays.labels, samples_per_class, seed=seed)
    else:
        positions = torch.arange(len(arrays))
    n = int(positions.numel())
    num_shards = -(-n // shard_size)
    manifest = {
        "format": _FORMAT[0], "version": _FORMAT[1], "checkpoint_sha256": _sha256(Path(checkpoint)),
        "model": ckpt.model_name, "dataset": dataset, "split": split, "shape": shape,
        "samples_per_class": samples_per_class or None, "seed": seed if samples_per_class else None,
        "iters": steps, "eta": float(eta), "at": at, "clamp": bool(clamp), "layer": layer or "features()",
        "shard_size": shard_size, "dtype": dtype, "num_samples": n, "num_shards": num_shards,
        "image_shape": list(arrays.images.shape[1:]), "num_classes": arrays.num_classes,
        "classes": list(arrays.classes), "mean": list(ckpt.mean), "std": list(ckpt.std),
        "storage": "pixel scale x/255 (de-normalised), " + ("clamped to [0, 1]" if clamp else "unclamped"),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, manifest, rank)
    for stale in out.glob("*.beton.tmp-*"):  # an interrupted .beton write of a process that is gone
        if writer_gone(stale):
            stale.unlink(missing_ok=True)
    mine = list(range(rank, num_shards, world))
    todo = [s for s in mine if not (out / _shard_name(s)).exists()]
    for s in todo:  # leftovers of an interrupted run of this rank's shards
        for stale in out.glob(f"{_shard_name(s)}.tmp-*"):
            stale.unlink(missing_ok=True)
    sizes = {s: min(shard_size, n - s * shard_size) for s in todo}
    bar = tqdm(total=sum(sizes.values()), unit="img", disable=not progress,
               desc=f"SIGN K={','.join(map(str, steps))}" + (f" rank {rank}/{world}" if world > 1 else ""))
    try:
        for s in todo:
            pos = positions[s * shard_size:(s + 1) * shard_size]
            result = transform_images(ckpt.model, arrays.images[pos], ckpt.mean, ckpt.std, steps, eta=eta, at=at,
                                      clamp=clamp, layer=layer, batch_size=batch_size, device=device,
                                      on_batch=bar.update)
            payload = {"labels": arrays.labels[pos].numpy(), "indices": pos.numpy().astype(np.int64)}
            payload.update({f"images_k{k}": v.numpy().astype(_DTYPES[dtype]) for k, v in result.items()})
            write_npz(out / _shard_name(s), payload)
    finally:
        bar.close()
    beton = []
    if all((out / _shard_name(s)).exists() for s in range(num_shards)):
        beton = _write_beton(out)
    return {"out": str(out), "rank": rank, "world_size": world, "num_shards": num_shards,
            "written": [_shard_name(s) for s in todo], "skipped": [_shard_name(s) for s in mine if s not in todo],
            "beton": [str(p) for p in beton]}


def _check_fits(ckpt: Checkpoint, arrays: ImageArrays, what: str) -> None:
    shape = tuple(arrays.images.shape[1:])
    if shape != tuple(ckpt.image_shape):
        raise ValueError(f"{what} has images of shape {shape}, the checkpoint's model was trained on "
                         f"{tuple(ckpt.image_shape)} (pass --shape / --dataset to match)")
    if arrays.num_classes != ckpt.num_classes:
        raise ValueError(f"{what} has {arrays.num_classes} classes, the checkpoint's model {ckpt.num_classes}")


@dataclass(frozen=True)
class SignOutput:
    """An offline SIGN run read back: ``images[K]`` ``(N, C, H, W)`` float32 in the 0..1 pixel scale,
    ``labels`` and ``indices`` ``(N,)`` int64, and the manifest."""

    images: dict[int, torch.Tensor]
    labels: torch.Tensor
    indices: torch.Tensor
    manifest: dict[str, Any]


def load_sign_output(out: str | Path) -> SignOutput:
    """Concatenate every shard of the run in ``out`` in shard order.

    Raises:
        FileNotFoundError: no manifest, or shards missing (the run is unfinished: run it again to resume).
    """
    out = Path(out)
    if not (out / MANIFEST).exists():
        raise FileNotFoundError(f"{out} has no {MANIFEST}: not a regpipe sign output")
    manifest = read_json(out / MANIFEST, "SIGN manifest")
    missing = [_shard_name(s) for s in range(manifest["num_shards"]) if not (out / _shard_name(s)).exists()]
    if missing:
        raise FileNotFoundError(f"{out} is unfinished: {len(missing)} shard(s) missing, e.g. {missing[0]}; "
                                "run `regpipe sign` again with the same settings to finish it")
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(manifest["num_shards"]):
        with np.load(out / _shard_name(s), allow_pickle=False) as shard:
            for key in shard.files:
                parts.setdefault(key, []).append(shard[key])
    joined = {k: np.concatenate(v) for k, v in parts.items()}
    images = {k: torch.from_numpy(joined[f"images_k{k}"].astype(np.float32)) for k in manifest["iters"]}
    return SignOutput(images, torch.from_numpy(joined["labels"]), torch.from_numpy(joined["indices"]), manifest)


#: what the optional FFCV import is for, in its error message
_BETON_USER = "the SIGN dataset's .beton files"


def _write_beton(out: Path) -> list[Path]:
    """One FFCV ``.beton`` per ``K`` (fields ``image`` float ``(C, H, W)``, ``label``, ``index``), when FFCV is
    installed; nothing otherwise (an FFCV that is installed but fails to import is an error, not skipped).
    Written to a temporary name and renamed, like the shards."""
    if import_optional("ffcv", needed_by=_BETON_USER) is None:
        return []
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter
    data = load_sign_output(out)
    dtype = np.dtype(np.float32)  # FFCV's NDArrayDecoder runs under numba, which has no float16
    labels, indices = data.labels.numpy(), data.indices.numpy()
    written = []
    for k, images in data.images.items():
        path = out / f"sign_k{k}.beton"
        if path.exists():
            written.append(path)
            continue
        rows = _Rows(images.numpy().astype(dtype), labels, indices)
        tmp = out / f"{path.name}.tmp-{os.getpid()}"
        fields = {"image": NDArrayField(dtype=dtype, shape=tuple(images.shape[1:])), "label": IntField(),
                  "index": IntField()}
        try:
            DatasetWriter(str(tmp), fields, num_workers=1).from_indexed_dataset(rows)
            os.replace(tmp, path)
        except BaseException:  # interrupted (Ctrl-C included): leave no half file behind
            tmp.unlink(missing_ok=True)
            raise
        written.append(path)
    return written


class _Rows:
    """``(image, label, index)`` tuples for FFCV's ``DatasetWriter.from_indexed_dataset``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        return self.images[i], int(self.labels[i]), int(self.indices[i])


def sign_training_set(config: SignConfig, data: Any, teacher: Path, model_name: str, dataset_name: str,
                      device: torch.device) -> tuple[torch.utils.data.Dataset, dict[str, Any]]:
    """The ``sign`` recipe's training set, the paper's protocol: the training samples plus their SIGN
    transforms for every ``K`` in ``config.iters`` (default 50 and 100), labels kept.

    Args:
        config: the SIGN settings (iterations, step size, feature layer).
        data: the run's split arrays (``engine.train.RunData``).
        teacher: checkpoint of the trained model whose features SIGN differentiates (the engine trains
            the baseline first when the run names none).
        model_name, dataset_name: what the teacher must fit.
        device: where the transform runs.

    Returns:
        A dataset yielding ``(image float 0..1, label, index)`` (``index`` = the sample's row in
        ``data.train`` for every version) and the values ``metrics.json`` records under ``"sign"``.
    """
    import time

    info: dict[str, Any] = {"iters": list(config.iters), "eta": config.eta, "layer": config.layer or "features()"}
    in_channels = int(data.train.images.shape[1])
    ckpt = load_checkpoint(teacher, model_name=model_name, num_classes=data.train.num_classes,
                           in_channels=in_channels, device=device)
    _check_fits(ckpt, data.train, f"the training set of dataset {dataset_name!r}")
    started = time.perf_counter()
    versions = transform_images(ckpt.model, data.train.images, ckpt.mean, ckpt.std, config.iters, eta=config.eta,
                                layer=config.layer, batch_size=256, device=device)
    info["sign_seconds"] = time.perf_counter() - started
    originals = data.train.images.float().div_(255.0)
    images = torch.cat([originals, *versions.values()])
    n, copies = len(data.train), 1 + len(versions)
    info["train_rows"] = n * copies
    info["mean_abs_delta"] = {str(k): float((v - originals).abs().mean()) for k, v in versions.items()}
    dataset = torch.utils.data.TensorDataset(images, data.train.labels.repeat(copies), torch.arange(n).repeat(copies))
    return dataset, {"sign": info}
