"""Scoring samplers (the Perfect Ordering Approximation, Simionescu 2020, chapter 2): exact commit/rollback of
the loss-delta orderer, orderings, sampler statistics.

``naive_loss_delta_step`` is the reference (deep copy of model and optimizer per candidate, winner's step
recomputed, as the thesis's proof of concept); ``benchmarks/bench_sampler.py`` imports it.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import math
import os
import tempfile
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regpipe.core.batch import Batch
from regpipe.functional.losses import soft_target_cross_entropy
from regpipe.sampler import (LossDeltaOrderer, LossOrderer, LossSampler, StateSnapshot, frozen_running_stats,
                             sample_losses)
from regpipe.sampler.loss_order import per_sample_cross_entropy

NUM_CLASSES = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: with 2 intra-op threads on a busy 2-core machine each kernel waits
    milliseconds for the other thread (measured 8.7 ms vs 0.02 ms per BatchNorm call); the results do
    not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- references ------------------------------------------------------------------------------------
def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, batch: Batch) -> float:
    """The reference training step: zero_grad, forward (train-mode BN update), backward, step."""
    optimizer.zero_grad()
    loss = loss_fn(model(batch.inputs), batch.targets)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def naive_loss_delta_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                          candidates: list[Batch], external: Batch | None = None,
                          relative: bool = False) -> tuple[int, list[float]]:
    """The maximum loss delta orderer (thesis section 2.4.2) by deep copies: score every candidate on a copy of
    (model, optimizer), then take the winner's step again on the original. Returns ``(winner, scores)``;
    non-finite scores never win."""
    scores = []
    for batch in candidates:
        trial_model, trial_opt = copy.deepcopy((model, optimizer))
        target = external if external is not None else batch
        if external is not None:
            with torch.no_grad():
                before = float(loss_fn(copy.deepcopy(model)(target.inputs), target.targets))
        trial_opt.zero_grad()
        loss = loss_fn(trial_model(batch.inputs), batch.targets)
        loss.backward()
        trial_opt.step()
        if external is None:
            before = float(loss.detach())
        with torch.no_grad():  # on the throw-away copy the BN running-stat update does not matter
            after = float(loss_fn(trial_model(target.inputs), target.targets))
        scores.append((before - after) / before if relative else before - after)
    finite = [j for j, s in enumerate(scores) if math.isfinite(s)]
    winner = max(finite, key=lambda j: (scores[j], -j)) if finite else 0
    plain_step(model, optimizer, loss_fn, candidates[winner])
    return winner, scores


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


def make_batches(n: int, rows: int = 8, seed: int = 0, start: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        x = torch.randn(rows, 3, 6, 6, generator=g) * (1 + b % 3)
        y = torch.randint(0, NUM_CLASSES, (rows,), generator=g)
        ids = torch.arange(start + b * rows, start + (b + 1) * rows)
        out.append(Batch.from_labels(x, y, NUM_CLASSES, ids))
    return out


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)


def setup(opt: str = "sgd", seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = SmallCNN().train()
    return model, make_optimizer(opt, model)


def assert_state_equal(m1: nn.Module, o1: torch.optim.Optimizer, m2: nn.Module, o2: torch.optim.Optimizer) -> None:
    """Bitwise equality of parameters, buffers and optimizer state (keys included)."""
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs"
    p1 = [p for g in o1.param_groups for p in g["params"]]
    p2 = [p for g in o2.param_groups for p in g["params"]]
    assert len(o1.state) == len(o2.state)
    for i, (a, b) in enumerate(zip(p1, p2)):
        s1, s2 = dict(o1.state.get(a, {})), dict(o2.state.get(b, {}))
        assert s1.keys() == s2.keys(), f"param {i}: optimizer state keys {s1.keys()} != {s2.keys()}"
        for key in s1:
            if isinstance(s1[key], torch.Tensor):
                assert torch.equal(s1[key], s2[key]), f"param {i}: optimizer state {key} differs"
            else:
                assert s1[key] == s2[key]


# -- loss-delta orderer: exactness -----------------------------------------------------------------------
CASES = {
    "sgd-same": dict(opt="sgd"),
    "adamw-same": dict(opt="adamw"),
    "sgd-external-relative": dict(opt="sgd", variant="external", relative=True),
    "adamw-approximate": dict(opt="adamw", approximate=True),
    "sgd-approximate-external": dict(opt="sgd", approximate=True, variant="external"),
    "adamw-recompute": dict(opt="adamw", commit="recompute"),
    "sgd-rescore3": dict(opt="sgd", rescore_every=3),
}


@pytest.mark.parametrize("case", CASES)
def test_committed_step_equals_plain_step_on_winner(case: str) -> None:
    kwargs = dict(CASES[case])
    model, opt = setup(kwargs.pop("opt"))
    ref_model, ref_opt = copy.deepcopy((model, opt))
    if kwargs.get("variant") == "external":
        kwargs["external"] = make_batches(1, rows=16, seed=9, start=1000)[0]
        kwargs["external_size"] = 12
    batches = make_batches(7)
    orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, opt, k=4, **kwargs)
    winners = []
    for _ in range(2):
        for batch, info in orderer:
            plain_step(ref_model, ref_opt, soft_target_cross_entropy, batch)  # the plain step on the winner
            assert_state_equal(model, opt, ref_model, ref_opt)
            if info.rescored:
                winners.append((info.winner, info.candidates))
    # both commit paths must be exercised: a winner restored from the snapshot and a live last winner
    assert any(0 < w for w, _ in winners) and any(w < n - 1 for w, n in winners), winners


def scaled_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                calls: list[int]) -> Callable[[Batch], torch.Tensor]:
    """A training loop's step through an fp16 gradient scaler (as ``regpipe train --amp fp16`` takes it)."""
    def step(batch: Batch) -> torch.Tensor:
        calls.append(int(batch.source_ids[0]))
        optimizer.zero_grad()
        loss = soft_target_cross_entropy(model(batch.inputs), batch.targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return step


def test_trials_go_through_the_given_step_and_roll_the_scaler_back() -> None:
    model, opt = setup("sgd")
    ref_model, ref_opt = copy.deepcopy((model, opt))
    # growth_interval=1: every clean step doubles the scale, so the scale counts the steps that stuck
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    calls: list[int] = []
    orderer = LossDeltaOrderer(make_batches(3), model, soft_target_cross_entropy, opt, k=3,
                               step=scaled_step(model, opt, scaler, calls), scaler=scaler)
    batch, info = next(iter(orderer))
    assert calls == [0, 8, 16]  # one trial per candidate, through the step; the exact commit takes none more
    assert scaler.get_scale() == 2.0 ** 9  # one step's growth, not three: the trials were rolled back
    scaled_step(ref_model, ref_opt, ref_scaler, [])(batch)  # the loop's step on the winner, from the same start
    assert_state_equal(model, opt, ref_model, ref_opt)
    with pytest.raises(ValueError, match="approximate=True .* cannot take the trials through step="):
        LossDeltaOrderer(make_batches(3), model, soft_target_cross_entropy, opt, approximate=True,
                         step=scaled_step(model, opt, scaler, calls))


def test_snapshot_restores_lazily_created_optimizer_state() -> None:
    for name in ("sgd", "adamw"):
        model, opt = setup(name)
        before = copy.deepcopy(model.state_dict())
        snap = StateSnapshot(model, opt)
        snap.save()
        plain_step(model, opt, soft_target_cross_entropy, make_batches(1)[0])
        assert any(len(s) for s in opt.state.values())
        snap.restore()
        assert len(opt.state) == 0, "restoring 'no state' must remove the state the step created"
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key


def test_frozen_running_stats_leaves_buffers() -> None:
    model, _ = setup()
    x = make_batches(1)[0].inputs
    before = [b.clone() for b in model.buffers()]
    with torch.no_grad(), frozen_running_stats(model):
        out = model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert model.bn.track_running_stats
    with torch.no_grad():
        assert torch.equal(out, copy.deepcopy(model)(x)), "train mode must still use batch statistics"


def test_each_batch_used_once_per_epoch_and_buffer_drains() -> None:
    model, opt = setup()
    batches = make_batches(10)
    orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, opt, k=4, rescore_every=2)
    for _ in range(2):
        seen = [int(b.source_ids[0]) for b, _ in orderer]
        assert sorted(seen) == [b * 8 for b in range(10)]
    assert seen != sorted(seen), "the orderer never reordered"
    assert orderer.epoch == 2


