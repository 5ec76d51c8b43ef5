"""``regpipe bench``: regpipe's ops against the eager reference and the peers, side by side in one run.

Row groups (each timed with the interleaved :func:`regpipe.engine.timing.median_ms`; ``ratio`` is the row's
median over its group's baseline, measured in the same rounds):

* ``mix-uint8``: the loader's uint8 batch -> normalised k = 2 group mix (float32 out). Baseline: a
  copy (``clone``) of the float output, the floor of any op that writes it. Rows: the eager
  composite (normalise, then :func:`~regpipe.functional.sum_mix.mix_rows`), the fused kernel
  (:class:`regpipe.kernels.FusedMix`) on every backend that runs on the device (numba with its default threads
  and with torch's; Triton on CUDA), and the fused kernel with bfloat16 / channels_last output.
* ``mix-float``: the peers' job, a k = 2 mix of a float batch that keeps ``N`` rows: timm ``Mixup``,
  torchvision ``transforms.v2.MixUp``, kornia ``RandomMixUpV2`` when installed, and regpipe's
  ``sum_mix`` (permutation mode, which keeps N rows like the peers, and group mode) and its fused kernel on a
  permutation plan. Baseline: a copy of the float batch.
* ``block-mask``: DropBlock-style block masks on a hidden map: seeds -> ``b x b`` blocks -> mask the
  map; regpipe's :func:`~regpipe.functional.block_mask` against timm ``DropBlock2d``. Baseline: a copy
  of the map.
* ``step``: a training step of ``preact_resnet_small`` with a recipe's op against the plain step
  (the op's overhead; a group-mode mix also shrinks the batch the model sees to N/k rows).

Peers that are not installed are skipped with a note (``make bench-peers`` installs them in their own
environment).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from regpipe.cli import bench_pipeline
from regpipe.core.batch import Batch
from regpipe.core.files import atomic_write
from regpipe.core.mix_plan import MixPlan
from regpipe.core.optional import require
from regpipe.functional import block_mask, gcc_coefficients, mix_sources, soft_target_cross_entropy, sum_mix
from regpipe.hooks import PatchUpHook
from regpipe.kernels import FusedMix, available_backends, default_numba_threads
from regpipe.engine.models import preact_resnet_small
from regpipe.ops.patchup import PatchUp
from regpipe.ops.sum_mix import GradualSumMix, SumMix
from regpipe.engine.timing import median_ms
from regpipe.engine.validate import check_output_path

__all__ = ["BenchConfig", "run_bench", "format_table", "write_json", "bench"]

ROW_KEYS = ("group", "name", "provider", "shape", "dtype", "device", "median_ms", "ratio", "baseline")
# ImageNet normalisation (0..1 scale).
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BenchConfig:
    """Shapes and rounds of one ``regpipe bench`` run.

    Attributes:
        device: ``cpu`` or ``cuda``.
        image_shape: ``(N, C, H, W)`` of the loader batch for the mix groups.
        map_shape: ``(N, C, H, W)`` hidden map for the block-mask group.
        step_shape: ``(N, C, H, W)`` training batch of the step group.
        block_size: DropBlock / PatchUp block side.
        repeats: interleaved rounds per group; ``warmup`` untimed calls per case first.
    """

    device: str = "cpu"
    image_shape: tuple[int, int, int, int] = (64, 3, 224, 224)
    map_shape: tuple[int, int, int, int] = (64, 16, 32, 32)
    step_shape: tuple[int, int, int, int] = (64, 3, 32, 32)
    block_size: int = 7
    repeats: int = 15
    warmup: int = 3

    @classmethod
    def quick(cls, device: str = "cpu") -> BenchConfig:
        """Small shapes and few rounds (seconds): for tests and smoke runs, not for numbers."""
        return cls(device=device, image_shape=(8, 3, 32, 32), map_shape=(8, 16, 8, 8), step_shape=(8, 3, 16, 16),
                   block_size=3, repeats=2, warmup=1)


@dataclass
class _Group:
    """One row group: cases timed together, the first is the baseline."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    cases: dict[str, tuple[str, Callable[[], object]]] = field(default_factory=dict)  # name -> (provider, fn)

    def add(self, name: str, provider: str, fn: Callable[[], object]) -> None:
        self.cases[name] = (provider, fn)


