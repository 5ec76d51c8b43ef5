"""Tests for regpipe.engine.cascade.Cascade (Cascading Sum Augmentation controller, Simionescu 2020, section 3.4)."""

from __future__ import annotations

import copy
import io
import math
import random
import re

import pytest
import torch
from torch import nn

from regpipe import Cascade, CascadeEvent


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)


def run(cascade: Cascade, metrics, **kw) -> list[CascadeEvent]:
    return [cascade.report(m, **kw) for m in metrics]


def decisions(events: list[CascadeEvent]) -> list[tuple[bool, bool, bool, int]]:
    return [(e.improved, e.advanced, e.finished, e.k) for e in events]


# ------------------------------------------------------------------ an independent reference of the rule
def reference_cascade(metrics, stages, patience, budgets, mode="max", min_delta=0.0):
    """Naive re-statement of the cascading schedule: returns (improved, advanced, finished, k) per report."""
    out, stage, best = [], 0, (-math.inf if mode == "max" else math.inf)
    since, in_stage, finished = 0, 0, False
    for m in metrics:
        if finished:
            break
        in_stage += 1
        better = m > best + min_delta if mode == "max" else m < best - min_delta
        if better:
            best, since = m, 0
        else:
            since += 1
        advanced = False
        if since >= patience or (budgets[stage] is not None and in_stage >= budgets[stage]):
            if stage == len(stages) - 1:
                finished = True
            else:
                stage += 1
                advanced = True
            since, in_stage = 0, 0
        out.append((better, advanced, finished, stages[stage]))
    return out


# ------------------------------------------------------------------ stage transitions
def test_docstring_example() -> None:
    cascade = Cascade(stages=(4, 2, 1), patience=1)
    assert [cascade.report(m).k for m in (0.5, 0.4, 0.6, 0.6)] == [4, 2, 2, 1]


def test_patience_transitions_scripted() -> None:
    cascade = Cascade(stages=(4, 2, 1), patience=2)
    assert cascade.k == 4
    metrics = [0.1, 0.2, 0.2, 0.15, 0.3, 0.25, 0.25, 0.4, 0.3, 0.3]
    events = run(cascade, metrics)
    T, F = True, False
    assert [e.improved for e in events] == [T, T, F, F, T, F, F, T, F, F]
    assert [e.advanced for e in events] == [F, F, F, T, F, F, T, F, F, F]
    assert [e.finished for e in events] == [F] * 9 + [T]
    assert [e.k for e in events] == [4, 4, 4, 2, 2, 2, 1, 1, 1, 1]
    assert cascade.finished and cascade.k == 1
    assert cascade.best == 0.4
    assert [h["metric"] for h in cascade.history] == metrics
    assert [h["k"] for h in cascade.history] == [e.k for e in events]


def test_equal_metric_is_not_an_improvement_and_min_delta() -> None:
    cascade = Cascade(stages=(2, 1), patience=1)
    assert cascade.report(0.5).improved
    assert not cascade.report(0.5).improved  # equal is not better -> stage ends
    assert cascade.k == 1

    cascade = Cascade(stages=(2, 1), patience=3, min_delta=0.1)
    assert cascade.report(0.5).improved
    assert not cascade.report(0.55).improved  # 0.55 <= 0.5 + 0.1
    assert not cascade.report(0.6).improved  # 0.6 == 0.5 + 0.1 is not "more than"
    assert cascade.report(0.61).improved
    assert cascade.best == 0.61


def test_best_carries_over_between_stages() -> None:
    # The best checkpoint is restored at the stage change, so a later stage must beat it.
    cascade = Cascade(stages=(2, 1), patience=1)
    events = run(cascade, [0.9, 0.5, 0.6])
    assert decisions(events) == [(True, False, False, 2), (False, True, False, 1), (False, False, True, 1)]


@pytest.mark.parametrize("stage_epochs, expected_k", [
    ((2, 3, 1), [4, 2, 2, 2, 1, 1]),
    (2, [4, 2, 2, 1, 1, 1]),
])
def test_stage_epochs_budget(stage_epochs, expected_k) -> None:
    # Always improving: only the budget can end a stage.
    cascade = Cascade(stages=(4, 2, 1), patience=100, stage_epochs=stage_epochs)
    events = run(cascade, [float(i) for i in range(6)])
    assert all(e.improved for e in events)
    assert [e.k for e in events] == expected_k
    budgets = stage_epochs if isinstance(stage_epochs, tuple) else (stage_epochs,) * 3
    ends = [i + 1 for i, e in enumerate(events) if e.advanced or e.finished]
    assert ends == [budgets[0], budgets[0] + budgets[1], sum(budgets)]
    assert events[-1].finished and sum(e.finished for e in events) == 1
    assert cascade.stage_epochs == budgets