def test_k1_is_plain_training_in_order() -> None:
    model, opt = setup("adamw")
    ref_model, ref_opt = copy.deepcopy((model, opt))
    batches = make_batches(5)
    orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, opt, k=1)
    got = []
    for batch, info in orderer:
        got.append(int(batch.source_ids[0]))
        assert info.scores == () and orderer.last_scores is None
    for batch in batches:
        plain_step(ref_model, ref_opt, soft_target_cross_entropy, batch)
    assert got == [int(b.source_ids[0]) for b in batches]
    assert_state_equal(model, opt, ref_model, ref_opt)


@pytest.mark.parametrize("variant,relative", [("same", False), ("same", True), ("external", False)])
def test_winner_is_argmax_of_independent_deltas(variant: str, relative: bool) -> None:
    model, opt = setup("sgd", seed=1)
    batches = make_batches(6, seed=3)
    external = make_batches(1, rows=12, seed=5, start=500)[0] if variant == "external" else None
    orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, opt, k=3, variant=variant,
                               relative=relative, external=external, external_size=None)
    it = iter(orderer)
    buffer, pending = [], list(batches)
    winners = []
    while pending or buffer:
        while pending and len(buffer) < 3:
            buffer.append(pending.pop(0))
        ref_model, ref_opt = copy.deepcopy((model, opt))
        expected, ref_scores = naive_loss_delta_step(ref_model, ref_opt, soft_target_cross_entropy, buffer,
                                                     external, relative)
        batch, info = next(it)
        if len(buffer) > 1:
            torch.testing.assert_close(torch.tensor(info.scores), torch.tensor(ref_scores), rtol=1e-5, atol=1e-6)
            assert info.winner == expected and info.score == max(info.scores)
        assert torch.equal(batch.source_ids, buffer.pop(expected).source_ids)
        assert_state_equal(model, opt, ref_model, ref_opt)
        winners.append(expected)
    assert set(winners) != {0}, "the toy problem never picked a later candidate"


