"""GPU figures for ``benchmarks/RESULTS.md``, printed as markdown table rows (run by ``gpu_check.sh``).

Rows (median over repeats of the interleaved cases, ``regpipe.engine.timing.median_ms``: CUDA synchronised
around each call, after warm-up):
  * bandwidth: the fused uint8 -> normalised k=4 group mix (``regpipe.kernels.FusedMix``, Triton) of a
    ``(256, 3, 224, 224)`` batch against a device copy of the same bytes (``clone`` of the uint8 batch and of
    its float32 conversion); GB/s counts the bytes each call reads and writes;
  * the device stage's share of a training step: ResNet-50 (timm, else torchvision, else PreAct-ResNet-18),
    bfloat16 autocast, channels_last, batch 256 at 224 px, SGD step; the stage is what the loader adapters
    run on the device for ``gradual`` (normalise + k=4 mix of the uint8 batch, fused), share = stage /
    (stage + step).

Usage: ``python benchmarks/gpu_figures.py [--device cuda|cpu] [--quick]`` (``--quick``: small shapes and few
repeats, so the script itself can be checked on a CPU).
"""

from __future__ import annotations

import argparse
import importlib

import torch

from regpipe.engine.timing import median_ms


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _group_plan(n: int, device: torch.device) -> object:
    """The k = 4 group-mode plan of ``gradual`` at t = 0 (rows ``g * n/4 + i``, weights 1/4)."""
    from regpipe.core.mix_plan import MixPlan
    from regpipe.functional import mix_sources

    return MixPlan.uniform(mix_sources(n, 4, device=device), (0.25,) * 4)


def bandwidth_rows(device: torch.device, n: int, side: int, repeats: int) -> list[str]:
    from regpipe.kernels import FusedMix

    x = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
    xf = x.float()
    mean, std, plan = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), _group_plan(n, device)
    backend = "triton" if device.type == "cuda" else None
    to_bf16 = FusedMix(mean, std, out_dtype=torch.bfloat16, backend=backend)
    to_f32 = FusedMix(mean, std, out_dtype=torch.float32, backend=backend)
    cases = {
        "copy uint8 (clone)": (lambda: x.clone(), 2 * x.numel()),
        "copy float32 (clone)": (lambda: xf.clone(), 2 * 4 * xf.numel()),
        "fused normalise + k=4 mix -> bf16": (lambda: to_bf16(x, plan), x.numel() + 2 * x.numel() // 4),
        "fused normalise + k=4 mix -> float32": (lambda: to_f32(x, plan), x.numel() + 4 * x.numel() // 4),
    }
    times = median_ms({name: fn for name, (fn, _) in cases.items()}, device, repeats)
    return [row(name, device, f"({n}, 3, {side}, {side}) uint8", f"{times[name]:.3f}",
                f"{nbytes / times[name] / 1e6:.0f}") for name, (_, nbytes) in cases.items()]


def _resnet50(device: torch.device) -> tuple[torch.nn.Module, str]:
    for name, build in (("timm resnet50", lambda m: m.create_model("resnet50", pretrained=False, num_classes=1000)),
                        ("torchvision resnet50", lambda m: m.models.resnet50(num_classes=1000))):
        try:
            module = importlib.import_module(name.split()[0])
            return build(module).to(device), name
        except Exception:  # not installed, or built for another torch
            continue
    from regpipe.engine.models import preact_resnet18

    return preact_resnet18(num_classes=1000).to(device), "preact-resnet18 (no timm/torchvision)"


def step_share_rows(device: torch.device, n: int, side: int, repeats: int) -> list[str]:
    from regpipe.kernels import FusedMix

    model, name = _resnet50(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x8 = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
    x8 = x8.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (n,), device=device)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    dtype = torch.bfloat16

    def plain_input() -> torch.Tensor:
        m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=device).view(1, 3, 1, 1)
        return ((x8.float() / 255 - m) / s).contiguous(memory_format=torch.channels_last)

    plan = _group_plan(n, device)
    fused = FusedMix(mean, std, out_dtype=torch.float32, memory_format=torch.channels_last,
                     backend="triton" if device.type == "cuda" else None)

    def stage() -> torch.Tensor:  # what the adapters run on the device for `gradual` (k=4 group mix)
        return fused(x8, plan)

    inputs = plain_input()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(inputs), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = median_ms({"step": step, "stage": stage, "normalise": plain_input}, device, repeats)
    step_ms, stage_ms, normalise_ms = times["step"], times["stage"], times["normalise"]
    return [row(f"{name} bf16 step, batch {n}", device, f"{step_ms:.2f}", f"{n / step_ms * 1e3:.0f} img/s", "1.00"),
            row("device stage: normalise + k=4 mix (fused)", device, f"{stage_ms:.3f}", "",
                f"{stage_ms / (stage_ms + step_ms):.4f}"),
            row("plain normalise (torch, float32)", device, f"{normalise_ms:.3f}", "",
                f"{normalise_ms / (normalise_ms + step_ms):.4f}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats (a check of the script)")
    args = parser.parse_args()
    device = torch.device(args.device)
    n, side, repeats = (8, 32, 2) if args.quick else (256, 224, 20)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("\n" + row("case", "device", "shape", "median ms", "GB/s"))
    print(row("---", "---", "---", "---:", "---:"))
    print("\n".join(bandwidth_rows(device, n, side, repeats)))
    print("\n" + row("case", "device", "median ms", "throughput", "share of step"))
    print(row("---", "---", "---:", "---:", "---:"))
    print("\n".join(step_share_rows(device, n, side, max(2, repeats // 2))))


if __name__ == "__main__":
    main()
