"""``regpipe bench pipeline``: images/s of a loader alone, with regpipe's device stage, and regpipe's replication
against the same replication written natively in that loader, side by side in one run.

Rows (``{name, loader, images_per_s, ratio}``; ``ratio`` is against the row named in ``against``):

- ``bare``: the loader's own ImageNet training pipeline (decode, random-resized crop to ``--size``, flip),
  uint8 batches of ``--batch`` images.
- ``bare+stage``: the same through regpipe's adapter and device stage (conversion, normalisation and the
  ``GradualSumMix(k0=2)`` mix fused in one pass): ratio against ``bare``.
- ``stage-alone``: the device stage's own time per batch (the adapter's ``apply``, timed around each call
  of the ``bare+stage`` run), as images/s; its ``ratio`` against ``bare`` is how many times faster than
  the loader it runs, and ``share`` (= 1 / ratio) the fraction of the bare loader's time per batch it
  adds when nothing overlaps it. End-to-end ratios on a small shared machine move with contention; this
  row does not.
- ``native-rep``: ``m`` crops per image written natively: DALI ``m`` chains of ``random_resized_crop`` +
  ``flip`` stacked; FFCV ``m`` pipelines of ``RandomResizedCropRGBImageDecoder`` on the image field (each
  decodes); torch a dataset that decodes each image ``m`` times (timm's repeated augmentation reads it
  ``m`` times).
- ``regpipe-rep``: regpipe's replication: DALI :func:`regpipe.loaders.dali.replicate` with a sized crop,
  FFCV :class:`regpipe.loaders.ffcv.ReplicatedCropDecoder`, torch decode once + the ``Replicate`` op
  (each decoded once, ``m`` crops): ratio against ``native-rep``. Throughput counts output rows
  (``batch * m`` per step) in both.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from regpipe.core.files import atomic_write
from regpipe.core.optional import require
from regpipe.engine.splits import parse_data_spec
from regpipe.engine.validate import check_output_path
from regpipe.loaders.file_index import FileIndex
from regpipe.ops.augment import Augment, RandomFlip, RandomResizedCrop, Replicate
from regpipe.ops.sum_mix import GradualSumMix

__all__ = ["add_arguments", "bench_source", "run_pipeline", "run"]

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``regpipe bench pipeline`` (on the ``bench`` parser)."""
    g = p.add_argument_group("pipeline mode (regpipe bench pipeline)")
    g.add_argument("--data", default=None, metavar="DATA",
                   help="the images to time, as `train --data` takes them: imagefolder:ROOT (its train/ split), "
                        "beton:TRAIN.beton,VAL.beton (--loader ffcv; TRAIN is timed), or a class folder "
                        "ROOT/CLASS/IMAGE (FFCV writes it to a .beton first)")
    g.add_argument("--loader", default="torch", choices=["dali", "ffcv", "torch"], help="the loader to time")
    g.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    g.add_argument("--copies", type=int, default=4, help="crops per image of the replication rows (default 4)")
    g.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    g.add_argument("--steps", type=int, default=8, help="timed steps per row after one warm-up pass (default 8)")
    g.add_argument("--threads", type=int, default=None, help="loader threads (default: torch's count)")


def _forever(make: Callable[[], Iterable]) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    while True:
        count = 0
        for batch in make():
            count += 1
            yield batch
        if not count:
            raise ValueError("the loader yields no batches: use more images than --batch")


def _time(make: Callable[[], Iterable], steps: int, rows_per_step: int) -> float:
    """Rows/s over ``steps`` batches, after ``steps`` warm-up batches (compilation, caches, prefetch)."""
    it = _forever(make)
    for _ in range(steps):
        next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * rows_per_step / (time.perf_counter() - start)


class _StageClock:
    """Times an adapter's device stage: wraps its ``apply`` (each adapter's ``__iter__`` calls it once per
    batch) and keeps each call's seconds (CPU tensors: no device synchronisation is needed)."""

    def __init__(self, adapter: Any) -> None:
        self.seconds: list[float] = []
        inner = adapter.apply

        def timed(batch: Any) -> Any:
            start = time.perf_counter()
            out = inner(batch)
            self.seconds.append(time.perf_counter() - start)
            return out

        adapter.apply = timed

    def rate(self, steps: int, images: int) -> float:
        """Images/s of the stage over the last ``steps`` calls (the timed ones, after the warm-up)."""
        return steps * images / sum(self.seconds[-steps:])