def test_approximate_score_is_gradient_alignment() -> None:
    model, _ = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = make_batches(2)
    expected = []
    for b in batches:
        ref = copy.deepcopy(model)
        grads = torch.autograd.grad(soft_target_cross_entropy(ref(b.inputs), b.targets), list(ref.parameters()))
        expected.append(0.05 * sum(float((g.double() ** 2).sum()) for g in grads))
    orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, opt, k=2, approximate=True)
    next(iter(orderer))
    torch.testing.assert_close(orderer.last_scores, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_external_batch_redrawn_at_epoch_start() -> None:
    model, opt = setup()
    pool = make_batches(1, rows=40, seed=7, start=1000)[0]
    draws = []
    orderer = LossDeltaOrderer(make_batches(3), model, soft_target_cross_entropy, opt, k=2, variant="external",
                               external=pool, external_size=16, seed=4)
    for epoch in range(3):
        for step, _ in enumerate(orderer):
            if step == 0:
                draws.append(orderer.external_batch.source_ids.clone())
    assert all(d.numel() == 16 and set(d.tolist()) <= set(pool.source_ids.tolist()) for d in draws)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    calls = []

    def fresh(g: torch.Generator) -> Batch:
        calls.append(len(seen))
        return make_batches(1, rows=8, seed=int(torch.randint(100, (1,), generator=g)), start=2000)[0]

    seen: list[int] = []
    orderer = LossDeltaOrderer(make_batches(3), model, soft_target_cross_entropy, opt, k=2, variant="external",
                               external=fresh, external_size=8)
    for _ in range(2):
        for batch, _ in orderer:
            seen.append(int(batch.source_ids[0]))
    assert calls == [0, 3], "the callable must be called once, before the first step of each epoch"


class NanWhenScoring(nn.Module):
    """Wraps a model: its outputs are NaN in no-grad forwards (the score losses) of marked rows
    (``inputs[:, 0, 0, 0] == 99``; every row when ``all_rows``), finite in the trial steps."""

    def __init__(self, net: nn.Module, all_rows: bool = False) -> None:
        super().__init__()
        self.net, self.all_rows = net, all_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if torch.is_grad_enabled():
            return out
        marked = torch.ones_like(x[:, 0, 0, 0], dtype=torch.bool) if self.all_rows else x[:, 0, 0, 0] == 99
        return torch.where(marked[:, None], torch.full_like(out, math.nan), out)


@pytest.mark.parametrize("poisoned,k", [(0, 4), (3, 4), (2, 2), (1, 1)])
def test_non_finite_candidate_loss_stops_with_the_step_named(poisoned: int, k: int) -> None:
    """A NaN batch used to be skipped until it was the last candidate, then taken: every parameter became
    NaN with warnings only. Now its trial (or plain) step raises, naming epoch, step and batch, and the
    model keeps the state before that step."""
    model, opt = setup()
    batches = make_batches(4)
    bad = batches[poisoned]
    batches[poisoned] = bad.replace(inputs=torch.full_like(bad.inputs, float("nan")))
    orderer = LossDeltaOrderer(batches, model, soft_target_cross_entropy, opt, k=k)
    taken = []
    with pytest.raises(ValueError, match=r"loss-delta: the training loss.* became nan at epoch 1 step \d+ "
                                         rf"\(batch with source ids starting \[{8 * poisoned}, ") as err:
        for batch, _ in orderer:
            taken.append(int(batch.source_ids[0]))
            before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    assert 8 * poisoned not in taken
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if taken:  # the state is the one after the last good step
        for key, value in before[0].items():
            assert torch.equal(value, model.state_dict()[key]), key
    assert "left in its state before this step" in str(err.value)


def test_non_finite_score_is_not_chosen() -> None:
    """A candidate whose trial step gives a NaN score (finite loss) is not chosen, with a warning."""
    model, opt = setup()
    batches = make_batches(4)
    marked = batches[1].inputs.clone()
    marked[:, 0, 0, 0] = 99
    batches[1] = batches[1].replace(inputs=marked)
    orderer = LossDeltaOrderer(batches, NanWhenScoring(model), soft_target_cross_entropy, opt, k=4)
    with pytest.warns(RuntimeWarning, match="not chosen"):
        batch, info = next(iter(orderer))
    assert info.winner != 1 and math.isnan(info.scores[1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_all_non_finite_scores_raise_and_keep_the_state() -> None:
    """Every trial step diverging used to commit the first candidate (NaN parameters follow); now an error
    names the step and the model keeps its state."""
    model, opt = setup()
    before = copy.deepcopy(model.state_dict())
    orderer = LossDeltaOrderer(make_batches(3), NanWhenScoring(model, all_rows=True), soft_target_cross_entropy,
                               opt, k=3)
    with pytest.raises(ValueError, match=r"scores of all 3 candidate batches are non-finite .* epoch 1 step 1"):
        next(iter(orderer))
    for key, value in before.items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("rescore_every,variant", [(1, "same"), (2, "same"), (1, "external")])
@pytest.mark.parametrize("stop_after", [1, 3, 6])
def test_mid_epoch_state_resumes_the_epoch(rescore_every: int, variant: str, stop_after: int) -> None:
    """A state saved mid-epoch used to restart at the next epoch (the rest of the epoch was never trained).
    Now a fresh orderer loaded with it finishes the epoch: parameters, optimizer state and the batches
    taken equal those of the uninterrupted run, bit for bit."""
    pool = make_batches(1, rows=24, seed=5, start=1000)[0]
    kwargs: dict = dict(k=3, rescore_every=rescore_every, variant=variant, seed=4)
    if variant == "external":
        kwargs.update(external=pool, external_size=8)

    def run(interrupt: int | None) -> tuple[nn.Module, torch.optim.Optimizer, list[int]]:
        model, opt = setup(seed=1)
        orderer = LossDeltaOrderer(make_batches(7), model, soft_target_cross_entropy, opt, **kwargs)
        order: list[int] = []
        for epoch in range(2):
            for batch, _ in orderer:
                order.append(int(batch.source_ids[0]))
                if epoch == 0 and len(order) == interrupt:
                    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), orderer.state_dict()))
                    break
            else:
                continue
            # "a new process": fresh objects loaded from the saved states finish the run
            model, opt = setup(seed=2)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            orderer = LossDeltaOrderer(make_batches(7), model, soft_target_cross_entropy, opt, **kwargs)
            orderer.load_state_dict(saved[2])
            for batch, _ in orderer:  # the rest of epoch 0
                order.append(int(batch.source_ids[0]))
            assert orderer.epoch == 1
            for batch, _ in orderer:  # epoch 1
                order.append(int(batch.source_ids[0]))
            break
        return model, opt, order

    ref_model, ref_opt, ref_order = run(None)
    model, opt, order = run(stop_after)
    assert order == ref_order and sorted(order[:7]) == [8 * i for i in range(7)]
    assert_state_equal(model, opt, ref_model, ref_opt)


