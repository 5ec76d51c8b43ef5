"""Batch validation and the Sum Augmentation ops (SumMix, GradualSumMix, mix_batch)."""

from __future__ import annotations

import io

import pytest
import torch

from regpipe import Batch, GradualSumMix, MixRecord, SumMix, labels_to_targets, mix_batch
from regpipe.functional import gcc_weights
from regpipe.ops.sum_mix import MixParams


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


# ---------------------------------------------------------------- mix_batch / SumMix


def test_mix_batch_records_the_mix() -> None:
    b = _batch(8)
    out = mix_batch(b, [0.5, 0.5])
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
    params = op.draw(b)
    assert params.weights == (0.25,) * 4 and params.perms is None  # group mode draws nothing
    assert op.apply(b, params).size == 2 and op(b).size == 2
    assert SumMix(groups=1)(b) is b  # nothing to mix
    op.groups = 2  # the cascade changes k between batches
    assert op(b).size == 4 and op.draw(b).k == 2
    with pytest.raises(ValueError, match="groups must be an integer >= 1, got 0"):
        SumMix(groups=0)
    with pytest.raises(ValueError, match="mode must be 'group' or 'permute', got 'pairs'"):
        SumMix(mode="pairs")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs MixParams, got dict"):
        op.apply(b, {"weights": (0.5, 0.5)})  # type: ignore[arg-type]


def test_mix_params_validation() -> None:
    assert MixParams(torch.tensor([0.75, 0.25])).weights == (0.75, 0.25)  # tensors become host floats
    with pytest.raises(ValueError, match="sum to 1"):
        MixParams((0.5, 0.4))
    with pytest.raises(ValueError, match=r"\(k - 1, N\) = \(1, N\) for 2 weights, got shape \(2, 8\)"):
        MixParams((0.5, 0.5), torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64"):
        MixParams((0.5, 0.5), torch.zeros(1, 8, dtype=torch.int32))


def test_permute_mode_is_seeded_and_resumable() -> None:
    b = _batch(9)
    op = SumMix(groups=3, mode="permute", seed=5)
    params = op.draw(b)
    assert params.perms.shape == (2, 9) and params.perms.dtype == torch.int64
    first = op.apply(b, params)
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
        params = op.draw(b)
        out = op.apply(b, params)
        if step < 10:
            torch.testing.assert_close(out.mixing.weights[0], gcc_weights(4, step / 10))
            torch.testing.assert_close(torch.tensor(params.weights, dtype=torch.float32), gcc_weights(4, step / 10))
            assert out.size == 2
        else:
            assert params.weights == (1.0,) and out is b  # clean and whole during the fine-tune
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
    # The weights are in the params, so a replay does not depend on the op's step count.
    op = GradualSumMix(k0=4, gradual_steps=4)
    b = _batch(8)
    op.step()
    params = op.draw(b)
    first = op.apply(b, params)
    op.step()
    assert torch.equal(op.apply(b, params).inputs, first.inputs)
    assert not torch.equal(op(b).inputs, first.inputs)


@pytest.mark.parametrize("kwargs,match", [({"k0": 0}, "k0"), ({"gradual_steps": 0}, "gradual_steps"),
                                          ({"mode": "x"}, "mode")])
def test_gradual_bad_args(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradualSumMix(**kwargs)
