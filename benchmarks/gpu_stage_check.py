"""GPU readiness of the device stage (run by ``gpu_check.sh``): what every loader adapter runs on the device after
the loader (``BatchBuilder.apply``: the uint8 batch normalised and mixed in one fused kernel, then the ops) must

* never synchronise with the host: it runs under ``torch.cuda.set_sync_debug_mode("error")``, where any
  synchronising call (``.item()``, ``.tolist()``, ``.cpu()``, a blocking copy, ``nonzero``) raises;
* be capturable in a CUDA graph (``torch.cuda.graph``: no host reads, no allocation a replay could not repeat),
  and a replay must give a batch of the same shape with finite values.

Cases: ``GradualSumMix`` in group mode on plain seeds, and after loader-side copies (``Batch.replicas = m``, as
DALI's ``replicate`` and FFCV's ``ReplicatedCropDecoder`` declare them), and ``SumMix`` in permutation mode.
The batch is on the device before the stage starts (the host -> device copy is the loader's).
Each prints one markdown row ``| case | check | result | detail |``; the exit status is 1 when a check fails.

Usage: ``python benchmarks/gpu_stage_check.py [--device cuda|cpu]``. Without a CUDA device it says so and exits 0
(``gpu_check.sh`` skips too); ``--device cpu`` runs each case eagerly, the graph and sync checks reported as not
run (the dry run of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from regpipe.core.batch import Batch
from regpipe.loaders.common import BatchBuilder
from regpipe.ops.sum_mix import GradualSumMix, SumMix

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Case:
    """One device stage: its op, the batch's seeds and copies per seed (``replicas``)."""

    name: str
    make_op: Callable[[], object]
    seeds: int
    replicas: int = 1


CASES = (
    Case("GradualSumMix(k0=2), group mode, 64 seeds", lambda: GradualSumMix(k0=2, gradual_steps=100), 64),
    Case("GradualSumMix(k0=2), group mode, 16 seeds x 4 loader copies",
         lambda: GradualSumMix(k0=2, gradual_steps=100), 16, 4),
    Case("SumMix(groups=2), permutation mode, 64 seeds", lambda: SumMix(groups=2, mode="permute"), 64),
)


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def stage_and_batch(case: Case, device: torch.device, side: int) -> tuple[BatchBuilder, Batch]:
    """The adapters' device stage for ``case`` (normalised channels_last float32 out) and a uint8 batch already on
    ``device`` (the transfer is the loader's, not the stage's), its copies declared."""
    g = torch.Generator().manual_seed(0)
    n = case.seeds * case.replicas
    images = torch.randint(0, 256, (case.seeds, 3, side, side), dtype=torch.uint8, generator=g)
    images = images.repeat_interleave(case.replicas, 0)  # m views of each seed (identical: the values do not matter)
    labels = torch.randint(0, 1000, (case.seeds,), generator=g).repeat_interleave(case.replicas)
    ids = torch.arange(case.seeds).repeat_interleave(case.replicas)
    builder = BatchBuilder(1000, device=device, ops=[case.make_op()], mean=MEAN, std=STD, channels_last=True)
    batch = builder.build(images, labels, ids, replicas=case.replicas, raw=True)
    assert batch.size == n and batch.inputs.dtype == torch.uint8
    return builder, batch


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def check_eager(builder: BatchBuilder, batch: Batch) -> tuple[bool, str]:
    out = builder.apply(batch)
    finite = bool(torch.isfinite(out.inputs).all())
    return finite and out.inputs.dtype == torch.float32, f"{tuple(out.inputs.shape)} {out.inputs.dtype}"


def check_no_sync(builder: BatchBuilder, batch: Batch, steps: int = 3) -> tuple[bool, str]:
    """``steps`` stage calls under the sync debug mode ``error`` (after a warm-up call that compiles the kernels)."""
    builder.apply(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            builder.apply(batch)
    except RuntimeError as err:
        return False, first_line(err)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return True, f"{steps} calls, no synchronisation"


def check_graph(builder: BatchBuilder, batch: Batch) -> tuple[bool, str]:
    """Capture one stage call in a CUDA graph (after warm-up calls on a side stream, as capture requires), replay
    it twice and check the replayed output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            builder.apply(batch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = builder.apply(batch)
        graph.replay()
        graph.replay()
        torch.cuda.synchronize()
    except RuntimeError as err:
        return False, first_line(err)
    finite = bool(torch.isfinite(out.inputs).all())
    return finite, f"captured and replayed: {tuple(out.inputs.shape)}{'' if finite else ', non-finite values'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--side", type=int, default=224, help="image side (default 224)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_stage_check: skipped: torch sees no CUDA device (use --device cpu for the eager dry run)")
        return 0
    device = torch.device(args.device)
    print(row("case", "check", "result", "detail"))
    print(row("---", "---", "---", "---"))
    failed = 0
    for case in CASES:
        checks: list[tuple[str, Callable[[BatchBuilder, Batch], tuple[bool, str]]]] = [("eager", check_eager)]
        if device.type == "cuda":
            checks += [("no host sync", check_no_sync), ("CUDA graph", check_graph)]
        for name, check in checks:
            try:
                ok, detail = check(*stage_and_batch(case, device, args.side))  # a fresh stage per check
            except Exception as err:  # an op refusing the batch: reported, the next check runs
                ok, detail = False, first_line(err)
            failed += not ok
            print(row(case.name, name, "pass" if ok else "FAIL", detail), flush=True)
        if device.type != "cuda":
            print(row(case.name, "no host sync, CUDA graph", "not run", "need a CUDA device"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