def test_state_after_the_last_step_starts_the_next_epoch() -> None:
    model, opt = setup()
    orderer = LossDeltaOrderer(make_batches(3), model, soft_target_cross_entropy, opt, k=2)
    for _ in orderer:
        state = orderer.state_dict()
    assert state["in_epoch"] is None and state["epoch"] == 1


def test_bad_inputs() -> None:
    model, opt = setup()
    batches = make_batches(2)
    loss = soft_target_cross_entropy
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        LossDeltaOrderer(batches, model, loss, opt, k=0)
    with pytest.raises(ValueError, match="got 1.5"):
        LossDeltaOrderer(batches, model, loss, opt, k=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rescore_every"):
        LossDeltaOrderer(batches, model, loss, opt, rescore_every=0)
    with pytest.raises(ValueError, match="'sideways'"):
        LossDeltaOrderer(batches, model, loss, opt, variant="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs an external"):
        LossDeltaOrderer(batches, model, loss, opt, variant="external")
    with pytest.raises(ValueError, match="has 8 rows, fewer than external_size=512"):
        LossDeltaOrderer(batches, model, loss, opt, variant="external", external=batches[0])
    small = LossDeltaOrderer(batches, model, loss, opt, variant="external", external=lambda g: batches[0],
                             external_size=16)
    with pytest.raises(ValueError, match="has 8 rows, fewer than external_size=16"):
        next(iter(small))
    with pytest.raises(TypeError, match="LBFGS.step\\(\\) requires a closure"):
        LossDeltaOrderer(batches, model, loss, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="Batch objects, got tuple"):
        next(iter(LossDeltaOrderer([(1, 2)], model, loss, opt)))  # type: ignore[list-item]


def test_ddp_recomputes_winner_with_sync() -> None:
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    model, opt = setup()
    ref_model, ref_opt = copy.deepcopy((model, opt))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            ddp = nn.parallel.DistributedDataParallel(model)
            orderer = LossDeltaOrderer(make_batches(5), ddp, soft_target_cross_entropy, opt, k=3)
            assert orderer.recompute
            with pytest.raises(ValueError, match="ranks diverge"):
                LossDeltaOrderer(make_batches(5), ddp, soft_target_cross_entropy, opt, commit="exact")
            for batch, _ in orderer:
                plain_step(ref_model, ref_opt, soft_target_cross_entropy, batch)
                assert_state_equal(model, opt, ref_model, ref_opt)
        finally:
            dist.destroy_process_group()


def test_orderer_state_dict_round_trip() -> None:
    model, opt = setup()
    pool = make_batches(1, rows=40, seed=7)[0]
    kwargs = dict(k=2, variant="external", external=pool, external_size=10, seed=3)
    a = LossDeltaOrderer(make_batches(2), model, soft_target_cross_entropy, opt, **kwargs)
    list(a)
    b = LossDeltaOrderer(make_batches(2), model, soft_target_cross_entropy, opt, **{**kwargs, "seed": 99})
    b.load_state_dict(a.state_dict())
    next(iter(a)), next(iter(b))
    assert a.epoch == b.epoch == 2 and torch.equal(a.external_batch.source_ids, b.external_batch.source_ids)
    with pytest.raises(ValueError, match="k=2"):
        LossDeltaOrderer(make_batches(2), model, soft_target_cross_entropy, opt, k=3).load_state_dict(a.state_dict())


# -- per-sample loss orderer / sampler (thesis section 2.4.1) -------------------------------------------------
class TableModel(nn.Module):
    """Logits looked up from the sample's first pixel (its index): per-sample losses are spread and known."""

    def __init__(self, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter(torch.randn(n, NUM_CLASSES, generator=g) * 2.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[(x[:, 0, 0, 0] * 255).round().long()]


def table_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return images, torch.arange(n) % NUM_CLASSES


def naive_losses(model: TableModel, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([F.cross_entropy(model.table[i:i + 1], data[1][i:i + 1]) for i in range(len(data[1]))])


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_loss_orderer_matches_naive_order(order: str) -> None:
    data, model = table_data(30), TableModel(30)
    losses = naive_losses(model, data)
    full = LossOrderer(data, model, batch_size=7, pool_size=30, order=order, num_classes=NUM_CLASSES)
    got = [i for batch in full for i in batch]
    assert got == torch.argsort(losses, descending=order == "descending", stable=True).tolist()
    pooled = LossOrderer(data, model, batch_size=4, pool_size=10, order=order, num_classes=NUM_CLASSES, seed=1)
    seen = []
    for batch in pooled:
        pool = pooled.last_pool
        ranked = pool[torch.argsort(losses[pool], descending=order == "descending", stable=True)].tolist()
        assert batch == ranked[:len(batch)]  # rescored every batch: the best of the current pool
        seen += batch
    assert sorted(seen) == list(range(30)) and len(pooled) == 8


def test_sample_losses_modes_restore_model() -> None:
    model, _ = setup()
    images = torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8)
    labels = torch.arange(10) % NUM_CLASSES
    buffers = [b.clone() for b in model.buffers()]
    from regpipe.loaders.torch import TorchLoader
    prepare = TorchLoader([], NUM_CLASSES).to_batch
    scores = sample_losses(model, (images, labels), torch.arange(10), prepare, score_mode="eval")
    model.eval()
    with torch.no_grad():
        ref = per_sample_cross_entropy(model(images.float() / 255), F.one_hot(labels, NUM_CLASSES).float())
    model.train()
    torch.testing.assert_close(scores, ref)
    sample_losses(model, (images, labels), torch.arange(10), prepare, score_mode="train")
    assert model.training and all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_default_prepare_is_the_plain_loader_batch() -> None:
    # The samplers build their default batches with PlainBatch (layer 3 depends only on core and functional);
    # it must give what a TorchLoader without mean/std gives, for uint8 and float images.
    from regpipe.loaders.torch import TorchLoader
    from regpipe.sampler import PlainBatch

    g = torch.Generator().manual_seed(0)
    labels, indices = torch.arange(6) % NUM_CLASSES, torch.arange(10, 16)
    for images in (torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8, generator=g),
                   torch.rand(6, 3, 4, 4, generator=g)):
        got = PlainBatch(NUM_CLASSES)((images, labels, indices))
        want = TorchLoader([], NUM_CLASSES).to_batch((images, labels, indices))
        for field in ("inputs", "targets", "source_ids"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.equal(a, b), field
    with pytest.raises(ValueError, match="out of range"):
        PlainBatch(NUM_CLASSES)((torch.zeros(2, 3, 4, 4), torch.tensor([0, NUM_CLASSES]), torch.arange(2)))
    with pytest.raises(ValueError, match="num_classes"):
        PlainBatch(0)


@pytest.mark.parametrize("weighting", ["direct", "inverse"])
def test_loss_sampler_frequencies_follow_scores(weighting: str) -> None:
    data, model = table_data(12), TableModel(12)
    losses = naive_losses(model, data).double()
    w = losses if weighting == "direct" else 1 / losses
    p = w / w.sum()
    assert float((p - 1 / 12).abs().max()) > 0.05, "scores too uniform: the test could not fail"
    sampler = LossSampler(data, model, batch_size=50, pool_size=12, weighting=weighting, num_batches=400,
                          num_classes=NUM_CLASSES, seed=0)
    counts = torch.bincount(torch.tensor([i for batch in sampler for i in batch]), minlength=12).double()
    # 20000 draws: the standard error of a frequency is <= 0.0036, so 0.015 is > 4 sigma
    assert float((counts / counts.sum() - p).abs().max()) < 0.015


def test_loss_sampler_bad_inputs_and_state_dict() -> None:
    data, model = table_data(12), TableModel(12)
    with pytest.raises(ValueError, match="pool_size must be an int >= batch_size=8, got 4"):
        LossOrderer(data, model, batch_size=8, pool_size=4, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match="'sideways'"):
        LossOrderer(data, model, batch_size=4, order="sideways", num_classes=NUM_CLASSES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        LossSampler(data, model, batch_size=4)
    for cls in (LossSampler, LossOrderer):
        a = cls(data, model, batch_size=4, pool_size=8, num_classes=NUM_CLASSES, seed=5)
        list(a)
        b = cls(data, model, batch_size=4, pool_size=8, num_classes=NUM_CLASSES, seed=6)
        b.load_state_dict(a.state_dict())
        assert list(a) == list(b) and a.epoch == b.epoch == 2


def test_loss_sampler_with_dataloader() -> None:
    from torch.utils.data import DataLoader

    from regpipe.engine.data import ArrayDataset, ImageArrays
    images, labels = table_data(12)
    arrays = ImageArrays(images, labels, NUM_CLASSES, tuple("abcd"))
    sampler = LossOrderer(arrays, TableModel(12), batch_size=5)
    batches = list(DataLoader(ArrayDataset(arrays), batch_sampler=sampler))
    assert [len(b[2]) for b in batches] == [5, 5, 2]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(LossSampler(arrays, TableModel(12), batch_size=5, weighting="inverse"))


@pytest.mark.parametrize("name", ["regpipe.sampler.loss_delta", "regpipe.sampler.loss_order"])
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