def test_budget_and_patience_both_end_stages() -> None:
    cascade = Cascade(stages=(3, 2, 1), patience=2, stage_epochs=(5, 5, 5))
    metrics = [1, 2, 3, 4, 5,  # budget ends stage 0 after 5
               6, 6, 6,  # patience ends stage 1 after 3
               7, 8, 9, 10, 11]
    events = run(cascade, metrics)
    assert [e.k for e in events] == [3] * 4 + [2] * 3 + [1] * 6
    assert [i for i, e in enumerate(events) if e.advanced] == [4, 7]
    assert events[-1].finished


def test_mode_min() -> None:
    cascade = Cascade(stages=(2, 1), patience=1, mode="min")
    events = run(cascade, [1.0, 0.8, 0.9, 0.7, 0.75])
    assert decisions(events) == [
        (True, False, False, 2), (True, False, False, 2), (False, True, False, 1),
        (True, False, False, 1), (False, False, True, 1)]
    assert cascade.best == 0.7
    # The same sequence read as "max" ends the first stage at the second report.
    assert run(Cascade(stages=(2, 1), patience=1, mode="max"), [1.0, 0.8])[1].advanced


def test_stop_at_two_drops_clean_stage() -> None:
    cascade = Cascade(stages=(8, 4, 2, 1), patience=1, stop_at=2)
    assert cascade.stages == (8, 4, 2)
    ks = []
    while not cascade.finished:
        ks.append(cascade.report(0.0).k)
        assert len(ks) < 10
    assert ks == [8, 4, 2, 2]  # first report improves, then one per stage
    assert 1 not in ks and cascade.k == 2


def test_finished_raises_runtime_error() -> None:
    cascade = Cascade(stages=(1,), patience=1)
    cascade.report(1.0)
    event = cascade.report(0.0)
    assert event.finished and not event.advanced and event.k == 1
    with pytest.raises(RuntimeError, match="finished"):
        cascade.report(2.0)
    assert len(cascade.history) == 2


def test_nan_metric_raises_and_changes_nothing() -> None:
    cascade = Cascade(stages=(2, 1), patience=1)
    cascade.report(0.5)
    before = cascade.state_dict()
    with pytest.raises(ValueError, match="must be finite, got nan"):
        cascade.report(float("nan"))
    with pytest.raises(ValueError, match="must be finite, got nan"):
        cascade.report(torch.tensor(float("nan")))
    assert cascade.state_dict() == before


def test_tensor_metric_accepted() -> None:
    cascade = Cascade(stages=(2, 1), patience=1)
    assert cascade.report(torch.tensor(0.25)).improved
    assert cascade.best == 0.25


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["max", "min"])
def test_random_sequences_match_reference(seed: int, mode: str) -> None:
    rng = random.Random(seed)
    stages = (8, 4, 2, 1)
    patience = rng.randint(1, 3)
    budgets = tuple(rng.choice([None, 2, 3, 5]) for _ in stages)
    metrics = [float(rng.randint(0, 6)) for _ in range(60)]  # small integers: many ties
    expected = reference_cascade(metrics, stages, patience, budgets, mode)
    n = len(expected)
    assert expected[-1][2] or n == len(metrics)
    cascade = Cascade(stages=stages, patience=patience, stage_epochs=budgets, mode=mode)
    assert decisions(run(cascade, metrics[:n])) == expected[:n]