def _peer(module: str, notes: list[str], what: str) -> Any | None:
    """Import a peer library, or note why its rows are skipped (not installed, or installed but broken)."""
    try:
        return require(module, needed_by=what)
    except ImportError as err:
        notes.append(f"{what}: skipped ({str(err).splitlines()[0][:240]})")
        return None


def _mix_uint8_group(cfg: BenchConfig, device: torch.device, notes: list[str]) -> _Group:
    n, c, h, w = cfg.image_shape
    g = torch.Generator(device=device).manual_seed(0)
    x8 = torch.randint(0, 256, cfg.image_shape, dtype=torch.uint8, device=device, generator=g)
    plan = MixPlan.uniform(mix_sources(n, 2, device=device), (0.5, 0.5))
    reference = FusedMix(_MEAN, _STD, backend="torch")
    out = reference(x8, plan)
    group = _Group("mix-uint8", cfg.image_shape, "uint8->float32")
    group.add("copy of the float output (clone)", "torch", lambda: out.clone())
    group.add("eager: normalize + sum_mix k=2", "torch", lambda: reference(x8, plan))
    backends = [b for b in available_backends(device) if b != "torch"]
    for backend in backends:
        label = f"numba, default {default_numba_threads(out.numel())} thread(s)" if backend == "numba" else backend
        group.add(f"fused_mix k=2 ({label})", backend, lambda f=FusedMix(_MEAN, _STD, backend=backend): f(x8, plan))
    threads = torch.get_num_threads()
    if "numba" in backends and default_numba_threads(out.numel()) != threads:
        fused = FusedMix(_MEAN, _STD, backend="numba", num_threads=threads)
        group.add(f"fused_mix k=2 (numba, {threads} threads)", "numba", lambda: fused(x8, plan))
    if backends:
        fast = backends[0]
        to_bf16 = FusedMix(_MEAN, _STD, out_dtype=torch.bfloat16, backend=fast)
        group.add(f"fused_mix k=2 -> bfloat16 ({fast})", fast, lambda: to_bf16(x8, plan))
        x8_cl = x8.contiguous(memory_format=torch.channels_last)
        to_cl = FusedMix(_MEAN, _STD, memory_format=torch.channels_last, backend=fast)
        group.add(f"fused_mix k=2 NHWC -> channels_last ({fast})", fast, lambda: to_cl(x8_cl, plan))
        gcc = MixPlan.uniform(mix_sources(n, 4, device=device), tuple(gcc_coefficients(4, 0.5)))  # a zero column
        fused = FusedMix(_MEAN, _STD, backend=fast)
        group.add(f"fused_mix k=4 GCC t=0.5 ({fast})", fast, lambda: fused(x8, gcc))
    else:
        notes.append(f"mix-uint8: no fused backend on {device} (install numba for CPU, triton for CUDA)")
    return group


