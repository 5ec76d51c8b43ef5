"""gcc_weights properties (Gradually Cascading Coefficients, Simionescu 2020, section 3.5) and sum_mix against
a per-row loop (Sum Augmentation, section 3.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regpipe.functional import gcc_weights, mix_sources, sum_mix

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}

k0s = st.integers(min_value=1, max_value=16)
ts = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


# ---------------------------------------------------------------- gcc_weights


def _gcc_reference(k0: int, t: float) -> list[float]:
    """The Gradually Cascading Coefficients written out literally, in plain Python: with s = t (k0 - 1),
    e = min(floor(s), k0 - 2) inputs eliminated, f = s - e, m = k0 - e active inputs, the fading
    coefficient is (1 - f) / m and the m - 1 main ones share the rest equally."""
    if k0 == 1:
        return [1.0]
    s = t * (k0 - 1)
    e = min(math.floor(s), k0 - 2)
    f = s - e
    m = k0 - e
    return [(1 - (1 - f) / m) / (m - 1) if j < m - 1 else ((1 - f) / m if j == m - 1 else 0.0) for j in range(k0)]


@settings(max_examples=300, deadline=None)
@given(k0=k0s, t=ts)
def test_gcc_sums_to_one_non_negative_sorted_and_matches_spec(k0: int, t: float) -> None:
    c = gcc_weights(k0, t, dtype=torch.float64)
    assert c.shape == (k0,)
    assert abs(float(c.sum()) - 1.0) < 1e-12
    assert (c >= 0).all()
    assert (c[:-1] >= c[1:] - 1e-12).all()  # mass sits at the front
    torch.testing.assert_close(c, torch.tensor(_gcc_reference(k0, t), dtype=torch.float64))


@pytest.mark.parametrize("k0", range(1, 17))
def test_gcc_endpoints(k0: int) -> None:
    torch.testing.assert_close(gcc_weights(k0, 0.0, torch.float64), torch.full((k0,), 1.0 / k0, dtype=torch.float64))
    one_hot = torch.zeros(k0, dtype=torch.float64)
    one_hot[0] = 1.0
    torch.testing.assert_close(gcc_weights(k0, 1.0, torch.float64), one_hot)


@pytest.mark.parametrize("k0", range(2, 17))
def test_gcc_continuous_at_stage_boundaries(k0: int) -> None:
    eps = 1e-9
    for e in range(1, k0 - 1):
        boundary = e / (k0 - 1)
        left = gcc_weights(k0, boundary - eps, torch.float64)
        right = gcc_weights(k0, boundary + eps, torch.float64)
        assert (left - right).abs().max() < 1e-7, (k0, e, left, right)


@settings(max_examples=200, deadline=None)
@given(k0=k0s, t1=ts, t2=ts)
def test_gcc_monotone_in_t(k0: int, t1: float, t2: float) -> None:
    """Monotonicity that the coefficient formula has: c_0 never decreases, the last coefficient never increases,
    and every prefix sum c_0 + ... + c_j never decreases (mass only moves to the front). A middle
    coefficient rises while others fade and then fades itself, so it is unimodal, checked below."""
    lo, hi = sorted((t1, t2))
    a, b = gcc_weights(k0, lo, torch.float64), gcc_weights(k0, hi, torch.float64)
    assert b[0] >= a[0] - 1e-12
    assert b[-1] <= a[-1] + 1e-12
    assert (b.cumsum(0) >= a.cumsum(0) - 1e-12).all()


@pytest.mark.parametrize("k0", range(2, 17))
def test_gcc_each_coefficient_rises_then_falls(k0: int) -> None:
    curve = torch.stack([gcc_weights(k0, float(t), torch.float64) for t in torch.linspace(0, 1, 601)])
    diffs = curve[1:] - curve[:-1]
    for j in range(k0):
        d = diffs[:, j]
        falling = (d < -1e-12).nonzero()
        if len(falling):  # once it starts falling it never rises again
            assert (d[int(falling[0]):] <= 1e-12).all(), j
    # the coefficient j fades to zero at t = (k0 - j) / (k0 - 1) ... and stays there
    for j in range(1, k0):
        t_zero = (k0 - j) / (k0 - 1)
        assert float(gcc_weights(k0, t_zero, torch.float64)[j]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k0,t", [(0, 0.5), (-1, 0.5), (2.0, 0.5), (4, -0.1), (4, 1.1), (4, float("nan"))])
def test_gcc_bad_input(k0, t) -> None:
    with pytest.raises(ValueError, match="k0|t must"):
        gcc_weights(k0, t)


# ---------------------------------------------------------------- sum_mix


def _loop_mix(x: torch.Tensor, y: torch.Tensor, weights: list[float], sources: torch.Tensor):
    """Per-row reference: out_i = sum_g w_g * x[sources[i, g]] in float64."""
    xs, ys = [], []
    for i in range(sources.shape[0]):
        xi = sum(w * x[int(sources[i, g])].double() for g, w in enumerate(weights))
        yi = sum(w * y[int(sources[i, g])].double() for g, w in enumerate(weights))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def _data(n: int = 12, classes: int = 5, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 5, generator=g).to(dtype)
    y = torch.nn.functional.one_hot(torch.randint(0, classes, (n,), generator=g), classes).float()
    return x, y


@pytest.mark.parametrize("weights", [[0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2, 0.0], [0.25] * 4])
def test_group_mode_matches_loop(weights) -> None:
    x, y = _data(12)
    xm, ym = sum_mix(x, y, weights)
    ref_x, ref_y = _loop_mix(x, y, weights, mix_sources(12, len(weights)))
    assert xm.shape == (12 // len(weights), 3, 4, 5)
    torch.testing.assert_close(xm.double(), ref_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ym.double(), ref_y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ym.sum(1), torch.ones(ym.shape[0]))


def test_group_sources_layout() -> None:
    # row i mixes rows g * n + i: the sum groups are consecutive blocks of the batch
    assert mix_sources(6, 3).tolist() == [[0, 2, 4], [1, 3, 5]]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_permutation_mode_matches_loop(k: int) -> None:
    x, y = _data(7)  # odd batch size: permutation mode needs no divisibility
    g = torch.Generator().manual_seed(1)
    perms = torch.stack([torch.randperm(7, generator=g) for _ in range(k - 1)])
    weights = gcc_weights(k, 0.3).tolist()
    xm, ym = sum_mix(x, y, weights, perms=perms)
    assert xm.shape == x.shape
    ref_x, ref_y = _loop_mix(x, y, weights, mix_sources(7, k, perms))
    torch.testing.assert_close(xm.double(), ref_x, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ym.double(), ref_y, atol=1e-6, rtol=1e-6)


def test_same_class_partners_keep_full_weight() -> None:
    x = torch.randn(4, 1, 2, 2)
    y = torch.nn.functional.one_hot(torch.tensor([3, 1, 3, 2]), 4).float()
    _, ym = sum_mix(x, y, [0.5, 0.5])  # rows (0, 2) are both class 3; rows (1, 3) are 1 and 2
    torch.testing.assert_close(ym, torch.tensor([[0, 0, 0, 1.0], [0, 0.5, 0.5, 0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_dtypes(dtype) -> None:
    x, y = _data(8, dtype=dtype)
    xm, _ = sum_mix(x, y, [0.25] * 4)
    assert xm.dtype == dtype
    ref, _ = _loop_mix(x, y, [0.25] * 4, mix_sources(8, 4))
    torch.testing.assert_close(xm.double(), ref, **{k: v for k, v in TOL[dtype].items()})


def test_uint8_input_is_mixed_in_float() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.eye(3).repeat(2, 1)
    xm, _ = sum_mix(x, y, [0.5, 0.5])
    assert xm.dtype == torch.float32
    torch.testing.assert_close(xm, (x[:3].float() + x[3:].float()) / 2)  # 255 + 255 would overflow in uint8
    assert sum_mix(x, y, [0.5, 0.5], out_dtype=torch.float16)[0].dtype == torch.float16


@pytest.mark.parametrize("perm_mode", [False, True])
def test_channels_last_preserved(perm_mode: bool) -> None:
    x, y = _data(8)
    x = x.contiguous(memory_format=torch.channels_last)
    perms = torch.stack([torch.randperm(8)]) if perm_mode else None
    xm, _ = sum_mix(x, y, [0.5, 0.5], perms=perms)
    assert xm.is_contiguous(memory_format=torch.channels_last)


def test_zero_weight_groups_are_not_read() -> None:
    x, y = _data(8)
    x[4:] = float("nan")  # groups 2 and 3 carry NaN: a zero weight times NaN would poison the output
    xm, ym = sum_mix(x, y, [0.6, 0.4, 0.0, 0.0])
    assert torch.isfinite(xm).all()
    torch.testing.assert_close(xm, 0.6 * x[:2] + 0.4 * x[2:4])


def test_drop_remainder() -> None:
    x, y = _data(10)
    xm, _ = sum_mix(x, y, [0.25] * 4, drop_remainder=True)
    assert xm.shape[0] == 2
    torch.testing.assert_close(xm, sum(0.25 * x[g * 2:(g + 1) * 2] for g in range(4)))


@pytest.mark.parametrize("weights,match", [
    ([0.5, 0.4], "sum to 1"),
    ([float("nan"), 1.0], "finite"),
    ([1.5, -0.5], "non-negative"),
    ([], "non-empty"),
    ([[0.5, 0.5]], "1-D"),
])
def test_bad_weights(weights, match) -> None:
    x, y = _data(8)
    with pytest.raises(ValueError, match=match):
        sum_mix(x, y, weights)


def test_bad_shapes_and_types() -> None:
    x, y = _data(10)
    with pytest.raises(ValueError, match="k=4 does not divide the batch size 10"):
        sum_mix(x, y, [0.25] * 4)
    with pytest.raises(ValueError, match="x has 10 rows but y has 9"):
        sum_mix(x, y[:9], [0.5, 0.5])
    with pytest.raises(TypeError, match="soft targets"):
        sum_mix(x, torch.zeros(10, 3, dtype=torch.long), [0.5, 0.5])
    with pytest.raises(ValueError, match=r"perms must have shape \(k - 1, N\) = \(1, 10\)"):
        sum_mix(x, y, [0.5, 0.5], perms=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        sum_mix(x, y, [0.5, 0.5], perms=torch.zeros(1, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least k rows"):
        sum_mix(x[:2], y[:2], [0.25] * 4, drop_remainder=True)
    with pytest.raises(TypeError, match="floating point or uint8"):
        sum_mix(x.long(), y, [0.5, 0.5])
