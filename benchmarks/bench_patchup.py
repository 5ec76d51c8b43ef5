"""PatchUp cost, measured side by side in one run (issue target: step ratio <= 1.05).

Rows (median ms over repeats; ``ratio`` relative to the group's baseline):
  * training steps of ``preact_resnet_small`` at batch 64 x 3 x 32 x 32: the plain step (BCE on
    softmax, the official plain loss) against PatchUp steps (op + hook + three-term loss), with the
    layer drawn per step as in training and with the layer fixed;
  * the mask expansion + mixing alone (``plan_mask`` + ``patchup_mix``) on the largest
    feature map the candidate layers produce, and the CutMix box at layer 0, as a share of the
    PatchUp step -- this number decides whether a fused kernel is worth writing.

Usage: ``python benchmarks/bench_patchup.py [--device cpu|cuda|all] [--json FILE] [--repeats R] [--threads T]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import machine_line, median_ms, pick_devices, write_json
import torch.nn.functional as F

from regpipe.core.batch import Batch
from regpipe.functional.patchup import patchup_mix
from regpipe.hooks import PatchUpHook
from regpipe.hooks.patchup import plan_mask
from regpipe.engine.models import preact_resnet_small
from regpipe.ops.patchup import PatchUp

LAYERS = {1: "conv1", 2: "layer1", 3: "layer2"}
SHAPE = (64, 3, 32, 32)


def _median(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    return median_ms({"case": fn}, device, repeats, warmup)["case"]


def _row(name: str, shape: tuple[int, ...], device: torch.device, ms: float, base: float, baseline: str) -> dict:
    return {"name": name, "provider": "torch", "shape": list(shape), "dtype": "float32", "device": str(device),
            "median_ms": ms, "ratio": ms / base, "baseline": baseline}


def step_rows(device: torch.device, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = preact_resnet_small().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device=device).manual_seed(0)
    batch = Batch.from_labels(torch.randn(SHAPE, device=device, generator=g),
                              torch.arange(SHAPE[0], device=device) % 10, 10)
    hook = PatchUpHook(model, LAYERS)

    def plain() -> None:
        loss = F.binary_cross_entropy(torch.softmax(model(batch.inputs), 1), batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def patchup_step(op: PatchUp) -> Callable[[], None]:
        def step() -> None:
            b = op(batch)
            loss = hook.loss(hook.forward(b), b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    cases: dict[str, Callable[[], None]] = {
        "plain step": plain,
        "control: hook + op with patchup_prob=0": patchup_step(PatchUp(mode="soft", patchup_prob=0.0)),
        "patchup soft step, layer in {0,1,2}": patchup_step(PatchUp(mode="soft", candidate_layers=(0, 1, 2))),
        "patchup hard step, layer in {0,1,2}, p=0.7": patchup_step(PatchUp(mode="hard", candidate_layers=(0, 1, 2))),
        "patchup soft step, layer 0 (CutMix)": patchup_step(PatchUp(mode="soft", candidate_layers=(0,))),
        "patchup soft step, layer 1 (conv1)": patchup_step(PatchUp(mode="soft", candidate_layers=(1,))),
        "patchup soft step, layer 2 (layer1)": patchup_step(PatchUp(mode="soft", candidate_layers=(2,))),
        "patchup soft per-sample, layer in {0,1,2}": patchup_step(
            PatchUp(mode="soft", candidate_layers=(0, 1, 2), per_sample=True)),
    }
    medians = median_ms(cases, device, repeats)  # interleaved round-robin (benchmarks/timing.py)
    base = medians["plain step"]
    rows = [_row(name, SHAPE, device, ms, base, "plain step") for name, ms in medians.items()]

    # Mask expansion + mixing alone, on the largest hidden map (conv1/layer1 output: 64 x 16 x 32 x 32).
    patchup_ms = medians["patchup soft step, layer in {0,1,2}"]
    for layer, feat_shape in ((1, (64, 16, 32, 32)), (0, SHAPE)):
        for per_sample in (False, True):
            plan = PatchUp(mode="soft", candidate_layers=(layer,), per_sample=per_sample).draw(batch)
            h = torch.randn(feat_shape, device=device, generator=g, requires_grad=True)

            def mask_mix() -> None:
                holes = plan_mask(plan, h.shape, h.device, h.dtype)
                patchup_mix(h, holes, plan.perm, plan.lam, plan.mode)
            ms = _median(mask_mix, device, repeats)
            what = "CutMix box" if layer == 0 else "block mask b=7"
            name = f"mask+mix only: {what}{', per-sample' if per_sample else ''}"
            rows.append(_row(name, feat_shape, device, ms, patchup_ms, "patchup soft step"))
    # The other per-step costs of PatchUp: drawing the plan, and the three-term loss vs the plain one.
    op = PatchUp(mode="soft", candidate_layers=(0, 1, 2))
    mixed = op(batch.replace(patchup=None))
    logits = hook.forward(mixed).detach()
    extra = {"op draw only (plan, layer in {0,1,2})": lambda: op(batch),
             "patchup loss only (3-term BCE)": lambda: hook.loss(logits, mixed),
             "plain loss only (BCE)": lambda: F.binary_cross_entropy(torch.softmax(logits, 1), batch.targets)}
    for name, fn in extra.items():
        rows.append(_row(name, SHAPE, device, _median(fn, device, repeats), patchup_ms, "patchup soft step"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="all", help="cpu, cuda, or all (cpu and, if available, cuda)")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads; 1 gives stable numbers on a shared machine (with more threads than "
                             "free cores every parallel op can stall for a scheduler slice, ~16 ms)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = pick_devices(args.device)
    rows = [r for d in devices for r in step_rows(d, args.repeats)]
    print(machine_line())
    print(f"{'name':46} {'device':>6} {'shape':>14} {'median ms':>10} {'ratio':>7}  baseline")
    for r in rows:
        print(f"{r['name']:46} {r['device']:>6} {'x'.join(map(str, r['shape'])):>14} {r['median_ms']:10.3f} "
              f"{r['ratio']:7.3f}  {r['baseline']}")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