# ------------------------------------------------------------------ constructor errors
@pytest.mark.parametrize("stages", [(4, 4, 1), (2, 4), (), (4, 2, 0), (2, -1)])
def test_bad_stages(stages) -> None:
    with pytest.raises(ValueError, match=re.escape(f"got {tuple(stages)}")):
        Cascade(stages=stages)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="stop_at=5"):
        Cascade(stages=(4, 2, 1), stop_at=5)
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        Cascade(patience=0)
    with pytest.raises(ValueError, match="'median'"):
        Cascade(mode="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("2 entries for 3 stages (4, 2, 1)")):
        Cascade(stages=(4, 2, 1), stage_epochs=(3, 3))
    with pytest.raises(ValueError, match=re.escape("got (3, 0, 3)")):
        Cascade(stages=(4, 2, 1), stage_epochs=(3, 0, 3))
    with pytest.raises(ValueError, match=re.escape("got (0, 0)")):
        Cascade(stages=(2, 1), stage_epochs=0)


# ------------------------------------------------------------------ checkpoint restore
def set_weights(model: nn.Linear, value: float) -> None:
    """In-place change (a checkpoint that aliased the parameters would change too)."""
    with torch.no_grad():
        model.weight.copy_(torch.arange(model.weight.numel(), dtype=torch.float32).view_as(model.weight) + value)
        model.bias.fill_(-value)


def test_model_holds_best_weights_after_stage_end() -> None:
    model = nn.Linear(3, 2)
    cascade = Cascade(stages=(2, 1), patience=2)
    metrics = [0.1, 0.5, 0.3, 0.2]
    for i, m in enumerate(metrics):
        set_weights(model, 10.0 * i)
        event = cascade.report(m, model)
        if i < 3:  # no stage end yet: the model keeps the weights it was given
            assert not event.advanced
            torch.testing.assert_close(model.bias, torch.full((2,), -10.0 * i))
    assert event.advanced and event.k == 1
    reference = nn.Linear(3, 2)
    set_weights(reference, 10.0)  # report 1 (metric 0.5) was the best
    torch.testing.assert_close(model.weight, reference.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.bias, reference.bias, rtol=0, atol=0)
    # Next stage: improve once, worsen twice -> the new best (the improving report) comes back.
    set_weights(model, 77.0)
    cascade.report(0.9, model)
    set_weights(model, 88.0)
    cascade.report(0.1, model)
    set_weights(model, 99.0)
    assert cascade.report(0.1, model).finished
    set_weights(reference, 77.0)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)


def test_restore_best_without_checkpoint() -> None:
    model = nn.Linear(3, 2)
    cascade = Cascade(stages=(2, 1), patience=1)
    assert cascade.restore_best(model) is False
    cascade.report(0.5)  # no model given: nothing is stored
    set_weights(model, 3.0)
    assert cascade.report(0.1, model).advanced
    assert cascade.restore_best(model) is False
    torch.testing.assert_close(model.bias, torch.full((2,), -3.0))
    cascade.report(0.9, model)
    assert cascade.restore_best(None) is False
    set_weights(model, 5.0)
    assert cascade.restore_best(model) is True
    torch.testing.assert_close(model.bias, torch.full((2,), -3.0))


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    optimizer.zero_grad()
    model(torch.randn(4, 3, generator=g)).pow(2).sum().backward()
    optimizer.step()


