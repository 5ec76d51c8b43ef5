"""Replication, invariance and saliency costs, measured side by side in one run (issue 3
targets: invariance step <= 1.05x the plain step, saliency step <= 3x).

Rows (median ms over interleaved repeats; ``ratio`` relative to the plain step on the same rows):
  * training steps on a replicated batch of 64 rows (16 seeds x m=4, flips + affine + colour) of
    ``preact_resnet_small`` (3 x 32 x 32) and of ``preact_resnet18``: the plain step (soft CE), the
    invariance step (the paper's objective over layer1..3), the saliency step (class + saliency
    consistency: double backward) and class + inv + sal;
  * the replication op alone (16 seeds -> 64 rows), as a share of the plain step.

Usage: ``python benchmarks/bench_consistency.py [--device cpu|cuda|all] [--json FILE] [--repeats R] [--threads T]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import machine_line, median_ms, pick_devices, write_json

from regpipe.core.batch import Batch
from regpipe.functional.losses import soft_target_cross_entropy
from regpipe.hooks import ConsistencyObjective, InvarianceLoss
from regpipe.engine.models import build_model
from regpipe.ops.augment import Replicate
from regpipe.engine.algorithms import replication_augment

SEEDS, M = 16, 4
LAYERS = ("layer1", "layer2", "layer3")


def _row(name: str, shape: tuple[int, ...], device: torch.device, ms: float, base: float, baseline: str) -> dict:
    return {"name": name, "provider": "regpipe", "shape": list(shape), "dtype": "float32", "device": str(device),
            "median_ms": ms, "ratio": ms / base, "baseline": baseline}


def step_rows(model_name: str, device: torch.device, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=3).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device=device).manual_seed(0)
    seeds = Batch.from_labels(torch.randn(SEEDS, 3, 32, 32, device=device, generator=g),
                              torch.arange(SEEDS, device=device) % 10, 10)
    replicate = Replicate(M, replication_augment(0))
    batch = replicate(seeds)
    invariance = InvarianceLoss(model, LAYERS)
    saliency = ConsistencyObjective(model, alpha=1.0, beta=0.0, gamma=1.0)
    combined = ConsistencyObjective(model, inv_layers=LAYERS, alpha=1.0, beta=1.0, gamma=1.0)

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    cases = {
        "plain step": step(lambda: soft_target_cross_entropy(model(batch.inputs), batch.targets)),
        "invariance step (layer1..3)": step(lambda: invariance(model, batch, soft_target_cross_entropy)),
        "saliency step (class + sal)": step(lambda: saliency(model, batch, soft_target_cross_entropy)),
        "class + inv + sal step": step(lambda: combined(model, batch, soft_target_cross_entropy)),
        "replicate op only (16 -> 64 rows)": lambda: replicate(seeds),
    }
    medians = median_ms(cases, device, repeats)
    base = medians["plain step"]
    shape = tuple(batch.inputs.shape)
    invariance.close()
    combined.close()
    return [_row(f"{model_name}: {name}", shape, device, ms, base, "plain step") for name, ms in medians.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu and, if available, cuda)")
    parser.add_argument("--models", default="preact-small,preact-resnet18")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = pick_devices(args.device)
    rows = [r for d in devices for m in args.models.split(",") for r in step_rows(m, d, args.repeats)]
    print(machine_line())
    print(f"{'name':52} {'device':>6} {'median ms':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['name']:52} {r['device']:>6} {r['median_ms']:10.2f} {r['ratio']:7.3f}")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
