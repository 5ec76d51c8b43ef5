"""The one mixing kernel against a copy and a timm-like in-place MixUp, measured side by side in one run.

Rows (median ms over interleaved repeats; ``ratio`` is the row's median over the group's copy):

* ``float``: a k = 2 mix of a float32 batch that keeps ``N`` rows (MixUp's case): a ``clone`` of the batch
  (the floor of any op that writes a new batch), timm's in-place batch MixUp written out (``x.mul_(lam)
  .add_(x.flip(0).mul_(1 - lam))``: it pairs row ``i`` with row ``N - 1 - i`` and overwrites its input), the
  torch reference :func:`regpipe.functional.sum_mix.mix_rows` and the fused kernel
  (:class:`regpipe.kernels.FusedMix`, identity normalisation) of a permutation plan;
* ``uint8``: the loader's uint8 batch -> normalised k = 2 permutation mix: a ``clone`` of the float32 output,
  the eager reference (``normalize`` then ``mix_rows``) and the fused kernel writing float32, bfloat16 and
  channels_last float32.

Usage: ``python benchmarks/bench_mix_kernel.py [--device cpu|cuda] [--shape N C H W] [--repeats R] [--json FILE]``
"""

from __future__ import annotations

import argparse

import torch
from common import machine_line, median_ms, write_json

from regpipe.core.mix_plan import MixPlan
from regpipe.functional.sum_mix import mix_rows
from regpipe.kernels import FusedMix

_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _timm_like_mixup(x: torch.Tensor, lam: float) -> torch.Tensor:
    """timm ``Mixup`` (mode ``batch``): ``x <- lam x + (1 - lam) x.flip(0)``, in place."""
    flipped = x.flip(0).mul_(1.0 - lam)
    return x.mul_(lam).add_(flipped)


def rows(device: torch.device, shape: tuple[int, int, int, int], repeats: int) -> list[dict]:
    n, c = shape[:2]
    g = torch.Generator(device=device).manual_seed(0)
    x8 = torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=g)
    xf = x8.float().div_(255.0)
    scratch = xf.clone()
    sources = torch.stack([torch.arange(n, device=device), torch.randperm(n, device=device, generator=g)], 1)
    plan = MixPlan.uniform(sources, (0.7, 0.3))
    identity = FusedMix((0.0,) * c, (1.0,) * c)
    normalised = FusedMix(_MEAN, _STD)
    to_bf16 = FusedMix(_MEAN, _STD, out_dtype=torch.bfloat16)
    to_cl = FusedMix(_MEAN, _STD, memory_format=torch.channels_last)
    out = normalised(x8, plan)
    groups = {
        "float": {
            "copy (clone of the float batch)": lambda: xf.clone(),
            "timm-like in-place MixUp (flip, k=2)": lambda: _timm_like_mixup(scratch, 0.7),
            "regpipe mix_rows (torch reference), permutation plan k=2": lambda: mix_rows(xf, plan),
            "regpipe fused kernel, permutation plan k=2": lambda: identity(xf, plan),
        },
        "uint8": {
            "copy (clone of the float32 output)": lambda: out.clone(),
            "eager normalize + mix_rows k=2": lambda: normalised.reference(x8, plan),
            "fused kernel k=2 -> float32": lambda: normalised(x8, plan),
            "fused kernel k=2 -> bfloat16": lambda: to_bf16(x8, plan),
            "fused kernel k=2 -> channels_last float32": lambda: to_cl(x8, plan),
        },
    }
    result = []
    for group, cases in groups.items():
        medians = median_ms(cases, device, repeats)
        base_name = next(iter(cases))
        for name, ms in medians.items():
            result.append({"group": group, "name": name, "shape": list(shape), "device": str(device),
                           "backend": normalised.resolve(device), "median_ms": ms, "ratio": ms / medians[base_name],
                           "baseline": base_name})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 3, 224, 224])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    found = rows(torch.device(args.device), tuple(args.shape), args.repeats)
    print(machine_line())
    print(f"{'group':6s} {'case':58s} {'median ms':>10s} {'ratio':>6s}")
    for row in found:
        print(f"{row['group']:6s} {row['name']:58s} {row['median_ms']:10.3f} {row['ratio']:6.2f}")
    write_json(found, args.json)


if __name__ == "__main__":
    main()