def _mix_float_group(cfg: BenchConfig, device: torch.device, notes: list[str]) -> _Group:
    n = cfg.image_shape[0]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.rand(cfg.image_shape, device=device, generator=g)
    labels = torch.arange(n, device=device) % 10
    targets = torch.nn.functional.one_hot(labels, 10).float()
    group = _Group("mix-float", cfg.image_shape, "float32")
    group.add("copy of the float batch (clone)", "torch", lambda: x.clone())
    group.add("sum_mix k=2 permute (keeps N rows)", "regpipe",
              lambda: sum_mix(x, targets, [0.5, 0.5], perms=torch.randperm(n, device=device, generator=g)[None]))
    group.add("sum_mix k=2 group (N/2 rows)", "regpipe", lambda: sum_mix(x, targets, [0.5, 0.5]))
    backends = [b for b in available_backends(device) if b != "torch"]
    if backends:
        pairs = MixPlan.uniform(torch.stack([torch.arange(n, device=device),
                                             torch.randperm(n, device=device, generator=g)], 1), (0.5, 0.5))
        identity = FusedMix((0.0,) * cfg.image_shape[1], (1.0,) * cfg.image_shape[1], backend=backends[0])
        group.add(f"fused_mix k=2 permute (keeps N rows, {backends[0]})", "regpipe", lambda: identity(x, pairs))

    timm_mixup = _peer("timm.data", notes, "timm Mixup")
    if timm_mixup is not None:
        if n % 2:
            notes.append(f"timm Mixup: skipped (needs an even batch, got {n})")
        else:
            mixup = timm_mixup.Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.0,
                                     num_classes=10)
            xt = x.clone()  # timm mixes in place
            group.add("timm Mixup (batch, in place)", "timm", lambda: mixup(xt, labels))
    tv = _peer("torchvision.transforms.v2", notes, "torchvision MixUp")
    if tv is not None:
        tv_mixup = tv.MixUp(alpha=1.0, num_classes=10)
        group.add("torchvision v2 MixUp", "torchvision", lambda: tv_mixup(x, labels))
    kaug = _peer("kornia.augmentation", notes, "kornia RandomMixUpV2")
    if kaug is not None:
        k_mixup = kaug.RandomMixUpV2(p=1.0, data_keys=["input", "class"])
        group.add("kornia RandomMixUpV2", "kornia", lambda: k_mixup(x, labels))
    return group


def _block_mask_group(cfg: BenchConfig, device: torch.device, notes: list[str]) -> _Group:
    g = torch.Generator(device=device).manual_seed(2)
    fmap = torch.randn(cfg.map_shape, device=device, generator=g)
    b, drop = cfg.block_size, 0.1
    h, w = cfg.map_shape[-2:]
    # DropBlock's seed rate for a drop fraction `drop` (timm's `gamma`).
    gamma = drop * h * w / (b * b) / ((w - b + 1) * (h - b + 1))
    group = _Group("block-mask", cfg.map_shape, "float32")
    group.add("copy of the map (clone)", "torch", lambda: fmap.clone())

    def regpipe_dropblock() -> torch.Tensor:
        seeds = torch.rand(fmap.shape, device=device, generator=g).lt_(gamma).to(fmap.dtype)
        return fmap * (1.0 - block_mask(seeds, b))

    group.add(f"seeds + block_mask b={b} + mask", "regpipe", regpipe_dropblock)
    timm_layers = _peer("timm.layers", notes, "timm DropBlock2d")
    if timm_layers is not None:
        for label, options in _timm_dropblock_variants(timm_layers):
            module = timm_layers.DropBlock2d(drop_prob=drop, block_size=b, **options).train()
            group.add(f"timm DropBlock2d b={b}{label}", "timm", lambda m=module: m(fmap))
    return group


def _timm_dropblock_variants(timm_layers: Any) -> list[tuple[str, dict[str, Any]]]:
    """timm ``DropBlock2d`` settings that draw a mask per channel, as regpipe's ``block_mask`` does: newer timm
    couples the channels by default (one mask shared by all ``C``: ``1/C`` of the work) and ignores ``fast``, so
    it is given ``couple_channels=False``; older timm (no such argument) masks per channel, fast or not."""
    accepts = set(inspect.signature(timm_layers.DropBlock2d).parameters)
    drop_block = getattr(timm_layers, "drop_block_2d", None)
    if drop_block is not None:
        accepts |= set(inspect.signature(drop_block).parameters)
    if "couple_channels" in accepts:
        return [(" (per-channel masks: couple_channels=False)", {"couple_channels": False})]
    return [(f" (fast={fast})", {"fast": fast}) for fast in (True, False)]


