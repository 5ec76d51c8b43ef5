"""SIGN throughput against its bound, measured side by side in one run (issue target: >= 0.9x).

One SIGN iteration is one forward plus one input-gradient backward, so the bound is the bare cost of
exactly that on the same model and batch: ``grad(features(x).sum(), x)``. Rows (median ms over
repeats, interleaved round-robin; ``img*it/s`` = images x iterations per second; ``vs bound`` =
SIGN throughput / bound throughput):

  * the bound (``K`` bare steps per timed call, so every call is equally long), and
    ``sign(model.features, x, K)``, both per iteration (total / K), with the model's weights
    requiring grad (a model as trained) and frozen (``requires_grad=False``, as ``SignAugment``'s copy);
  * ``sign(phi, x, K)`` with ``phi`` from ``tapped_features(model, "layer3")``: the feature-tap form (the
    rest of the forward runs too; the tap is attached once per timed call, as ``SignAugment`` does per batch);
  * on CUDA, the same under ``torch.autocast(dtype=float16)``.

Usage: ``python benchmarks/bench_sign.py [--device cpu|cuda|all] [--batch 64] [--iters 10] [--repeats R]
[--threads T] [--json FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from common import machine_line, median_ms, pick_devices, write_json

from regpipe.engine.models import preact_resnet_small
from regpipe.functional import sign
from regpipe.hooks.features import tapped_features


def bound_step(features, x: torch.Tensor) -> torch.Tensor:
    """The bare cost of one SIGN iteration: a forward and an input-only backward, nothing else."""
    leaf = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(features(leaf).sum(), inputs=leaf)
    return grad


def bound_loop(features, x: torch.Tensor, iters: int) -> None:
    """``iters`` bound steps back to back: timed calls as long as the SIGN calls they are compared with, so
    that noise on a shared machine hits both alike."""
    for _ in range(iters):
        bound_step(features, x)


def tapped_sign(model: torch.nn.Module, layer: str, x: torch.Tensor, iters: int) -> torch.Tensor:
    """SIGN on the output of ``layer`` through a feature tap (attached and removed around the call)."""
    with tapped_features(model, layer) as phi:
        return sign(phi, x, iters)


def rows_for(device: torch.device, batch: int, iters: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = preact_resnet_small().to(device).eval()
    frozen = copy.deepcopy(model).requires_grad_(False)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=torch.Generator(device=device).manual_seed(0))
    variants = [("", contextlib.nullcontext)]
    if device.type == "cuda":
        variants.append((" autocast fp16", lambda: torch.autocast("cuda", dtype=torch.float16)))
    rows = []
    for suffix, ctx in variants:
        def under(fn, ctx=ctx):
            def run() -> None:
                with ctx():
                    fn()
            return run

        cases = {
            f"bound: forward + input-grad backward, x{iters}": under(lambda: bound_loop(model.features, x, iters)),
            f"sign features(), K={iters}": under(lambda: sign(model.features, x, iters)),
            f"sign tapped_features(model, 'layer3'), K={iters}": under(lambda: tapped_sign(model, "layer3", x, iters)),
            f"bound, frozen weights, x{iters}": under(lambda: bound_loop(frozen.features, x, iters)),
            f"sign features(), frozen weights, K={iters}": under(lambda: sign(frozen.features, x, iters)),
        }
        medians = median_ms(cases, device, repeats)
        bound = {"": medians[f"bound: forward + input-grad backward, x{iters}"] / iters,
                 "frozen": medians[f"bound, frozen weights, x{iters}"] / iters}
        for name, ms in medians.items():
            per_iter = ms / iters  # every case runs `iters` iterations per call
            base = bound["frozen" if "frozen" in name else ""]
            rows.append({"name": name + suffix, "provider": "torch", "device": str(device), "batch": batch,
                         "median_ms": ms, "ms_per_iteration": per_iter,
                         "images_x_iters_per_s": batch / (per_iter / 1e3), "vs_bound": base / per_iter})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu and, if available, cuda)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10, help="SIGN iterations per timed call")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is stable on a shared machine)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = pick_devices(args.device)
    rows = [r for d in devices for r in rows_for(d, args.batch, args.iters, args.repeats)]
    print(machine_line() + f"; preact-small, batch {args.batch} x 3 x 32 x 32")
    print(f"{'case':52} {'device':>6} {'ms/iteration':>12} {'img*it/s':>10} {'vs bound':>8}")
    for r in rows:
        print(f"{r['name']:52} {r['device']:>6} {r['ms_per_iteration']:12.3f} {r['images_x_iters_per_s']:10.0f} "
              f"{r['vs_bound']:8.3f}")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
