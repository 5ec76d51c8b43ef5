"""Sum Augmentation cost, measured side by side in one run.

Rows (median ms over repeats, ``ratio`` relative to the row group's baseline):
  * the mix alone: ``sum_mix`` on a float batch and on the loader's uint8 batch, against a copy
    (``clone``) of the same float batch -- the floor any mix must pay to write its output;
  * a training step of the default model with each recipe's op against the plain step on the same
    loader batch (the op's share of the step).

Usage: ``python benchmarks/bench_sum_mix.py [--device cpu|cuda] [--json FILE] [--repeats R]``
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from common import median_ms, write_json

from regpipe import Batch, GradualSumMix, SumMix
from regpipe.functional import soft_target_cross_entropy, sum_mix
from regpipe.engine.models import preact_resnet_small


def mix_rows(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for shape in [(64, 3, 32, 32), (64, 3, 224, 224)]:
        g = torch.Generator(device=device).manual_seed(0)
        x8 = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
        xf = x8.float()
        y = torch.eye(10, device=device)[torch.arange(shape[0], device=device) % 10]
        cases = {
            "copy (float clone)": lambda: xf.clone(),
            "sum_mix k=2 float": lambda: sum_mix(xf, y, [0.5, 0.5]),
            "sum_mix k=4 float": lambda: sum_mix(xf, y, [0.25] * 4),
            "sum_mix k=2 uint8->float": lambda: sum_mix(x8, y, [0.5, 0.5]),
            "sum_mix k=2 permute float": lambda: sum_mix(xf, y, [0.5, 0.5], perms=torch.randperm(
                shape[0], device=device, generator=g).unsqueeze(0)),
        }
        medians = median_ms(cases, device, repeats)
        base = medians["copy (float clone)"]
        for name, ms in medians.items():
            rows.append({"name": name, "provider": "torch", "shape": list(shape), "dtype": "float32",
                         "device": str(device), "median_ms": ms, "ratio": ms / base,
                         "baseline": "copy (float clone)"})
    return rows


def step_rows(device: torch.device, repeats: int, batch_size: int = 64) -> list[dict]:
    torch.manual_seed(0)
    model = preact_resnet_small().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    batch = Batch.from_labels(x, torch.arange(batch_size) % 10, 10)
    ops: dict[str, Callable[[Batch], Batch]] = {
        "plain step": lambda b: b,
        "sum k=4 group (model sees N/4 rows)": SumMix(groups=4),
        "sum k=4 permute": SumMix(groups=4, mode="permute"),
        "gradual k0=4 permute, t=0.5": _gradual_at_half(),
    }
    def step_with(op: Callable[[Batch], Batch]) -> Callable[[], None]:
        def step() -> None:
            b = op(batch)
            loss = soft_target_cross_entropy(model(b.inputs), b.targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    cases = {name: step_with(op) for name, op in ops.items()}
    cases.update({f"op only: {name}": (lambda op=op: op(batch)) for name, op in list(ops.items())[1:]})
    medians = median_ms(cases, device, repeats)
    base = medians["plain step"]
    rows = []
    for name, ms in medians.items():
        rows.append({"name": name, "provider": "torch", "shape": [batch_size, 3, 32, 32], "dtype": "float32",
                     "device": str(device), "median_ms": ms, "ratio": ms / base, "baseline": "plain step"})
    return rows


def _gradual_at_half() -> GradualSumMix:
    op = GradualSumMix(k0=4, gradual_steps=2, mode="permute")
    op.step()
    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = mix_rows(device, args.repeats) + step_rows(device, args.repeats)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, {time.strftime('%Y-%m-%d')}")
    print(f"{'name':42} {'shape':>18} {'median ms':>10} {'ratio':>7}  baseline")
    for r in rows:
        print(f"{r['name']:42} {'x'.join(map(str, r['shape'])):>18} {r['median_ms']:10.3f} {r['ratio']:7.3f}  {r['baseline']}")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
