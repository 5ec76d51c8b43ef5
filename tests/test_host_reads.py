"""Zero host reads per batch: every mixing op, plain and replicated, and the loaders' device stage.

On a GPU each host read of a device tensor (``item``, ``tolist``, ``bool``, ``unique``, ``nonzero``...) waits
for the device: one synchronisation per read, per batch. These CPU tests count the reads (``hostreads.HostReads``:
a dispatch mode for the reading ops, patched ``Tensor`` methods for the Python-side ones, and
``regpipe.core.checks.is_host`` answering "device" so host-only value checks skip as they do on a GPU) around
a warmed-up op, and require none. Counted with this harness on main before issue 21 (plain / after
``Replicate(m=4)``): ``SumMix(groups=2)`` 2 / 5, ``GradualSumMix(k0=4)`` 4 / 7, MixUp 3 / 6, CutMix 5 / 7, CutOut
2 / 2, ``Replicate`` itself 31 (its draw tables read back as lists), ``BatchBuilder.apply`` 13 to 38.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hostreads import HostReads, count_reads
from regpipe import Batch, GradualSumMix, SumMix
from regpipe.kernels import row_mix
from regpipe.loaders.common import BatchBuilder
from regpipe.ops.augment import Augment, RandomAffine, RandomBrightnessContrast, RandomFlip, Replicate
from regpipe.ops.cutmix import CutMix, CutOut, MixUp
from regpipe.ops.tta import TestTimeSumAugmentation

S, M = 8, 4


def _seeds(n: int = 2 * S, dtype: torch.dtype = torch.float32) -> Batch:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 12, 10), dtype=torch.uint8, generator=g)
    return Batch.from_labels(x if dtype == torch.uint8 else x.to(dtype) / 255, torch.arange(n) % 5, num_classes=5,
                             source_ids=torch.arange(100, 100 + n))


def _replicate() -> Replicate:
    return Replicate(M, Augment([RandomFlip(), RandomAffine(degrees=10), RandomBrightnessContrast()], seed=1))


def _replicated(dtype: torch.dtype = torch.float32) -> Batch:
    return _replicate()(_seeds(S, dtype))


OPS: dict[str, Callable[[bool], object]] = {
    "sum-group": lambda keep: SumMix(2, keep_groups=keep),
    "sum-permute": lambda keep: SumMix(4, mode="permute", keep_groups=keep),
    "gradual-group": lambda keep: GradualSumMix(k0=4, gradual_steps=10, keep_groups=keep),
    "gradual-permute": lambda keep: GradualSumMix(k0=4, gradual_steps=10, mode="permute", keep_groups=keep),
    "mixup": lambda keep: MixUp(keep_groups=keep, keep_parent=True),
    "cutmix": lambda keep: CutMix(keep_groups=keep),
    "cutmix-per-row": lambda keep: CutMix(per_row=True, keep_groups=keep),
}


def _reads(op: Callable[[Batch], Batch], batch: Batch) -> dict[str, int]:
    return dict(count_reads(op, batch, warmup=2))


@pytest.mark.parametrize("keep", [False, True], ids=["own-partners", "keep-groups"])
@pytest.mark.parametrize("name", list(OPS))
def test_mixing_ops_read_nothing_on_the_host(name: str, keep: bool) -> None:
    for batch in (_seeds(), _replicated()):
        op = OPS[name](keep)
        assert _reads(op, batch) == {}, (name, batch.replicas)


def test_gradual_mix_reads_nothing_at_any_point_of_its_schedule() -> None:
    op, batch = GradualSumMix(k0=4, gradual_steps=6, mode="permute"), _replicated()
    for _ in range(7):  # zero columns appear one by one, then the identity plan of the fine-tune
        assert _reads(op, batch) == {}
        op.step()
        op.step()


def test_tta_replicate_and_cutout_read_nothing_on_the_host() -> None:
    tta = TestTimeSumAugmentation(k=3, draws=2, seed=0)
    for batch in (_seeds(), _replicated()):
        assert _reads(lambda b: tta.apply(b, tta.draw(b)), batch) == {}
        assert _reads(CutOut(length=4), batch) == {}
    assert _reads(_replicate(), _seeds(S)) == {}
    assert _reads(_replicate(), _seeds(S, torch.uint8)) == {}


def test_the_harness_counts_what_it_should() -> None:
    # the reads the ops used to make: each is counted once
    x = torch.arange(6)
    with HostReads() as reads:
        x.tolist()
        torch.unique(x)
        bool(x.sum() > 0)
        int(x[0])
        x[x > 2]
        x.cpu()
        x[x > 4] = 0
        x.nonzero()
    assert reads.counts == {"tolist": 1, "_unique2": 1, "__bool__": 1, "__int__": 1, "index(bool mask)": 1, "cpu": 1,
                            "index_put_(bool mask)": 1, "nonzero": 1}
    with HostReads() as reads:  # and a host-only value check skips, as on a device
        Batch(torch.zeros(2, 1, 2, 2), torch.tensor([[0.5, 0.6], [1.0, 0.0]]), torch.arange(2))
    assert reads.total == 0


PIPELINES: dict[str, Callable[[], list]] = {
    "sum": lambda: [SumMix(2)],
    "gradual": lambda: [GradualSumMix(k0=4, gradual_steps=10)],
    "mixup": lambda: [MixUp()],
    "cutmix": lambda: [CutMix()],
    "replicate+gradual": lambda: [_replicate(), GradualSumMix(k0=4, gradual_steps=10, keep_groups=True)],
    "replicate+mixup-parent": lambda: [_replicate(), MixUp(keep_parent=True)],
}


def _stage(executor: str, pipeline: str, **kwargs) -> tuple[BatchBuilder, Batch]:
    builder = BatchBuilder(5, ops=PIPELINES[pipeline](), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3],
                           executor=executor, **kwargs)
    return builder, _seeds(S if pipeline.startswith("replicate") else 2 * S, torch.uint8)


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("keep_uint8", [False, True])
def test_the_device_stage_with_the_torch_executor_reads_nothing(pipeline: str, keep_uint8: bool) -> None:
    builder, batch = _stage("torch", pipeline, keep_uint8=keep_uint8)
    assert _reads(builder.apply, batch) == {}


@pytest.mark.skipif(row_mix.numba is None, reason="numba is not installed")
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_the_device_stage_with_the_fused_kernel_reads_nothing_outside_the_cpu_backend(
        pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The numba backend runs on host memory by construction (numpy views of the CPU tensors); everything the
    stage does around it, the launcher included, reads nothing."""
    builder, batch = _stage("fused", pipeline)
    builder.apply(batch)  # warm up with the real kernel
    launched: list[tuple[torch.Tensor, ...]] = []
    monkeypatch.setattr(row_mix, "_launch_numba", lambda x, rows, weights, table, out, threads: launched.append(
        (rows, weights)))
    assert _reads(builder.apply, batch) == {}
    mixes = 0 if pipeline == "cutmix" else 1
    assert len(launched) == 3 * mixes and builder.ran["fused_mix[numba]"] == 4 * mixes  # warm-ups + the counted