def optimizer_snapshot(optimizer: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(optimizer.state_dict())


def assert_optimizer_state_equal(actual: dict, expected: dict) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for key in expected["state"]:
        torch.testing.assert_close(actual["state"][key], expected["state"][key], rtol=0, atol=0)


def test_optimizer_state_restored_with_model() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cascade = Cascade(stages=(2, 1), patience=2)
    sgd_step(model, optimizer, 0)
    sgd_step(model, optimizer, 1)
    cascade.report(0.8, model, optimizer)  # best
    best_model = copy.deepcopy(model.state_dict())
    best_opt = optimizer_snapshot(optimizer)
    for seed in (2, 3):
        sgd_step(model, optimizer, seed)
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
        event = cascade.report(0.1, model, optimizer)
    assert event.advanced
    assert not torch.equal(best_opt["state"][0]["momentum_buffer"], torch.zeros(2, 3))
    torch.testing.assert_close(model.state_dict(), best_model, rtol=0, atol=0)
    assert_optimizer_state_equal(optimizer.state_dict(), best_opt)
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_checkpoint_is_independent_of_later_parameter_updates() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd_step(model, optimizer, 0)
    cascade = Cascade(stages=(2, 1), patience=1)
    cascade.report(1.0, model, optimizer)
    best_model = copy.deepcopy(model.state_dict())
    best_opt = optimizer_snapshot(optimizer)
    for seed in range(1, 4):  # in-place updates of parameters and momentum buffers
        sgd_step(model, optimizer, seed)
    assert cascade.report(0.0, model, optimizer).advanced
    torch.testing.assert_close(model.state_dict(), best_model, rtol=0, atol=0)
    assert_optimizer_state_equal(optimizer.state_dict(), best_opt)


def test_second_restore_of_same_checkpoint_restores_optimizer_state() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd_step(model, optimizer, 0)
    cascade = Cascade(stages=(2, 1), patience=1)
    cascade.report(1.0, model, optimizer)  # best
    best_opt = optimizer_snapshot(optimizer)
    sgd_step(model, optimizer, 1)
    assert cascade.report(0.5, model, optimizer).advanced  # restore #1
    assert_optimizer_state_equal(optimizer.state_dict(), best_opt)  # holds
    sgd_step(model, optimizer, 2)
    sgd_step(model, optimizer, 3)
    assert cascade.report(0.5, model, optimizer).finished  # restore #2 of the same best
    assert_optimizer_state_equal(optimizer.state_dict(), best_opt)


# ------------------------------------------------------------------ resume
SCRIPT = [0.1, 0.3, 0.2, 0.35, 0.34, 0.33, 0.32, 0.5, 0.45, 0.6, 0.55, 0.55, 0.7, 0.6, 0.6, 0.6,
          0.8, 0.7, 0.7, 0.7]


def weights_for(step: int) -> float:
    return 1.5 * step + 0.25


@pytest.mark.parametrize("via_bytes", [False, True])
@pytest.mark.parametrize("split", [4, 5, 8])
def test_resume_mid_stage_gives_identical_decisions(via_bytes: bool, split: int) -> None:
    kwargs = dict(stages=(8, 4, 2, 1), patience=3, stage_epochs=(6, 4, 6, 6))
    original, model_a = Cascade(**kwargs), nn.Linear(3, 2)
    uninterrupted = []
    for step, metric in enumerate(SCRIPT[:split]):
        set_weights(model_a, weights_for(step))
        uninterrupted.append(original.report(metric, model_a))
    assert original.evals_in_stage > 0 and not original.finished  # genuinely mid-stage

    state = original.state_dict()
    if via_bytes:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    resumed, model_b = Cascade(**kwargs), nn.Linear(3, 2)
    model_b.load_state_dict(model_a.state_dict())
    resumed.load_state_dict(state)
    for attr in ("stage", "best", "evals_since_best", "evals_in_stage", "finished", "history", "k"):
        assert getattr(resumed, attr) == getattr(original, attr), attr

    for step in range(split, len(SCRIPT)):
        if original.finished:
            break
        set_weights(model_a, weights_for(step))
        set_weights(model_b, weights_for(step))
        ea, eb = original.report(SCRIPT[step], model_a), resumed.report(SCRIPT[step], model_b)
        assert ea == eb, step
        torch.testing.assert_close(model_b.state_dict(), model_a.state_dict(), rtol=0, atol=0)
        uninterrupted.append(ea)
    assert original.finished and resumed.finished
    assert resumed.history == original.history
    # The run as a whole follows the reference rule.
    n = len(uninterrupted)
    assert decisions(uninterrupted) == reference_cascade(SCRIPT[:n], (8, 4, 2, 1), 3, (6, 4, 6, 6))


def test_resume_restores_weights_saved_before_the_split() -> None:
    # The best report happens before the split; the resumed cascade must restore it into a fresh model.
    cascade = Cascade(stages=(2, 1), patience=2)
    model = nn.Linear(3, 2)
    set_weights(model, 4.0)
    cascade.report(0.9, model)
    set_weights(model, 5.0)
    cascade.report(0.1, model)
    buffer = io.BytesIO()
    torch.save(cascade.state_dict(), buffer)
    buffer.seek(0)
    resumed = Cascade(stages=(2, 1), patience=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    fresh = nn.Linear(3, 2)
    assert resumed.report(0.2, fresh).advanced
    expected = nn.Linear(3, 2)
    set_weights(expected, 4.0)
    torch.testing.assert_close(fresh.state_dict(), expected.state_dict(), rtol=0, atol=0)


def test_state_dict_is_a_snapshot_and_stage_mismatch_errors() -> None:
    cascade = Cascade(stages=(4, 2, 1), patience=2)
    cascade.report(0.1)
    state = cascade.state_dict()
    cascade.report(0.0)
    assert len(state["history"]) == 1 and state["evals_since_best"] == 0
    with pytest.raises(ValueError, match=re.escape("stages: [4, 2, 1] in the state vs [4, 2] here")):
        Cascade(stages=(4, 2, 1), stop_at=2).load_state_dict(state)