def _step_group(cfg: BenchConfig, device: torch.device, notes: list[str]) -> _Group:
    torch.manual_seed(0)
    model = preact_resnet_small().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = cfg.step_shape[0]
    g = torch.Generator(device=device).manual_seed(3)
    x8 = torch.randint(0, 256, cfg.step_shape, dtype=torch.uint8, device=device, generator=g)
    labels = torch.arange(n, device=device) % 10
    reference = FusedMix(_MEAN, _STD, backend="torch")
    batch = Batch.from_labels(reference(x8, MixPlan.unmixed(n, device)), labels, 10)
    hook = PatchUpHook(model, {1: "conv1", 2: "layer1"})

    def train_on(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        loss = soft_target_cross_entropy(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def with_op(op: Callable[[Batch], Batch]) -> Callable[[], None]:
        def step() -> None:
            b = op(batch)
            train_on(b.inputs, b.targets)
        return step

    def patchup_step(op: PatchUp) -> Callable[[], None]:
        def step() -> None:
            b = op(batch)
            loss = hook.loss(hook.forward(b), b)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    gradual = GradualSumMix(k0=4, gradual_steps=2, seed=0)
    gradual.step()  # t = 0.5: weights gcc_weights(4, 0.5), the last group's weight is 0
    group = _Group("step", cfg.step_shape, "float32")
    group.add("plain step", "torch", with_op(lambda b: b))
    group.add("sum k=2 group (model sees N/2 rows)", "regpipe", with_op(SumMix(groups=2, seed=0)))
    group.add("sum k=4 permute", "regpipe", with_op(SumMix(groups=4, mode="permute", seed=0)))
    group.add("gradual k0=4 group, t=0.5", "regpipe", with_op(gradual))
    group.add("patchup soft, layer in {0,1,2}", "regpipe",
              patchup_step(PatchUp(mode="soft", candidate_layers=(0, 1, 2), seed=0)))
    # From the loader's uint8 batch: normalise + mix (eager or fused), then the step; the targets are mixed
    # by torch in both (sum_mix on the (N, K) targets, passed as its `x` too).
    half, targets = [0.5, 0.5], batch.targets
    plan = MixPlan.uniform(mix_sources(n, 2, device=device), (0.5, 0.5))

    def eager_uint8_step() -> None:
        train_on(reference(x8, plan), sum_mix(targets, targets, half)[1])

    group.add("uint8 batch: eager normalize + sum k=2 + step", "torch", eager_uint8_step)
    fused = [b for b in available_backends(device) if b != "torch"]
    if fused:
        kernel = FusedMix(_MEAN, _STD, backend=fused[0])

        def fused_uint8_step() -> None:
            train_on(kernel(x8, plan), sum_mix(targets, targets, half)[1])

        group.add(f"uint8 batch: fused_mix k=2 ({fused[0]}) + step", fused[0], fused_uint8_step)
    return group


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """Time every group of ``cfg`` on its device.

    Returns:
        ``(rows, notes)``: rows with :data:`ROW_KEYS` (``shape`` a list, ``median_ms``/``ratio`` floats),
        and notes on skipped rows (peers not installed, no fused backend).

    Raises:
        ValueError: ``cfg.device`` is not ``cpu``/``cuda``, or CUDA was asked for and is not available.
    """
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    device = torch.device(cfg.device)
    notes: list[str] = []
    rows: list[dict] = []
    for build in (_mix_uint8_group, _mix_float_group, _block_mask_group, _step_group):
        group = build(cfg, device, notes)
        if progress is not None:
            progress(f"timing {group.name} ({len(group.cases)} cases x {cfg.repeats} rounds)")
        medians = median_ms({name: fn for name, (_, fn) in group.cases.items()}, device, cfg.repeats, cfg.warmup)
        baseline = next(iter(group.cases))
        for name, (provider, _) in group.cases.items():
            rows.append({"group": group.name, "name": name, "provider": provider, "shape": list(group.shape),
                         "dtype": group.dtype, "device": str(device), "median_ms": medians[name],
                         "ratio": medians[name] / medians[baseline], "baseline": baseline})
    return rows, notes


def format_table(rows: list[dict], notes: list[str]) -> str:
    """The rows as a plain-text table (one block per group), then the notes."""
    lines = [f"{'group':11} {'name':52} {'provider':11} {'shape':>14} {'median ms':>10} {'ratio':>7}"]
    previous = None
    for r in rows:
        if previous is not None and r["group"] != previous:
            lines.append("")
        previous = r["group"]
        lines.append(f"{r['group']:11} {r['name']:52} {r['provider']:11} {'x'.join(map(str, r['shape'])):>14} "
                     f"{r['median_ms']:10.3f} {r['ratio']:7.3f}")
    lines.append("ratio: median over the group's first row (its baseline), measured in the same interleaved rounds")
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "processor": platform.processor() or platform.machine(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    for name in ("numba", "triton", "timm", "torchvision", "kornia"):
        # the installed distribution's version, read without importing it (a broken peer still has one;
        # the notes say when it fails to import); None: not installed
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | Path, rows: list[dict], notes: list[str], cfg: BenchConfig) -> None:
    """Write ``{"machine": ..., "config": ..., "rows": [...], "notes": [...]}`` to ``path`` (atomically)."""
    payload = {"machine": _machine(), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in cfg.__dict__.items()},
               "rows": rows, "notes": notes}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def bench(device: str = "cpu", json_path: str | None = None, quick: bool = False, repeats: int | None = None,
          progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[str]]:
    """What ``regpipe bench`` runs: time, print the table, write the JSON (when ``json_path``).

    Args:
        device: ``cpu`` or ``cuda``.
        json_path: where to write the rows (``None``: nowhere).
        quick: small shapes and 2 rounds (seconds), for tests.
        repeats: interleaved rounds per group (default 15, quick 2).
        progress: called with a line before each group is timed.

    Returns:
        ``(rows, notes)`` as :func:`run_bench`.

    Raises:
        ValueError: ``json_path`` cannot be written (checked before timing), bad ``repeats`` or device.
    """
    if json_path:
        check_output_path("--json", json_path, "file")  # before the minutes of timing, not after
    cfg = BenchConfig.quick(device) if quick else BenchConfig(device=device)
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        cfg = BenchConfig(**{**cfg.__dict__, "repeats": repeats})
    rows, notes = run_bench(cfg, progress)
    print(f"# regpipe bench: device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    print(format_table(rows, notes))
    if json_path:
        write_json(json_path, rows, notes, cfg)
        print(f"rows written to {json_path}")
    return rows, notes


def register(sub: argparse._SubParsersAction) -> None:
    """``regpipe bench``: time regpipe's ops against the eager reference and the peers."""
    p = sub.add_parser("bench", help="time regpipe's ops against the eager reference and the peers",
                             description="Time, side by side in one run, the fused uint8 -> normalised k-group mix, "
                                         "the k=2 mix against timm/torchvision/kornia MixUp, block masks against "
                                         "timm DropBlock2d, and recipe training steps against the plain step. "
                                         "Peers that are not installed are skipped with a note "
                                         "(`make bench-peers` installs them in their own environment).")
    p.add_argument("mode", nargs="?", default="ops", choices=["ops", "pipeline"],
                   help="ops (default): the op/kernel table; pipeline: a loader's images/s alone, with regpipe's "
                        "device stage, and regpipe's replication against the loader's own (--data, --loader)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to time (default: cpu)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows (and the machine) to FILE")
    p.add_argument("--quick", action="store_true", help="small shapes and 2 rounds: a smoke run, not numbers")
    p.add_argument("--repeats", type=int, default=None,
                         help="interleaved rounds per group (default: 15, --quick: 2)")
    bench_pipeline.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "ops") == "pipeline":
        return bench_pipeline.run(args)
    bench(args.device, json_path=args.json, quick=args.quick, repeats=args.repeats,
          progress=lambda line: print(line, file=sys.stderr, flush=True))
    return 0