@pytest.mark.skipif(row_mix.triton is None, reason="triton is not installed (extra `triton`)")
@pytest.mark.parametrize("pipeline", ["gradual", "replicate+gradual", "mixup"])
def test_the_triton_launcher_reads_nothing(pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path up to the kernel launch (plan columns, per-device table, strides, grid) on CPU tensors, with
    the compiled kernel replaced by a recorder: no read."""
    calls: list[tuple] = []

    class Recorder:
        def __getitem__(self, grid: tuple) -> Callable:
            return lambda *args, **meta: calls.append((grid, args, meta))

    monkeypatch.setattr(row_mix, "resolve_backend", lambda device, backend=None: "triton")
    monkeypatch.setattr(row_mix, "_mix_kernel", Recorder())
    builder, batch = _stage("fused", pipeline)
    assert _reads(builder.apply, batch) == {}
    assert len(calls) == 3 and builder.ran["fused_mix[triton]"] == 3
    grid, args, meta = calls[-1]
    rows, weights = args[1], args[2]
    assert rows.dtype == torch.int64 and weights.dtype == torch.float32 and meta["K"] == rows.shape[1]
    (mixer,) = builder._mixers.values()  # uint8 in (fused with the normalisation), or the replicated floats
    assert len(mixer._tables) == 1  # its per-channel table uploaded once, on the first batch