#: the library each --loader decodes with (the torch rows decode with Pillow)
_LIBRARY = {"dali": "nvidia.dali", "ffcv": "ffcv", "torch": "PIL"}


def _stage_rows(make: Callable[[], Iterable], adapter: Any, steps: int, batch: int) -> list[dict[str, Any]]:
    """The ``bare+stage`` row (``make`` yields ``adapter``'s batches) and the ``stage-alone`` row from the same run."""
    clock = _StageClock(adapter)
    return [{"name": "bare+stage", "against": "bare", "rate": _time(make, steps, batch // 2) * 2},
            {"name": "stage-alone", "against": "bare", "rate": clock.rate(steps, batch)}]


def _crop_chain(size: int) -> Augment:
    return Augment([RandomResizedCrop(size=size), RandomFlip()], seed=0)


# ------------------------------------------------------------------------------------------------ DALI

def _dali(root: Path, batch: int, m: int, size: int, threads: int, steps: int) -> list[dict[str, Any]]:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from regpipe.loaders.dali import DaliLoader, replicate, sample_ids

    index = FileIndex(root)

    def build(kind: str):
        @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
        def pipe():
            jpegs, labels = fn.readers.file(file_root=str(root), name="reader", random_shuffle=True, seed=1)
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            if kind == "native":
                copies = [fn.flip(fn.random_resized_crop(images, size=[size, size]),
                                  horizontal=fn.random.coin_flip()) for _ in range(m)]
                return fn.stack(*copies), labels
            if kind == "regpipe":
                rep = replicate(images, m, _crop_chain(size), include_original=False)
                return rep.images, labels, sample_ids(jpegs, index), rep.theta
            crop = fn.flip(fn.random_resized_crop(images, size=[size, size]), horizontal=fn.random.coin_flip())
            return crop, labels, sample_ids(jpegs, index)
        return pipe()

    def native_bare(kind: str, names: list[str]) -> Callable[[], Iterable]:
        it = DALIGenericIterator([build(kind)], names, reader_name="reader", auto_reset=True)
        return lambda: it

    def adapter(kind: str, names: list[str], ops: list) -> DaliLoader:
        norm = {"mean": MEAN, "std": STD} if ops else {}  # the replication rows stay uint8, as the native ones
        return DaliLoader(build(kind), 1000, names, reader_name="reader", ops=ops, keep_uint8=not ops, **norm)

    staged = adapter("bare", ["images", "labels", "ids"], [GradualSumMix(k0=2)])
    replicated = adapter("regpipe", ["images", "labels", "ids", "theta"], [])
    return [
        {"name": "bare", "rate": _time(native_bare("bare", ["images", "labels", "ids"]), steps, batch)},
        *_stage_rows(lambda: staged, staged, steps, batch),
        {"name": "native-rep", "rate": _time(native_bare("native", ["images", "labels"]), steps, batch * m)},
        {"name": "regpipe-rep", "against": "native-rep", "rate": _time(lambda: replicated, steps, batch * m)},
    ]


# ------------------------------------------------------------------------------------------------ FFCV

def _ffcv(root: Path, batch: int, m: int, size: int, threads: int, steps: int, work: Path) -> list[dict[str, Any]]:
    from ffcv.fields.decoders import IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from regpipe.loaders.ffcv import FfcvLoader, ReplicatedCropDecoder, WithIndices, write_image_folder

    beton = root if root.suffix == ".beton" else write_image_folder(root, work / "train.beton", max_resolution=512,
                                                                    num_workers=threads)[0]

    def loader(pipelines: dict) -> Loader:
        out = Loader(str(beton), batch_size=batch, num_workers=threads, order=OrderOption.RANDOM, seed=0,
                     drop_last=True, pipelines=pipelines)
        torch.set_num_threads(threads)
        return out

    def crop() -> list:
        return [RandomResizedCropRGBImageDecoder((size, size)), RandomHorizontalFlip(), ToTensor()]

    labels = {"label": [IntDecoder(), WithIndices(), ToTensor()]}
    bare = loader({"image": crop(), **labels})
    staged = FfcvLoader(loader({"image": crop(), **labels}), 1000, mean=MEAN, std=STD, ops=[GradualSumMix(k0=2)])
    native = loader({"image": crop(), **{f"image{j}": PipelineSpec("image", transforms=crop()) for j in range(1, m)},
                     "label": [IntDecoder(), ToTensor()]})
    decoder = ReplicatedCropDecoder(m, _crop_chain(size), seed=0)
    regpipe = FfcvLoader(loader({"image": [decoder, ToTensor()], **labels}), 1000, replicate=decoder, keep_uint8=True)
    return [
        {"name": "bare", "rate": _time(lambda: bare, steps, batch)},
        *_stage_rows(lambda: staged, staged, steps, batch),
        {"name": "native-rep", "rate": _time(lambda: native, steps, batch * m)},
        {"name": "regpipe-rep", "against": "native-rep", "rate": _time(lambda: regpipe, steps, batch * m)},
    ]


# ------------------------------------------------------------------------------------------------ torch

class _Folder(torch.utils.data.Dataset):
    """``(uint8 (C, size, size) crops, label, id)``: ``copies`` crops per image, each from its own decode
    (``native``), from one decode with regpipe's ``Replicate`` (``regpipe``), or one crop (``bare``)."""

    def __init__(self, index: FileIndex, size: int, copies: int, kind: str) -> None:
        self.index, self.size, self.copies, self.kind = index, size, copies, kind
        self.chain = _crop_chain(size)

    def __len__(self) -> int:
        return len(self.index)

    def _decode(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.index.root / self.index.paths[i]) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        from regpipe.core.batch import Batch

        label = int(self.index.labels[i])
        if self.kind == "regpipe":
            seed = Batch.from_labels(self._decode(i), torch.tensor([label]), 1000, torch.tensor([i]))
            return Replicate(self.copies, self.chain, include_original=False)(seed).inputs, label, i
        n = self.copies if self.kind == "native" else 1
        rows = [self.chain(Batch.from_labels(self._decode(i), torch.tensor([label]), 1000)).inputs for _ in range(n)]
        return torch.cat(rows), label, i


def _torch(root: Path, batch: int, m: int, size: int, threads: int, steps: int) -> list[dict[str, Any]]:
    from torch.utils.data import DataLoader

    from regpipe.loaders.torch import TorchLoader

    index = FileIndex(root)

    def dl(kind: str, copies: int) -> DataLoader:
        collate = (lambda rows: (torch.cat([r[0] for r in rows]), torch.tensor([r[1] for r in rows]),
                                 torch.tensor([r[2] for r in rows])))
        return DataLoader(_Folder(index, size, copies, kind), batch_size=batch, shuffle=True, num_workers=threads,
                          collate_fn=collate, persistent_workers=True, drop_last=True)

    bare = dl("bare", 1)
    staged = TorchLoader(dl("bare", 1), 1000, mean=MEAN, std=STD, ops=[GradualSumMix(k0=2)])
    return [
        {"name": "bare", "rate": _time(lambda: bare, steps, batch)},
        *_stage_rows(lambda: staged, staged, steps, batch),
        {"name": "native-rep", "rate": _time(lambda: dl("native", m), steps, batch * m)},
        {"name": "regpipe-rep", "against": "native-rep", "rate": _time(lambda: dl("regpipe", m), steps, batch * m)},
    ]


def bench_source(data: str | Path, loader: str) -> Path:
    """The training images ``--data`` names, in the forms ``regpipe train --data`` takes: ``imagefolder:ROOT`` (its
    ``ROOT/train`` split), ``beton:TRAIN,VAL`` (``TRAIN``, read by FFCV), or a class folder ``ROOT/CLASS/IMAGE``
    (or a ``.beton`` file, for FFCV), checked before any work.

    Raises:
        FileNotFoundError: the folder or file does not exist.
        ValueError: a ``.beton`` for a loader other than FFCV; a folder that is not ``ROOT/CLASS/IMAGE`` (no class
            folders, an empty class, images in sub-folders of a class: what DALI's file reader does not list,
            e.g. ``ROOT`` with ``train/`` and ``val/`` splits given bare); one line each, naming the fix.
    """
    text = str(data)
    spec = parse_data_spec(text)
    if spec is not None and spec.kind == "beton":
        if loader != "ffcv":
            raise ValueError(f"--data {text}: a .beton is read by FFCV: use --loader ffcv, not {loader!r}")
        if not spec.train.is_file():
            raise FileNotFoundError(f"--data {text}: {spec.train} does not exist")
        return spec.train
    root = spec.train if spec is not None else Path(text)
    if not root.exists():
        raise FileNotFoundError(f"--data {text}: {root} does not exist")
    if root.is_file():
        if root.suffix == ".beton" and loader == "ffcv":
            return root
        raise ValueError(f"--data {text}: give a class folder ROOT/CLASS/IMAGE, imagefolder:ROOT or "
                         f"beton:TRAIN,VAL{'' if root.suffix != '.beton' else ' (a .beton is read by --loader ffcv)'}")
    index = FileIndex(root)  # no class folders, or an empty class, are one line there
    nested = next((path for path in index.paths if path.count("/") > 1), None)
    if nested is not None:
        fix = f"its train/ and val/ are splits: give imagefolder:{text}" if spec is None and (root / "train").is_dir() \
            else "move them up, or give the folder of class folders"
        raise ValueError(f"--data {text}: images must sit directly in the class folders ({root}/CLASS/IMAGE, what "
                         f"DALI's file reader lists), but {nested} is deeper; {fix}")
    return root


def run_pipeline(data: str | Path, loader: str, *, batch: int = 32, copies: int = 4, size: int = 224, steps: int = 8,
                 threads: int | None = None) -> list[dict[str, Any]]:
    """Time the five rows for one loader; ``ratio`` is ``images_per_s / images_per_s[against]`` (1 for the
    references). ``bare+stage`` counts the images it reads (the mix halves the rows). ``data`` is what ``--data``
    takes (:func:`bench_source`).

    Raises:
        ValueError: a bad setting or layout (named); FileNotFoundError: ``data`` does not exist.
    """
    counts = [("batch", batch), ("copies", copies), ("size", size), ("steps", steps)]
    if threads is not None:  # None: torch's thread count
        counts.append(("threads", threads))
    for name, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if batch % 2:
        raise ValueError(f"--batch must be even (the device stage mixes pairs), got {batch}")
    if loader not in _LIBRARY:
        raise ValueError(f"--loader must be one of {sorted(_LIBRARY)}, got {loader!r}")
    root = bench_source(data, loader)
    require(_LIBRARY[loader], needed_by=f"regpipe bench pipeline --loader {loader}")  # before any work
    threads = threads or max(1, torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="regpipe-bench-") as work:
        if loader == "dali":
            rows = _dali(root, batch, copies, size, threads, steps)
        elif loader == "ffcv":
            rows = _ffcv(root, batch, copies, size, threads, steps, Path(work))
        else:
            rows = _torch(root, batch, copies, size, threads, steps)
    rates = {r["name"]: r["rate"] for r in rows}
    out = [{"name": r["name"], "loader": loader, "images_per_s": round(r["rate"], 1),
            "ratio": round(r["rate"] / rates[r["against"]], 3) if "against" in r else 1.0,
            "against": r.get("against")} for r in rows]
    for r in out:
        if r["name"] == "stage-alone":  # the stage's time per batch as a fraction of the bare loader's
            r["share"] = round(rates["bare"] / rates["stage-alone"], 4)
    return out


def run(args: argparse.Namespace) -> int:
    """``regpipe bench pipeline``: print the table, optionally write the JSON rows."""
    if args.data is None:
        raise ValueError("regpipe bench pipeline needs --data: imagefolder:ROOT, beton:TRAIN,VAL (ffcv) or a class "
                         "folder ROOT/CLASS/IMAGE")
    if args.json:
        check_output_path("--json", args.json, "file")  # before the timing, not after
    rows = run_pipeline(args.data, args.loader, batch=args.batch, copies=args.copies, size=args.size,
                        steps=args.steps, threads=args.threads)
    print(f"{'row':<13} {'loader':<7} {'images/s':>10} {'ratio':>7}  against")
    for r in rows:
        share = f"  (share of bare: {100 * r['share']:.1f} %)" if "share" in r else ""
        print(f"{r['name']:<13} {r['loader']:<7} {r['images_per_s']:>10.1f} {r['ratio']:>7.3f}  "
              f"{r['against'] or '-'}{share}")
    if args.json:
        payload = {"machine": platform.platform(), "processor": platform.processor(),
                   "threads": args.threads or torch.get_num_threads(), "rows": rows}
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return 0
