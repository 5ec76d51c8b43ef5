"""Property-based bad-input suite (hypothesis) over the public API.

For every generated bad value the call must raise the documented error type *before* any work, and the
message must name the offending argument. Valid neighbours are checked too, so a check that refuses
everything cannot pass. Kept fast for ``make test``: few examples per property, no deadline, no database.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from regpipe import Batch
from regpipe.core.checks import check_finite_number, check_int
from regpipe.engine.cascade import Cascade
from regpipe.engine.config import (
    CascadeConfig,
    GradualConfig,
    InvarianceConfig,
    LossDeltaConfig,
    ReplicationConfig,
    SaliencyConfig,
    SignConfig,
    SumConfig,
    TrainConfig,
)
from regpipe.functional.losses import soft_target_cross_entropy
from regpipe.functional.patchup import patchup_mix, patchup_targets
from regpipe.functional.sum_mix import check_weights, gcc_weights, group_rows, sum_mix
from regpipe.ops.patchup import PatchUp
from regpipe.ops.sum_mix import GradualSumMix, SumMix
from regpipe.ops.tta import TestTimeSumAugmentation
from regpipe.sampler import LossDeltaOrderer

FAST = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: Floats that are not finite.
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
#: Anything that is not a real number (bool included: ``True`` is not a count or a weight).
NOT_A_NUMBER = st.one_of(st.none(), st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2),
                         st.complex_numbers(allow_nan=False, allow_infinity=False))
#: Numbers that are not integers.
NOT_AN_INT = st.one_of(st.floats(allow_nan=True).filter(lambda v: not float(v).is_integer() if math.isfinite(v)
                                                        else True), st.booleans(), st.none(), st.text(max_size=2))


def raises_naming(error: type[BaseException] | tuple[type[BaseException], ...], name: str):
    """``pytest.raises`` whose message must contain ``name`` as a word (the offending argument)."""
    return pytest.raises(error, match=rf"(^|\W){re.escape(name)}(\W|$)")


# -- core value checks ---------------------------------------------------------------------------------------
@FAST
@given(value=st.one_of(NON_FINITE, st.floats(min_value=1.0, exclude_min=True, allow_nan=False, allow_infinity=False),
                       st.floats(max_value=0.0, exclude_max=True, allow_nan=False, allow_infinity=False)))
def test_check_finite_number_names_out_of_range_and_non_finite(value: float) -> None:
    with raises_naming(ValueError, "lam"):
        check_finite_number("lam", value, 0.0, 1.0)


@FAST
@given(value=NOT_A_NUMBER)
def test_check_finite_number_refuses_non_numbers(value: object) -> None:
    with raises_naming(TypeError, "weight"):
        check_finite_number("weight", value)


@FAST
@given(value=st.floats(min_value=0.0, max_value=1.0))
def test_check_finite_number_accepts_the_interval(value: float) -> None:
    assert check_finite_number("lam", value, 0.0, 1.0) == value


@FAST
@given(value=NOT_AN_INT)
def test_check_int_refuses_non_integers(value: object) -> None:
    with raises_naming(TypeError, "shard_size"):
        check_int("shard_size", value, low=1)


# -- functional ----------------------------------------------------------------------------------------------
def _feature_map() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = torch.rand(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    holes = torch.zeros(2, 5, 5)
    holes[:, 1:3, 1:3] = 1
    return h, holes, torch.tensor([1, 0, 3, 2])


@FAST
@given(lam=st.one_of(NON_FINITE, st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
                     st.floats(max_value=0.0, exclude_max=True, allow_infinity=False)),
       as_tensor=st.booleans(), mode=st.sampled_from(["soft", "hard"]))
def test_patchup_lam_outside_the_unit_interval(lam: float, as_tensor: bool, mode: str) -> None:
    h, holes, perm = _feature_map()
    value = torch.tensor([0.5, lam, 0.5, 0.5]) if as_tensor else lam
    with raises_naming(ValueError, "lam"):
        patchup_targets(torch.eye(4), perm, value, 0.5, "soft")
    if mode == "soft":
        with raises_naming(ValueError, "lam"):
            patchup_mix(h, holes, perm, value, mode)


@FAST
@given(lam=st.floats(min_value=0.0, max_value=1.0))
def test_patchup_lam_in_range_mixes(lam: float) -> None:
    h, holes, perm = _feature_map()
    out = patchup_mix(h, holes, perm, lam, "soft")
    assert torch.isfinite(out).all()


@FAST
@given(perm=st.lists(st.integers(-3, 8), min_size=6, max_size=6).filter(lambda p: sorted(p) != list(range(6))),
       where=st.sampled_from(["sum_mix", "patchup"]))
def test_index_lists_that_are_not_permutations(perm: list[int], where: str) -> None:
    x, y = torch.rand(6, 3, 4, 4), torch.eye(3)[torch.arange(6) % 3]
    if where == "sum_mix":
        with raises_naming(ValueError, "perms"):
            sum_mix(x, y, [0.5, 0.5], perms=torch.tensor([perm]))
    else:
        holes = torch.zeros(3, 4, 4)
        with raises_naming(ValueError, "perm"):
            patchup_mix(x, holes, torch.tensor(perm), 0.5, "hard")


@FAST
@given(perm=st.permutations(list(range(6))))
def test_permutations_are_accepted(perm: list[int]) -> None:
    x, y = torch.rand(6, 3, 4, 4), torch.eye(3)[torch.arange(6) % 3]
    out_x, out_y = sum_mix(x, y, [0.5, 0.5], perms=torch.tensor([perm]))
    torch.testing.assert_close(out_y.sum(1), torch.ones(6))


@FAST
@given(weights=st.lists(st.one_of(NON_FINITE, st.floats(-2, 2)), min_size=1, max_size=4).filter(
    lambda w: not (all(math.isfinite(v) and v >= 0 for v in w) and abs(sum(w) - 1) < 1e-6)))
def test_mixing_weights(weights: list[float]) -> None:
    with raises_naming(ValueError, "weights"):
        check_weights(weights)


@FAST
@given(t=st.one_of(NON_FINITE, st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
                   st.floats(max_value=0.0, exclude_max=True, allow_infinity=False)),
       k0=st.integers(1, 8))
def test_gcc_progress_outside_0_1(t: float, k0: int) -> None:
    with raises_naming(ValueError, "t"):
        gcc_weights(k0, t)


@FAST
@given(n=st.integers(1, 64), k=st.integers(2, 9))
def test_group_rows_never_drops_without_opt_in(n: int, k: int) -> None:
    if k > n:
        with raises_naming(ValueError, "k"):
            group_rows(n, k)
    elif n % k:
        with pytest.raises(ValueError, match=rf"drop the last {n % k} rows"):
            group_rows(n, k)
        assert group_rows(n, k, drop_remainder=True) == n // k
    else:
        assert group_rows(n, k) == n // k


# -- the data model -------------------------------------------------------------------------------------------
@FAST
@given(rows=st.lists(st.lists(st.floats(-1, 5, allow_nan=False), min_size=3, max_size=3), min_size=2, max_size=5)
       .filter(lambda rows: any(min(r) < 0 or abs(sum(r) - 1) > 1e-3 for r in rows)))
def test_batch_targets_that_are_not_soft_targets(rows: list[list[float]]) -> None:
    targets = torch.tensor(rows, dtype=torch.float32)
    with raises_naming(ValueError, "Batch.targets"):
        Batch(torch.rand(len(rows), 1, 2, 2), targets, torch.arange(len(rows)))


@FAST
@given(labels=st.lists(st.integers(0, 4), min_size=1, max_size=8), smoothing=st.floats(0, 0.5))
def test_batch_accepts_soft_targets(labels: list[int], smoothing: float) -> None:
    onehot = torch.eye(5)[torch.tensor(labels)]
    targets = onehot * (1 - smoothing) + smoothing / 5
    assert Batch(torch.rand(len(labels), 1, 2, 2), targets, torch.arange(len(labels))).size == len(labels)


# -- ops and controllers ------------------------------------------------------------------------------------
@FAST
@given(bad=st.one_of(st.integers(max_value=0), NOT_AN_INT), which=st.sampled_from(["k", "draws", "chunk_size"]))
def test_tta_counts(bad: object, which: str) -> None:
    kwargs = {"k": 2, "draws": 4, "chunk_size": 8, which: bad}
    with raises_naming(ValueError, which):
        TestTimeSumAugmentation(**kwargs)


@FAST
@given(weight=st.one_of(NON_FINITE, st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)))
def test_tta_weight(weight: float) -> None:
    with raises_naming(ValueError, "weight"):
        TestTimeSumAugmentation(weight=weight)


@FAST
@given(alpha=st.one_of(NON_FINITE, st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)))
def test_patchup_alpha(alpha: float) -> None:
    with raises_naming(ValueError, "alpha"):
        PatchUp(alpha=alpha)


@FAST
@given(groups=st.one_of(st.integers(max_value=0), NOT_AN_INT))
def test_sum_mix_groups(groups: object) -> None:
    with pytest.raises((ValueError, TypeError), match=r"groups|k"):
        SumMix(groups=groups)


@FAST
@given(k0=st.one_of(st.integers(max_value=0), NOT_AN_INT))
def test_gradual_k0(k0: object) -> None:
    with pytest.raises((ValueError, TypeError), match=r"k0"):
        GradualSumMix(k0=k0, gradual_steps=10)


@FAST
@given(metric=NON_FINITE, mode=st.sampled_from(["max", "min"]))
def test_cascade_metric(metric: float, mode: str) -> None:
    cascade = Cascade(stages=(4, 2, 1), patience=2, mode=mode)
    with raises_naming(ValueError, "metric"):
        cascade.report(metric)
    assert cascade.history == []


@FAST
@given(patience=st.integers(max_value=0))
def test_cascade_patience(patience: int) -> None:
    with raises_naming(ValueError, "patience"):
        Cascade(patience=patience)


@FAST
@given(saved=st.integers(1, 5), loaded=st.integers(1, 5))
def test_cascade_state_between_patiences(saved: int, loaded: int) -> None:
    state = Cascade(stages=(2, 1), patience=saved).state_dict()
    target = Cascade(stages=(2, 1), patience=loaded)
    if saved == loaded:
        target.load_state_dict(state)
    else:
        with raises_naming(ValueError, "patience"):
            target.load_state_dict(state)


@FAST
@given(k=st.one_of(st.integers(max_value=0), NOT_AN_INT))
def test_loss_delta_k(k: object) -> None:
    model = nn.Linear(2, 2)
    with raises_naming(ValueError, "k"):
        LossDeltaOrderer([], model, soft_target_cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), k=k)


# -- configuration ---------------------------------------------------------------------------------------------
POSITIVE_INT_FIELDS = [(SumConfig, "k"), (GradualConfig, "k0"), (CascadeConfig, "patience"),
                       (LossDeltaConfig, "k"), (ReplicationConfig, "replicas"), (TrainConfig, "epochs"),
                       (TrainConfig, "batch_size"), (TrainConfig, "bn_batches")]
FINITE_FIELDS = [(TrainConfig, "lr"), (TrainConfig, "momentum"), (TrainConfig, "weight_decay"),
                 (InvarianceConfig, "alpha"), (InvarianceConfig, "ratio"), (SaliencyConfig, "weight"),
                 (SignConfig, "eta"), (GradualConfig, "fine_tune_frac")]


@FAST
@given(field=st.sampled_from(POSITIVE_INT_FIELDS), value=st.one_of(st.integers(max_value=0), NOT_AN_INT))
def test_config_counts(field: tuple[type, str], value: object) -> None:
    cls, name = field
    with raises_naming(ValueError, name):
        cls(**{name: value})


@FAST
@given(field=st.sampled_from(FINITE_FIELDS), value=st.one_of(NON_FINITE, st.floats(max_value=-1e-9,
                                                                                      allow_infinity=False)))
def test_config_numbers(field: tuple[type, str], value: float) -> None:
    cls, name = field
    with raises_naming(ValueError, name):
        cls(**{name: value})


@FAST
@given(seed=st.one_of(st.integers(min_value=2**63), st.integers(max_value=-1), st.booleans()))
def test_config_seed(seed: int) -> None:
    with raises_naming(ValueError, "seed"):
        TrainConfig(seed=seed)


@FAST
@given(stages=st.lists(st.integers(-2, 9), max_size=4).filter(
    lambda s: not s or min(s) < 1 or any(a <= b for a, b in zip(s, s[1:]))))
def test_cascade_stages(stages: list[int]) -> None:
    with raises_naming(ValueError, "stages"):
        Cascade(stages=stages)
    with raises_naming(ValueError, "cascade.stages"):
        CascadeConfig(stages=tuple(stages))
