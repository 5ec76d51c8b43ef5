"""Loader adapters bare and with the regpipe stage attached (issue 7): rows per second, side by side.

Each loader reads the same in-memory uint8 images (``--n`` x 3 x 32 x 32) and yields normalised
regpipe ``Batch`` es on the CPU. "bare": batches of ``--rows`` images. "+ regpipe": batches of
``rows / m`` seeds, each replicated into ``m`` augmented copies *inside the loader* (torch: the
``Replicate`` op; DALI: ``regpipe.loaders.dali.replicate``; FFCV: ``regpipe.loaders.ffcv.Replicate``,
flip + affine + brightness/contrast) and then mixed by ``GradualSumMix(k0=4)`` on the device, so a
training step sees ``rows`` rows either way (the replication recipes' setting). Cases are timed
interleaved, one epoch per timed call, median over ``--repeats`` rounds; JSON to ``--json``.

Run: ``python benchmarks/bench_loaders.py --repeats 5``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler

from regpipe.engine.data import ArrayDataset, ImageArrays
from regpipe.loaders import make_train_loader
from regpipe.ops.augment import Augment, RandomAffine, RandomBrightnessContrast, RandomFlip, Replicate
from regpipe.ops.sum_mix import GradualSumMix

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def augment() -> Augment:
    return Augment([RandomFlip(), RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                    RandomBrightnessContrast(center=128.0)], seed=0)


def sampler(n: int, size: int) -> BatchSampler:
    return BatchSampler(RandomSampler(range(n), generator=torch.Generator().manual_seed(0)), size, drop_last=True)


def build(kind: str, arrays: ImageArrays, rows: int, m: int, stage: bool, work: Path) -> Iterable:
    n = len(arrays.labels)
    mix = [GradualSumMix(k0=4, gradual_steps=10_000, seed=0)] if stage else []
    if not stage:
        return make_train_loader(kind, ArrayDataset(arrays), sampler(n, rows), 10, mean=MEAN, std=STD,
                                 work_dir=work / f"{kind}-bare")
    seeds = rows // m
    if kind == "torch":
        return make_train_loader(kind, ArrayDataset(arrays), sampler(n, seeds), 10, mean=MEAN, std=STD,
                                 ops=[Replicate(m, augment()), *mix])
    if kind == "dali":
        from nvidia.dali import fn, pipeline_def

        from regpipe.loaders.dali import ArraySource, DaliLoader, replicate

        source = ArraySource(ArrayDataset(arrays), sampler(n, seeds))

        @pipeline_def(batch_size=seeds, num_threads=torch.get_num_threads(), device_id=None, seed=0)
        def pipe():
            x, y, ids = fn.external_source(source=source, num_outputs=3, batch=True, cycle="raise",
                                           layout=["HWC", "", ""])
            rep = replicate(x, m, augment())
            return rep.images, y, ids, rep.affine, rep.photometric

        return DaliLoader(pipe(), 10, ["images", "labels", "ids", "affine", "photometric"], mean=MEAN, std=STD,
                          ops=mix)
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    from regpipe.loaders.ffcv import FfcvLoader, Replicate as FfcvReplicate, write_beton

    path = write_beton(work / "stage.beton", arrays.images, arrays.labels)
    rep = FfcvReplicate(m, augment(), seed=0)
    threads = torch.get_num_threads()
    loader = Loader(str(path), batch_size=seeds, num_workers=threads, order=OrderOption.RANDOM, seed=0,
                    pipelines={"image": [NDArrayDecoder(), rep, ToTensor()], "label": [IntDecoder(), ToTensor()],
                               "index": [IntDecoder(), ToTensor()]})
    torch.set_num_threads(threads)
    return FfcvLoader(loader, 10, replicate=rep, mean=MEAN, std=STD, ops=mix)


def epoch_rows(loader: Iterable) -> Callable[[], int]:
    def run() -> int:  # rows the step consumed: before the group mix (k0 rows make one mixed row)
        return sum(batch.size if batch.mixing is None else batch.mixing.sources.numel() for batch in loader)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="images in the dataset")
    parser.add_argument("--rows", type=int, default=256, help="rows per training step")
    parser.add_argument("--m", type=int, default=4, help="copies per seed with the regpipe stage")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loaders", default="torch,dali,ffcv")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    arrays = ImageArrays(images=torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g),
                         labels=torch.randint(0, 10, (args.n,), generator=g), num_classes=10,
                         classes=tuple(str(i) for i in range(10)))
    work = Path(tempfile.mkdtemp(prefix="bench-loaders-"))
    cases = {}
    for kind in args.loaders.split(","):
        for stage in (False, True):
            loader = build(kind, arrays, args.rows, args.m, stage, work)
            run = epoch_rows(loader)
            run()  # warm-up: compilation, first epoch
            cases[(kind, stage)] = run
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in cases}
    rows: dict[tuple[str, bool], int] = {}
    for _ in range(args.repeats):  # interleaved: every case once per round
        for key, run in cases.items():
            start = time.perf_counter()
            rows[key] = run()
            times[key].append(time.perf_counter() - start)
    results = []
    print(f"{'loader':8} {'bare rows/s':>12} {'+ regpipe rows/s':>17} {'ratio':>6}")
    for kind in args.loaders.split(","):
        bare = rows[(kind, False)] / statistics.median(times[(kind, False)])
        staged = rows[(kind, True)] / statistics.median(times[(kind, True)])
        results.append({"loader": kind, "bare_rows_per_s": bare, "regpipe_rows_per_s": staged,
                        "ratio": staged / bare, "rows_per_epoch": [rows[(kind, False)], rows[(kind, True)]]})
        print(f"{kind:8} {bare:12.0f} {staged:17.0f} {staged / bare:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
