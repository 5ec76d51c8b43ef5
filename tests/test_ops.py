"""Batch validation and the Sum Augmentation ops (SumMix, GradualSumMix, mix_batch)."""

from __future__ import annotations

import io

import pytest
import torch

from regpipe import Batch, GradualSumMix, MixPlan, MixRecord, SumMix, labels_to_targets, mix_batch
from regpipe.functional import gcc_weights, mix_sources


def _batch(n: int = 8, classes: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return Batch.from_labels(x, labels, classes, source_ids=torch.arange(100, 100 + n))


# ---------------------------------------------------------------- Batch


def test_batch_defaults_and_validation() -> None:
    b = _batch()
    torch.testing.assert_close(b.affine, torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(8, 2, 3))
    assert b.mixing is None and b.patchup is None and b.size == 8 and b.num_classes == 4
    with pytest.raises(ValueError, match=r"Batch.inputs must be \(N, C, H, W\), got shape \(8, 3, 4\)"):
        Batch(torch.zeros(8, 3, 4), b.targets, b.source_ids)
    with pytest.raises(ValueError, match="Batch.targets must be"):
        Batch(b.inputs, b.targets[:7], b.source_ids)
    with pytest.raises(TypeError, match="soft targets"):
        Batch(b.inputs, b.targets.long(), b.source_ids)
    with pytest.raises(TypeError, match="int64"):
        Batch(b.inputs, b.targets, b.source_ids.int())
    with pytest.raises(ValueError, match="Batch.affine"):
        Batch(b.inputs, b.targets, b.source_ids, affine=torch.zeros(8, 3, 3))
    with pytest.raises(TypeError, match="floating point or uint8"):
        Batch(b.inputs.long(), b.targets, b.source_ids)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        Batch([1, 2], b.targets, b.source_ids)


def test_labels_to_targets_errors() -> None:
    with pytest.raises(ValueError, match="label 7 is out of range for num_classes=4"):
        labels_to_targets(torch.tensor([0, 7]), 4)
    with pytest.raises(ValueError, match="label -1 is out of range"):
        labels_to_targets(torch.tensor([-1, 2]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        labels_to_targets(torch.tensor([0.0, 1.0]), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_labels_to_targets_equals_one_hot(dtype: torch.dtype, label_dtype: torch.dtype) -> None:
    labels = torch.tensor([3, 0, 9, 3, 1], dtype=label_dtype)
    targets = labels_to_targets(labels, 10, dtype)
    assert targets.dtype == dtype
    torch.testing.assert_close(targets, torch.nn.functional.one_hot(labels.long(), 10).to(dtype), rtol=0, atol=0)
    assert labels_to_targets(labels[:0], 10).shape == (0, 10)


# ---------------------------------------------------------------- mix_batch / SumMix


def test_mix_batch_records_the_mix() -> None:
    b = _batch(8)
    out = mix_batch(b, MixPlan.uniform(mix_sources(8, 2), (0.5, 0.5)))
    assert isinstance(out.mixing, MixRecord)
    assert out.mixing.sources.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert out.mixing.source_ids.tolist() == [[100, 104], [101, 105], [102, 106], [103, 107]]
    torch.testing.assert_close(out.mixing.weights, torch.full((4, 2), 0.5))
    assert out.source_ids.tolist() == [100, 101, 102, 103]
    # the record reproduces the output from the parent batch
    rebuilt = sum(out.mixing.weights[:, g, None, None, None] * b.inputs[out.mixing.sources[:, g]] for g in range(2))
    torch.testing.assert_close(out.inputs, rebuilt)


def test_sum_mix_op_group_and_k_one() -> None:
    b = _batch(8)
    op = SumMix(groups=4)
    plan = op.draw(b)
    assert plan.column_weights == (0.25,) * 4 and plan.sources.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert torch.equal(op.rng.get("cpu").get_state(), torch.Generator().manual_seed(0).get_state())  # drew nothing
    assert op.apply(b, plan).size == 2 and op(b).size == 2
    assert SumMix(groups=1)(b) is b  # nothing to mix
    assert SumMix(groups=1).draw(b).identity
    op.groups = 2  # the cascade changes k between batches
    assert op(b).size == 4 and op.draw(b).k == 2
    with pytest.raises(ValueError, match="groups must be an integer >= 1, got 0"):
        SumMix(groups=0)
    with pytest.raises(ValueError, match="mode must be 'group' or 'permute', got 'pairs'"):
        SumMix(mode="pairs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a MixPlan, got dict"):
        op.apply(b, {"weights": (0.5, 0.5)})  # type: ignore[arg-type]


def test_mix_plan_validation() -> None:
    rows = torch.tensor([[0, 1], [1, 0]])
    assert MixPlan.uniform(rows, (0.75, 0.25)).column_weights == (0.75, 0.25)
    with pytest.raises(ValueError, match="column_weights must be 2 finite non-negative"):
        MixPlan.uniform(rows, (0.5, -0.5))
    with pytest.raises(ValueError, match=r"sources must be an \(N_out, k\) int64"):
        MixPlan(rows.int(), torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"weights must be a floating \(2, 2\)"):
        MixPlan(rows, torch.ones(2, 3))
    with pytest.raises(ValueError, match="groups must be a positive integer dividing the 2"):
        MixPlan.uniform(rows, (0.5, 0.5), groups=3)
    with pytest.raises(ValueError, match="one column of weight 1"):
        MixPlan(rows, torch.ones(2, 2), identity=True)
    with pytest.raises(ValueError, match="reads row 5, outside the batch's 4 rows"):
        mix_batch(_batch(4), MixPlan.uniform(torch.tensor([[0, 5]]), (0.5, 0.5)))


def test_permute_mode_is_seeded_and_resumable() -> None:
    b = _batch(9)
    op = SumMix(groups=3, mode="permute", seed=5)
    plan = op.draw(b)
    assert plan.sources.shape == (9, 3) and plan.sources.dtype == torch.int64
    first = op.apply(b, plan)
    assert first.size == 9
    state = op.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    second = op(b)
    resumed = SumMix(groups=3, mode="permute", seed=0)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    torch.testing.assert_close(resumed(b).inputs, second.inputs)
    torch.testing.assert_close(SumMix(groups=3, mode="permute", seed=5)(b).inputs, first.inputs)
    assert not torch.equal(second.inputs, first.inputs)  # fresh permutations each batch
    # every row is itself plus two partners
    assert (first.mixing.sources[:, 0] == torch.arange(9)).all()
    for g in (1, 2):
        assert sorted(first.mixing.sources[:, g].tolist()) == list(range(9))


# ---------------------------------------------------------------- GradualSumMix


def test_gradual_t_follows_steps_then_fine_tunes_clean() -> None:
    op = GradualSumMix(k0=4, gradual_steps=10)
    b = _batch(8)
    for step in range(12):
        assert op.t == pytest.approx(min(step / 10, 1.0))
        plan = op.draw(b)
        out = op.apply(b, plan)
        if step < 10:
            torch.testing.assert_close(out.mixing.weights[0], gcc_weights(4, step / 10))
            weights = torch.tensor(plan.column_weights, dtype=torch.float32)
            torch.testing.assert_close(weights, gcc_weights(4, step / 10))
            assert out.size == 2
        else:
            assert plan.identity and plan.column_weights == (1.0,) and out is b  # clean and whole (fine-tune)
        op.step()


def test_gradual_state_dict_resume() -> None:
    op = GradualSumMix(k0=3, gradual_steps=7, mode="permute", seed=3)
    b = _batch(6)
    for _ in range(3):
        op(b)
        op.step()
    state = op.state_dict()
    expected = [op(b).inputs for _ in range(1)]
    clone = GradualSumMix(k0=2, gradual_steps=1)
    clone.load_state_dict(state)
    assert (clone.k0, clone.gradual_steps, clone.step_count, clone.mode) == (3, 7, 3, "permute")
    torch.testing.assert_close(clone(b).inputs, expected[0])


def test_params_replay_after_the_schedule_moves() -> None:
    # The weights are in the plan, so a replay does not depend on the op's step count.
    op = GradualSumMix(k0=4, gradual_steps=4)
    b = _batch(8)
    op.step()
    plan = op.draw(b)
    first = op.apply(b, plan)
    op.step()
    assert torch.equal(op.apply(b, plan).inputs, first.inputs)
    assert not torch.equal(op(b).inputs, first.inputs)


@pytest.mark.parametrize("kwargs,match", [({"k0": 0}, "k0"), ({"gradual_steps": 0}, "gradual_steps"),
                                          ({"mode": "x"}, "mode")])
def test_gradual_bad_args(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradualSumMix(**kwargs)
