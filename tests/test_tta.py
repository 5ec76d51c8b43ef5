"""Tests for Test-Time Sum Augmentation (Simionescu 2020, section 3.6): regpipe.functional.tta and regpipe.ops.tta."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from torch import nn

from regpipe import Batch, TestTimeSumAugmentation
from regpipe.functional.tta import test_time_sum_predict as tts_predict
from regpipe.ops.tta import TTAParams, draw_partners

C, H, W, K = 2, 3, 3, 5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(C * H * W, 8), nn.Tanh(), nn.Linear(8, K)).eval()


def rand_images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, C, H, W, generator=torch.Generator().manual_seed(seed))


class Recorder(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.model(x)


def naive_predict(model, x, partners, pool=None, weight=1.0) -> torch.Tensor:
    """One mixed input at a time: p(x_i) = mean_j softmax(f((w x_i + sum_r pool[rho_jir]) / (w + k - 1)))."""
    pool = x if pool is None else pool
    draws, n, km1 = partners.shape
    out = torch.zeros(n, K, dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            for j in range(draws):
                mixed = weight * x[i].double()
                for r in range(km1):
                    mixed = mixed + pool[int(partners[j, i, r])].double()
                mixed = mixed / (weight + km1)
                logits = model(mixed.float().unsqueeze(0))[0].double()
                out[i] += torch.exp(logits - torch.logsumexp(logits, 0))
    return (out / draws).float()


# ------------------------------------------------------------------ the pure function vs the naive loop
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("weight", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_predict_matches_naive_loop_batch_partners(k: int, weight: float, chunk_size: int) -> None:
    n, draws = 5, 3  # M * N = 15; chunk 7 does not divide it
    x = rand_images(n, 1)
    partners = draw_partners(draws, n, k, torch.Generator().manual_seed(2))
    model = Recorder(make_model())
    probs = tts_predict(model, x, partners, weight=weight, chunk_size=chunk_size)
    assert probs.shape == (n, K) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, naive_predict(model.model, x, partners, weight=weight))
    torch.testing.assert_close(probs.sum(1), torch.ones(n))
    # Batched forward passes of at most chunk_size rows covering all M * N mixes.
    assert sum(model.sizes) == draws * n
    assert max(model.sizes) <= chunk_size
    assert len(model.sizes) == math.ceil(draws * n / chunk_size)


@pytest.mark.parametrize("k", [2, 3])
def test_predict_with_pool_matches_naive_loop(k: int) -> None:
    n, p, draws = 4, 9, 5  # pool larger than the batch: indices >= n must address the pool
    x, pool = rand_images(n, 3), rand_images(p, 4)
    partners = draw_partners(draws, n, k, torch.Generator().manual_seed(5), pool_size=p)
    partners[0, 0, 0] = p - 1
    model = make_model(1)
    probs = tts_predict(model, x, partners, pool=pool, weight=0.7, chunk_size=6)
    torch.testing.assert_close(probs, naive_predict(model, x, partners, pool=pool, weight=0.7))
    torch.testing.assert_close(probs.sum(1), torch.ones(n))


def test_predict_hand_computed_linear_case() -> None:
    # A model that returns the mean pixel as one logit and 0 as the other: softmax is explicit.
    class MeanLogit(nn.Module):
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([m, torch.zeros_like(m)], 1)

    x = torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 1.0, 3.0)])
    partners = torch.tensor([[[1], [2], [0]], [[2], [0], [1]]])  # (M=2, N=3, 1)
    probs = tts_predict(MeanLogit(), x, partners, weight=2.0, chunk_size=4)
    vals = [0.0, 1.0, 3.0]
    expected = torch.zeros(3, 2)
    for i in range(3):
        for j in range(2):
            m = (2.0 * vals[i] + vals[int(partners[j, i, 0])]) / 3.0
            expected[i] += torch.tensor([1.0, math.exp(-m)]) / (1.0 + math.exp(-m)) / 2
    torch.testing.assert_close(probs, expected)


def test_predict_does_not_modify_inputs_and_no_grad() -> None:
    x, pool = rand_images(4, 6), rand_images(3, 7)
    x0, pool0 = x.clone(), pool.clone()
    partners = torch.randint(0, 3, (2, 4, 2), generator=torch.Generator().manual_seed(0))
    probs = tts_predict(make_model(), x, partners, pool=pool, weight=1.0, chunk_size=3)
    assert torch.equal(x, x0) and torch.equal(pool, pool0)
    assert not probs.requires_grad


# ------------------------------------------------------------------ errors of the pure function
def test_predict_errors() -> None:
    model, x = make_model(), rand_images(4, 0)
    with pytest.raises(ValueError, match=re.escape("got (3, 4)")):
        tts_predict(model, x, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("N=4, got (2, 5, 1)")):
        tts_predict(model, x, torch.zeros(2, 5, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="int32"):
        tts_predict(model, x, torch.zeros(2, 4, 1, dtype=torch.int32))
    too_big = torch.zeros(2, 4, 1, dtype=torch.long)
    too_big[1, 2, 0] = 4
    with pytest.raises(ValueError, match=re.escape("[0, 4), got range [0, 4]")):
        tts_predict(model, x, too_big)
    negative = torch.ones(2, 4, 1, dtype=torch.long)
    negative[0, 0, 0] = -1
    with pytest.raises(ValueError, match=re.escape("[-1, 1]")):
        tts_predict(model, x, negative)
    with pytest.raises(ValueError, match=re.escape("[0, 3), got range [3, 3]")):
        tts_predict(model, x, torch.full((1, 4, 1), 3, dtype=torch.long), pool=rand_images(3, 1))
    with pytest.raises(ValueError, match=re.escape("(0, 4, 1)")):
        tts_predict(model, x, torch.zeros(0, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("(2, 4, 0)")):
        tts_predict(model, x, torch.zeros(2, 4, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be > 0, got 0"):
        tts_predict(model, x, torch.ones(1, 4, 1, dtype=torch.long), weight=0.0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        tts_predict(model, x, torch.ones(1, 4, 1, dtype=torch.long), chunk_size=0)


# ------------------------------------------------------------------ draw_partners
@pytest.mark.parametrize("k", [2, 3])
def test_draw_partners_from_batch_never_self(k: int) -> None:
    n, draws = 5, 2000
    idx = draw_partners(draws, n, k, torch.Generator().manual_seed(11))
    assert idx.shape == (draws, n, k - 1) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    own = torch.arange(n).view(1, n, 1)
    assert not (idx == own).any()
    # Uniform over the n - 1 other rows.
    expected = draws * (k - 1) / (n - 1)
    for i in range(n):
        counts = torch.bincount(idx[:, i].flatten(), minlength=n)
        assert counts[i] == 0
        others = torch.cat([counts[:i], counts[i + 1:]]).double()
        assert ((others - expected).abs() < 0.15 * expected).all(), (i, counts)


def test_draw_partners_two_rows_always_the_other() -> None:
    idx = draw_partners(50, 2, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(idx, torch.tensor([1, 0]).view(1, 2, 1).expand(50, 2, 2))


def test_draw_partners_from_pool_range() -> None:
    n, p, draws = 4, 7, 1000
    idx = draw_partners(draws, n, 3, torch.Generator().manual_seed(1), pool_size=p)
    assert idx.shape == (draws, n, 2)
    assert int(idx.min()) == 0 and int(idx.max()) == p - 1
    counts = torch.bincount(idx.flatten(), minlength=p).double()
    expected = draws * n * 2 / p
    assert ((counts - expected).abs() < 0.1 * expected).all()


def test_draw_partners_errors_and_determinism() -> None:
    with pytest.raises(ValueError, match="got 1"):
        draw_partners(3, 1, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="empty"):
        draw_partners(3, 4, 2, torch.Generator().manual_seed(0), pool_size=0)
    a = draw_partners(6, 5, 3, torch.Generator().manual_seed(42))
    b = draw_partners(6, 5, 3, torch.Generator().manual_seed(42))
    c = draw_partners(6, 5, 3, torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ the op
@pytest.mark.parametrize("use_pool", [False, True])
def test_op_equals_function_with_seeded_partners(use_pool: bool) -> None:
    n, draws, k, seed = 6, 4, 3, 17
    x, pool = rand_images(n, 8), (rand_images(10, 9) if use_pool else None)
    model = make_model(2)
    tta = TestTimeSumAugmentation(k=k, draws=draws, weight=1.5, seed=seed, chunk_size=5)
    probs = tta.predict(model, x, pool=pool)
    partners = draw_partners(draws, n, k, torch.Generator().manual_seed(seed), None if pool is None else 10)
    torch.testing.assert_close(probs, naive_predict(model, x, partners, pool=pool, weight=1.5))
    torch.testing.assert_close(probs.sum(1), torch.ones(n))


def test_op_same_seed_same_output_and_draws_advance() -> None:
    x, model = rand_images(6, 10), make_model(3)
    a, b = TestTimeSumAugmentation(k=2, draws=3, seed=5), TestTimeSumAugmentation(k=2, draws=3, seed=5)
    first_a, first_b = a.predict(model, x), b.predict(model, x)
    torch.testing.assert_close(first_a, first_b, rtol=0, atol=0)
    torch.testing.assert_close(a.predict(model, x), b.predict(model, x), rtol=0, atol=0)
    assert not torch.equal(a.predict(model, x), first_a)  # the generator moves on
    other = TestTimeSumAugmentation(k=2, draws=3, seed=6).predict(model, x)
    assert not torch.equal(other, first_a)


@pytest.mark.parametrize("via_bytes", [False, True])
def test_op_state_dict_resumes_partner_draws(via_bytes: bool) -> None:
    model = make_model(4)
    xs = [rand_images(5, s) for s in range(20, 24)]
    pool = rand_images(8, 30)
    reference = TestTimeSumAugmentation(k=3, draws=4, seed=123)
    uninterrupted = [reference.predict(model, x, pool=pool if i % 2 else None) for i, x in enumerate(xs)]

    first = TestTimeSumAugmentation(k=3, draws=4, seed=123)
    first.predict(model, xs[0])
    first.predict(model, xs[1], pool=pool)
    state = first.state_dict()
    if via_bytes:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=False)
    resumed = TestTimeSumAugmentation(k=3, draws=4, seed=999)
    resumed.load_state_dict(state)
    for i in (2, 3):
        torch.testing.assert_close(resumed.predict(model, xs[i], pool=pool if i % 2 else None),
                                   uninterrupted[i], rtol=0, atol=0)


def test_op_state_dict_before_first_use() -> None:
    model, x = make_model(5), rand_images(4, 40)
    state = TestTimeSumAugmentation(k=2, draws=2, seed=7).state_dict()
    resumed = TestTimeSumAugmentation(k=2, draws=2, seed=0)
    resumed.load_state_dict(state)
    expected = TestTimeSumAugmentation(k=2, draws=2, seed=7).predict(model, x)
    torch.testing.assert_close(resumed.predict(model, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("k, message", [(1, "got 1"), (0, "got 0"), (2.0, "got 2.0"), (True, "got True")])
def test_op_bad_k(k, message) -> None:
    with pytest.raises(ValueError, match=f"k must be an integer >= 2, {re.escape(message)}"):
        TestTimeSumAugmentation(k=k)


@pytest.mark.parametrize("draws, message", [(0, "got 0"), (-3, "got -3"), (1.5, "got 1.5")])
def test_op_bad_draws(draws, message) -> None:
    with pytest.raises(ValueError, match=f"draws must be an integer >= 1, {re.escape(message)}"):
        TestTimeSumAugmentation(draws=draws)


def test_op_single_row_batch_without_pool_errors() -> None:
    with pytest.raises(ValueError, match="got 1"):
        TestTimeSumAugmentation(k=2, draws=2).predict(make_model(), rand_images(1, 0))
    # With a pool one row is fine.
    probs = TestTimeSumAugmentation(k=2, draws=2).predict(make_model(), rand_images(1, 0), pool=rand_images(3, 1))
    torch.testing.assert_close(probs.sum(1), torch.ones(1))


# ------------------------------------------------------------------ the op contract: draw, apply, replay
def as_batch(x: torch.Tensor) -> Batch:
    return Batch.from_labels(x, torch.arange(x.shape[0]) % K, K)


def test_op_draw_then_predict_with_params_replays() -> None:
    x, model = rand_images(6, 50), make_model(6)
    tta = TestTimeSumAugmentation(k=3, draws=4, seed=8)
    params = tta.draw(as_batch(x))
    assert isinstance(params, TTAParams) and params.partners.shape == (4, 6, 2) and params.pool_size is None
    assert (params.draws, params.batch_size, params.k) == (4, 6, 3)
    # Same partners as predict() draws from the same generator state, and replaying them is exact.
    fresh = TestTimeSumAugmentation(k=3, draws=4, seed=8).predict(model, x)
    torch.testing.assert_close(tta.predict(model, x, params), fresh, rtol=0, atol=0)
    torch.testing.assert_close(tta.predict(model, x, params), fresh, rtol=0, atol=0)
    pool = rand_images(9, 51)
    pooled = tta.draw(as_batch(x), pool_size=9)
    assert pooled.pool_size == 9 and int(pooled.partners.max()) < 9
    torch.testing.assert_close(tta.predict(model, x, pooled, pool=pool),
                               naive_predict(model, x, pooled.partners, pool=pool))
    with pytest.raises(ValueError, match="drawn for pool_size=None, got pool_size=9"):
        tta.predict(model, x, params, pool=pool)


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_op_apply_builds_the_mixed_inputs_predict_averages(weight: float) -> None:
    x, model = rand_images(5, 60), make_model(7)
    batch = as_batch(x)
    tta = TestTimeSumAugmentation(k=3, draws=2, weight=weight, seed=1)
    params = tta.draw(batch)
    mixed = tta.apply(batch, params)
    assert mixed.size == 2 * 5 and mixed.mixing.sources.shape == (10, 3)
    for j in range(2):
        for i in range(5):
            row = j * 5 + i
            want = (weight * x[i] + x[params.partners[j, i]].sum(0)) / (weight + 2)
            torch.testing.assert_close(mixed.inputs[row], want)
            assert mixed.mixing.sources[row].tolist() == [i, *params.partners[j, i].tolist()]
    torch.testing.assert_close(mixed.targets.sum(1), torch.ones(10))
    probs = torch.softmax(model(mixed.inputs), 1).view(2, 5, K).mean(0)
    torch.testing.assert_close(tta.predict(model, x, params), probs)  # up to float rounding
    with pytest.raises(ValueError, match="reference pool of 9 rows"):
        tta.apply(batch, tta.draw(batch, pool_size=9))
    with pytest.raises(ValueError, match="drawn for 5 rows, the batch has 4"):
        tta.apply(as_batch(x[:4]), params)


def test_tta_params_validation_and_bad_weight() -> None:
    with pytest.raises(ValueError, match=r"int64 tensor .* got torch.int32 of shape \(2, 4, 1\)"):
        TTAParams.from_partners(torch.zeros(2, 4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        TTAParams.from_partners(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="pool_size must be None or an integer >= 1, got 0"):
        TTAParams.from_partners(torch.zeros(2, 4, 1, dtype=torch.int64), pool_size=0)
    with pytest.raises(ValueError, match="draws must be a positive integer dividing the 8 rows, got 3"):
        TTAParams.uniform(torch.zeros(8, 2, dtype=torch.int64), (0.5, 0.5), draws=3)
    with pytest.raises(ValueError, match="carry the weights .* this op's are"):  # a plan for another weight
        TestTimeSumAugmentation(k=2, draws=1, weight=3.0).apply(
            as_batch(rand_images(4, 1)), TTAParams.from_partners(torch.zeros(1, 4, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="carry the weights .* this op's are"):  # and for its predictions
        TestTimeSumAugmentation(k=2, draws=1, weight=3.0).predict(
            lambda v: v.flatten(1), rand_images(4, 1), TTAParams.from_partners(torch.zeros(1, 4, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="weight must be > 0, got 0"):
        TestTimeSumAugmentation(weight=0)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        TestTimeSumAugmentation(chunk_size=0)


def test_op_state_dict_restores_settings() -> None:
    state = TestTimeSumAugmentation(k=3, draws=5, weight=2.0, seed=4, chunk_size=7).state_dict()
    other = TestTimeSumAugmentation()
    other.load_state_dict(state)
    assert (other.k, other.draws, other.weight, other.chunk_size, other.rng.seed) == (3, 5, 2.0, 7, 4)
