"""The op contract (regpipe.core.op) for the sum-mixing ops, PatchUp and test-time sum augmentation:
replayable frozen params, resumable draws, explicit per-rank seeds; plus the PatchUp plan on a Batch
(mixing refuses it, ``Batch.to`` moves it)."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

from regpipe.core.batch import Batch
from regpipe.core.op import BatchOp, Op
from regpipe.core.patchup_plan import PatchUpPlan
from regpipe.core.rng import rank_seed
from regpipe.ops.patchup import PatchUp
from regpipe.core.mix_plan import MixPlan
from regpipe.functional import mix_sources
from regpipe.ops.sum_mix import GradualSumMix, SumMix, mix_batch
from regpipe.ops.tta import TestTimeSumAugmentation, TTAParams

N, K = 12, 3


def _batch(n: int = N, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch.from_labels(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % K, K,
                             source_ids=torch.arange(50, 50 + n))


def _gradual(mode: str) -> Callable[[int], GradualSumMix]:
    def make(seed: int) -> GradualSumMix:
        op = GradualSumMix(k0=4, gradual_steps=6, mode=mode, seed=seed)  # type: ignore[arg-type]
        op.step_count = 2  # mid-schedule: unequal weights, one fading
        return op
    return make


# name -> (factory(seed), does draw() make random choices?)
CASES: dict[str, tuple[Callable[[int], BatchOp], bool]] = {
    "sum-group": (lambda seed: SumMix(groups=3, seed=seed), False),
    "sum-permute": (lambda seed: SumMix(groups=3, mode="permute", seed=seed), True),
    "gradual-group": (_gradual("group"), False),
    "gradual-permute": (_gradual("permute"), True),
    "patchup-soft": (lambda seed: PatchUp(mode="soft", candidate_layers=(0, 1, 2), seed=seed), True),
    "patchup-hard": (lambda seed: PatchUp(mode="hard", candidate_layers=(0, 1, 2), seed=seed), True),
    "tta": (lambda seed: TestTimeSumAugmentation(k=3, draws=2, seed=seed), True),
}
PARAMS_TYPE = {"sum": MixPlan, "gradual": MixPlan, "patchup": PatchUpPlan, "tta": TTAParams}


def _same(a: Any, b: Any) -> bool:
    """Field-by-field equality of params (tensors compared exactly, dtype and device included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    return a == b


def _same_batch(a: Batch, b: Batch) -> bool:
    return all(_same(getattr(a, name), getattr(b, name))
               for name in ("inputs", "targets", "source_ids", "affine", "mixing", "photometric", "patchup"))


def _draws(op: BatchOp, batch: Batch, count: int = 3) -> list[Any]:
    return [op.draw(batch) for _ in range(count)]


@pytest.mark.parametrize("name", CASES)
def test_apply_replays_params_exactly(name: str) -> None:
    make, _ = CASES[name]
    op, batch = make(4), _batch()
    assert isinstance(op, Op)
    for params in _draws(op, batch, 4):  # PatchUp: several draws cover skip, input space and hidden layers
        first, second = op.apply(batch, params), op.apply(batch, params)
        assert _same_batch(first, second)
    # op(batch, params) is apply; op(batch) draws from the same generator as draw()
    params = make(9).draw(batch)
    assert _same_batch(make(4)(batch, params), op.apply(batch, params))
    assert _same_batch(make(9)(batch), op.apply(batch, params))


@pytest.mark.parametrize("name", CASES)
def test_params_are_frozen_dataclasses(name: str) -> None:
    make, _ = CASES[name]
    params = make(0).draw(_batch())
    assert dataclasses.is_dataclass(params) and isinstance(params, PARAMS_TYPE[name.split("-")[0]])
    field = dataclasses.fields(params)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(params, field, None)


@pytest.mark.parametrize("name", CASES)
def test_state_dict_round_trip_resumes_the_draws(name: str) -> None:
    make, _ = CASES[name]
    op, batch = make(21), _batch()
    op.draw(batch)  # the generator has moved
    buffer = io.BytesIO()
    torch.save(op.state_dict(), buffer)
    expected = _draws(op, batch)
    resumed = make(999)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert all(_same(got, want) for got, want in zip(_draws(resumed, batch), expected))


@pytest.mark.parametrize("name", CASES)
def test_reseed_rank0_is_a_fresh_op_and_rank1_differs(name: str) -> None:
    make, random = CASES[name]
    batch = _batch()
    op = make(1)
    op.draw(batch)
    op.reseed(7, 0)
    assert all(_same(got, want) for got, want in zip(_draws(op, batch), _draws(make(7), batch)))
    other = make(1)
    other.reseed(7, 1)
    assert other.rng.seed == rank_seed(7, 1) != 7
    if random:
        assert not all(_same(got, want) for got, want in zip(_draws(other, batch), _draws(make(7), batch)))


def test_reseed_twice_does_not_compound() -> None:
    op, batch = PatchUp(seed=0), _batch()
    op.reseed(5, 2)
    first = _draws(op, batch)
    op.reseed(5, 2)
    assert all(_same(a, b) for a, b in zip(_draws(op, batch), first))
    assert (op.seed, op.host_rng.seed) == (rank_seed(5, 2), rank_seed(5, 2) + 0x5EED)


# ------------------------------------------------------------------ mixing a batch that carries a PatchUp plan


def _with_plan(n: int = N) -> Batch:
    batch = _batch(n)
    return PatchUp(candidate_layers=(1,), patchup_prob=1.0, seed=0)(batch)


@pytest.mark.parametrize("make,rows_out", [(lambda: SumMix(groups=3), 4), (lambda: SumMix(groups=3, mode="permute"), 12),
                                           (lambda: GradualSumMix(k0=4, gradual_steps=5), 3),
                                           (lambda: GradualSumMix(k0=2, gradual_steps=5, mode="permute"), 12)],
                         ids=["sum-group", "sum-permute", "gradual-group", "gradual-permute"])
def test_mixing_refuses_a_batch_carrying_a_patchup_plan(make: Callable[[], BatchOp], rows_out: int) -> None:
    op, batch = make(), _with_plan()
    message = rf"PatchUp plan drawn for 12 rows; mixing \d inputs per row gives {rows_out} new rows.*draw PatchUp after mixing"
    with pytest.raises(ValueError, match=message):
        op(batch)
    # The refusal happens before any draw: the generator is where a fresh op's is.
    clean = _batch()
    assert _same(op.draw(clean), make().draw(clean))


def test_mix_batch_refuses_a_plan_and_names_both_row_counts() -> None:
    batch = _with_plan(8)
    with pytest.raises(ValueError, match="drawn for 8 rows; mixing 2 inputs per row gives 4 new rows"):
        mix_batch(batch, MixPlan.uniform(mix_sources(8, 2), (0.5, 0.5)))
    perms = torch.randperm(8, generator=torch.Generator().manual_seed(0)).unsqueeze(0)
    with pytest.raises(ValueError, match="drawn for 8 rows; mixing 2 inputs per row gives 8 new rows"):
        mix_batch(batch, MixPlan.uniform(mix_sources(8, 2, perms), (0.5, 0.5)))  # same rows count, new rows
    # Nothing to mix (k = 1, or the gradual schedule's fine-tune phase): the batch and its plan pass through.
    assert mix_batch(batch, MixPlan.unmixed(8, "cpu")) is batch and SumMix(groups=1)(batch) is batch
    done = GradualSumMix(k0=4, gradual_steps=1)
    done.step()
    assert done(batch) is batch
    # The supported order: mix, then draw PatchUp on the mixed rows.
    mixed = PatchUp(candidate_layers=(1,), seed=0)(SumMix(groups=2)(_batch(8)))
    assert mixed.size == 4 and mixed.patchup.batch_size == 4


def test_batch_validates_its_plan() -> None:
    batch = _batch(8)
    plan = PatchUp(candidate_layers=(1,), seed=0).draw(batch)
    with pytest.raises(ValueError, match="drawn for a batch of 8 rows, got a tensor of 6 rows"):
        _batch(6).replace(patchup=plan)
    with pytest.raises(TypeError, match="Batch.patchup must be a PatchUpPlan or None, got dict"):
        batch.replace(patchup={"perm": plan.perm})
    with pytest.raises(ValueError, match="cannot select rows of a batch that carries a PatchUp plan"):
        batch.replace(patchup=plan).rows(torch.arange(4))


# ------------------------------------------------------------------ Batch.to moves the plan


def _plan_batch(per_sample: bool, layer: int) -> Batch:
    op = PatchUp(candidate_layers=(layer,), patchup_prob=1.0, per_sample=per_sample, seed=3)
    return op(_batch(8))


def _check_moved(batch: Batch, moved: Batch, device: str) -> None:
    plan, new = batch.patchup, moved.patchup
    assert isinstance(new, PatchUpPlan)
    for name in ("perm", "lam", "box", "holes"):
        before, after = getattr(plan, name), getattr(new, name)
        if before is None:
            assert after is None
            continue
        assert after.device.type == device and after.dtype == before.dtype and after.shape == before.shape
    assert (new.apply, new.layer, new.mode, new.mask_seed, new.block_size) == \
        (plan.apply, plan.layer, plan.mode, plan.mask_seed, plan.block_size)
    assert moved.inputs.device.type == device


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_batch_to_moves_the_plan_on_cpu(per_sample: bool, layer: int) -> None:
    batch = _plan_batch(per_sample, layer)
    moved = batch.to("cpu")
    _check_moved(batch, moved, "cpu")
    assert torch.equal(moved.patchup.perm, batch.patchup.perm) and torch.equal(moved.patchup.lam, batch.patchup.lam)
    assert (moved.patchup.perm.dtype, moved.patchup.lam.dtype) == (torch.int64, torch.float32)
    # "meta" is a real device change without an accelerator: every plan tensor must follow the batch.
    _check_moved(batch, batch.to("meta"), "meta")
    holes = torch.ones(3, 8, 8)
    explicit = batch.replace(patchup=dataclasses.replace(batch.patchup, holes=holes)).to("meta")
    assert explicit.patchup.holes.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer", [0, 1])
def test_batch_to_moves_the_plan_to_cuda_and_back(layer: int) -> None:
    batch = _plan_batch(True, layer)
    on_gpu = batch.to("cuda", non_blocking=True)
    _check_moved(batch, on_gpu, "cuda")
    back = on_gpu.to("cpu")
    assert torch.equal(back.patchup.perm, batch.patchup.perm) and torch.equal(back.patchup.lam, batch.patchup.lam)
    if batch.patchup.box is not None:
        assert torch.equal(back.patchup.box, batch.patchup.box)


def test_load_state_dict_refuses_an_unknown_mode_before_touching_the_generator() -> None:
    op, batch = SumMix(groups=3, mode="permute", seed=4), _batch()
    op.draw(batch)
    before = op.state_dict()
    state = {**SumMix(groups=3, mode="permute", seed=9).state_dict(), "mode": "shuffle"}
    with pytest.raises(ValueError, match="'shuffle'"):
        op.load_state_dict(state)
    assert op.mode == "permute"
    assert torch.equal(op.state_dict()["rng"]["generator"], before["rng"]["generator"])
