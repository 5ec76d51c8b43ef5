"""Feature tap, invariance loss (Hernández-García et al. 2019) and saliency consistency (Al-afandi et al. 2022)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regpipe import Batch
from regpipe.functional import soft_target_cross_entropy
from regpipe.functional.invariance import depth_weights, invariance_loss
from regpipe.functional.saliency import (
    mixed_saliency_loss,
    normalize_maps,
    reference_rows,
    saliency,
    saliency_consistency_loss,
)
from regpipe.hooks import ConsistencyObjective, FeatureTap, InvarianceLoss, SaliencyLoss
from regpipe.engine.models import preact_resnet_small
from regpipe.ops.augment import Augment, RandomAffine, RandomBrightnessContrast, RandomFlip, Replicate
from regpipe.ops.sum_mix import SumMix


def naive_invariance(acts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The paper's eq. 3 literally: mean pairwise squared distances over D, O(N^2)."""
    a = acts.flatten(1).double()
    d = a.shape[1]

    def mean_pairwise(rows: list[int]) -> torch.Tensor:
        total = sum(((a[k] - a[j]) ** 2).sum() / d for k in rows for j in rows)
        return total / len(rows) ** 2

    seeds = sorted(set(ids.tolist()))
    within = torch.stack([mean_pairwise([r for r in range(len(ids)) if ids[r] == s]) for s in seeds]).mean()
    return within / mean_pairwise(list(range(len(ids))))


@pytest.mark.parametrize("seed", range(5))
def test_invariance_matches_the_pairwise_formula(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 5, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
    ids = torch.repeat_interleave(torch.randperm(100, generator=g)[: len(sizes)], sizes)
    ids = ids[torch.randperm(len(ids), generator=g)]  # rows of a seed need not be contiguous
    acts = torch.randn(len(ids), 3, 2, 2, generator=g)
    torch.testing.assert_close(invariance_loss(acts, ids, eps=0.0).double(), naive_invariance(acts, ids),
                               rtol=1e-5, atol=1e-7)


def test_invariance_does_not_depend_on_batch_size_or_m() -> None:
    g = torch.Generator().manual_seed(0)
    acts, ids = torch.randn(12, 5, generator=g), torch.arange(4).repeat_interleave(3)
    base = invariance_loss(acts, ids)
    torch.testing.assert_close(invariance_loss(torch.cat([acts, acts]), torch.cat([ids, ids])), base)  # batch x2
    torch.testing.assert_close(invariance_loss(acts.repeat_interleave(2, 0), ids.repeat_interleave(2)), base)  # m x2


def test_invariance_extremes_and_half_precision() -> None:
    ids = torch.tensor([0, 0, 1, 1])
    same = torch.tensor([[1.0], [1.0], [3.0], [3.0]])
    assert float(invariance_loss(same, ids)) == 0.0
    assert float(invariance_loss(torch.ones(4, 3), ids)) == 0.0  # zero batch variance: 0, not nan
    spread = torch.tensor([[0.0], [2.0], [0.0], [2.0]])  # every seed spans the whole batch
    assert float(invariance_loss(spread, ids)) == pytest.approx(1.0)
    half = torch.randn(8, 16).half()
    torch.testing.assert_close(invariance_loss(half, torch.arange(8) // 2), invariance_loss(half.float(), torch.arange(8) // 2))


def test_invariance_gradcheck() -> None:
    acts = torch.randn(6, 4, dtype=torch.double, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda a: invariance_loss(a, ids), (acts,))


def test_invariance_of_contiguous_groups_is_that_of_their_ids() -> None:
    # Batch.replicas = m: rows s*m .. s*m + m - 1 are one seed's; grouping by that count reads nothing on the host
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(12, 3, 2, 2, generator=g, requires_grad=True)
    by_count = invariance_loss(acts, 3)
    torch.testing.assert_close(by_count, invariance_loss(acts, torch.arange(4).repeat_interleave(3)))
    torch.testing.assert_close(by_count.double(), naive_invariance(acts.detach(), torch.arange(12) // 3))
    by_count.backward()
    assert acts.grad is not None and torch.isfinite(acts.grad).all()


def test_invariance_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"source ids must be \(4,\)"):
        invariance_loss(torch.randn(4, 2), torch.arange(3))
    with pytest.raises(TypeError, match="integer"):
        invariance_loss(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        invariance_loss(torch.tensor([[float("nan")], [1.0]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="all 3 rows are their own seed"):  # nothing replicated: no loss to measure
        invariance_loss(torch.randn(3, 2), torch.arange(3))
    with pytest.raises(ValueError, match="all 3 rows are their own seed"):
        invariance_loss(torch.randn(3, 2), 1)
    with pytest.raises(ValueError, match="groups=2 must be a positive integer dividing the 3 rows"):
        invariance_loss(torch.randn(3, 2), 2)
    with pytest.raises(TypeError, match="group size"):
        invariance_loss(torch.randn(4, 2), 2.0)  # type: ignore[arg-type]
    with pytest.warns(RuntimeWarning, match="all 4 rows form one group"):  # e.g. 4 seeds mixed 4 at a time
        assert float(invariance_loss(torch.randn(4, 2), 4)) == pytest.approx(1.0)


def test_depth_weights() -> None:
    w = depth_weights(4, alpha=0.1, ratio=10.0)
    assert sum(w) == pytest.approx(0.1)
    assert w[-1] / w[0] == pytest.approx(10.0)
    assert all(b / a == pytest.approx(10 ** (1 / 3)) for a, b in zip(w, w[1:]))
    with pytest.raises(ValueError, match="alpha"):
        depth_weights(2, alpha=1.5)


def test_feature_tap_records_removes_and_sees_through_wrappers() -> None:
    model = preact_resnet_small(num_classes=3)
    x = torch.rand(2, 3, 32, 32)
    for wrapped in (model, nn.DataParallel(model), torch.compile(model, backend="eager")):
        with FeatureTap(wrapped, ["layer2", "module.layer3" if isinstance(wrapped, nn.DataParallel) else "layer3"]) as tap:
            wrapped(x)
            shapes = [tuple(a.shape) for a in tap.outputs().values()]
        assert shapes == [(2, 32, 16, 16), (2, 64, 8, 8)]
    assert not model.layer2._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        FeatureTap(model, ["layer1", "layer9"])
    assert not model.layer1._forward_hooks  # nothing registered when a name is bad
    tap = FeatureTap(model, ["layer1"])
    with pytest.raises(RuntimeError, match="run a forward pass"):
        tap.outputs()
    tap.close()


def test_tapped_features_see_through_wrappers() -> None:
    # SIGN's feature function from a wrapped model: the layer's output (read by a tap) or the inner model's
    # features(); the same activations as on the bare model, and no hook left behind.
    from regpipe.hooks.features import tapped_features

    model = preact_resnet_small(num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = {"layer3": model.layer3(model.layer2(model.layer1(model.conv1(x)))), None: model.features(x)}
    for wrapped in (model, nn.DataParallel(model), torch.compile(model, backend="eager")):
        for layer, expected in want.items():
            with torch.no_grad(), tapped_features(wrapped, layer) as phi:
                torch.testing.assert_close(phi(x), expected, rtol=1e-6, atol=1e-6)
    assert not model.layer3._forward_hooks


def test_invariance_hook_objective() -> None:
    torch.manual_seed(0)
    model = preact_resnet_small(num_classes=3)
    batch = Batch.from_labels(torch.rand(6, 3, 32, 32), torch.arange(6) % 3, 3,
                              source_ids=torch.arange(6) // 2).replace(replicas=2)  # the copies, as declared
    with InvarianceLoss(model, ["layer1", "layer3"], alpha=0.2, ratio=4.0) as hook:
        total = hook(model, batch, soft_target_cross_entropy)
        acts = {}
        with FeatureTap(model, ["layer1", "layer3"]) as tap:
            logits = model(batch.inputs)
            acts = tap.outputs()
        expected = 0.8 * soft_target_cross_entropy(logits, batch.targets) + sum(
            w * invariance_loss(acts[n], batch.source_ids) for w, n in zip(hook.weights, ["layer1", "layer3"]))
        torch.testing.assert_close(total, expected)
        total.backward()
        assert model.conv1.weight.grad is not None
    assert not model.layer1._forward_hooks


def test_saliency_of_a_linear_model_is_its_weight() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(2 * 3 * 3, 4)
    model = nn.Sequential(nn.Flatten(), lin)
    y = torch.tensor([0, 3, 2])
    maps = saliency(model, torch.rand(3, 2, 3, 3), y)
    expected = lin.weight[y].detach().view(3, 2, 3, 3).abs().amax(1)
    torch.testing.assert_close(maps, expected)
    soft = torch.tensor([[0.5, 0.5, 0, 0]] * 3)  # soft targets: gradient of the weighted score
    torch.testing.assert_close(saliency(model, torch.rand(3, 2, 3, 3), soft),
                               (0.5 * (lin.weight[0] + lin.weight[1])).detach().view(2, 3, 3).abs().amax(0).expand(3, 3, 3))


def test_saliency_loss_zero_for_identity_positive_otherwise_and_trains() -> None:
    torch.manual_seed(1)
    model = preact_resnet_small(num_classes=3).eval()  # eval: rows do not interact through BN
    seeds = Batch.from_labels(torch.randn(3, 3, 32, 32), torch.arange(3), 3)
    identity = Replicate(3, Augment([RandomFlip(horizontal=0.0)]))(seeds)
    assert float(SaliencyLoss()(model, identity)) == pytest.approx(0.0, abs=1e-10)
    augmented = Replicate(3, Augment([RandomFlip(1.0), RandomAffine(degrees=20)], seed=2))(seeds)
    loss = SaliencyLoss()(model, augmented)
    assert float(loss) > 1e-4
    loss.backward()  # double backward reaches the weights
    assert model.conv1.weight.grad is not None and float(model.conv1.weight.grad.abs().sum()) > 0


def test_flip_consistency_against_a_manual_computation() -> None:
    torch.manual_seed(2)
    model = preact_resnet_small(num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    batch = Replicate(2, Augment([RandomFlip(1.0)]))(Batch.from_labels(x, torch.tensor([0, 2]), 3))
    maps = saliency(model, batch.inputs, batch.targets)
    got = saliency_consistency_loss(maps, batch.affine, batch.source_ids)
    orig, flipped_back = maps[0::2], maps[1::2].flip(-1)
    expected = (normalize_maps(flipped_back) - normalize_maps(orig)).square().mean()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_reference_rows() -> None:
    assert reference_rows(torch.tensor([5, 5, 7, 5, 7, 9])).tolist() == [0, 0, 2, 0, 2, 5]


def test_mixed_rows_expect_the_mix_of_the_maps() -> None:
    parent_maps = torch.rand(4, 5, 5)
    sources = torch.tensor([[0, 2], [1, 3]])
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    expected = torch.stack([0.5 * parent_maps[0] + 0.5 * parent_maps[2], 0.25 * parent_maps[1] + 0.75 * parent_maps[3]])
    assert float(mixed_saliency_loss(expected * 3.0, parent_maps, sources, weights)) == pytest.approx(0.0, abs=1e-10)
    assert float(mixed_saliency_loss(parent_maps[:2], parent_maps, sources, weights)) > 0
    # through the hook: a SumMix batch needs its parent
    model = preact_resnet_small(num_classes=2).eval()
    parent = Batch.from_labels(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 1, 0]), 2)
    mixed = SumMix(2)(parent)
    with pytest.raises(ValueError, match="parent"):
        SaliencyLoss()(model, mixed)
    assert float(SaliencyLoss()(model, mixed, parent=parent)) > 0


def test_consistency_objective_combines_the_terms() -> None:
    torch.manual_seed(3)
    model = preact_resnet_small(num_classes=3).eval()
    seeds = Batch.from_labels(torch.randn(3, 3, 32, 32), torch.arange(3), 3)
    batch = Replicate(2, Augment([RandomFlip(1.0), RandomBrightnessContrast()], seed=1))(seeds)
    objective = ConsistencyObjective(model, inv_layers=["layer2", "layer3"], alpha=0.5, beta=2.0, gamma=3.0)
    total = objective(model, batch, soft_target_cross_entropy)
    parts = objective.last
    torch.testing.assert_close(total.detach(), 0.5 * parts["class"] + 2.0 * parts["invariance"] + 3.0 * parts["saliency"])
    torch.testing.assert_close(parts["saliency"], SaliencyLoss()(model, batch).detach(), rtol=1e-4, atol=1e-7)
    with InvarianceLoss(model, ["layer2", "layer3"], alpha=1.0) as inv:
        model(batch.inputs)
        torch.testing.assert_close(parts["invariance"], inv.invariance(batch.source_ids).detach())
    total.backward()
    objective.close()
    with pytest.raises(ValueError, match="inv_layers"):
        ConsistencyObjective(model, beta=1.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        ConsistencyObjective(model, gamma=-1.0, beta=0.0)


def test_bad_inputs_name_the_problem() -> None:
    from regpipe.functional.saliency import saliency_from_logits

    model = preact_resnet_small(num_classes=3)
    with pytest.raises(ValueError, match="names repeat"):
        FeatureTap(model, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="at least one module"):
        FeatureTap(model, [])
    with pytest.raises(ValueError, match="ratio"):
        depth_weights(3, ratio=0.0)
    with pytest.raises(ValueError, match=r"floating point \(N, C, H, W\)"):
        saliency(model, torch.rand(3, 32, 32), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="label 5 is out of range for 3 classes"):
        saliency(model, torch.rand(2, 3, 32, 32), torch.tensor([0, 5]))
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="x must require grad"):
        saliency_from_logits(model(x), x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"maps must be \(N, H, W\)"):
        saliency_consistency_loss(torch.rand(2, 1, 4, 4), torch.eye(2, 3).expand(2, 2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="N_out = 3"):
        mixed_saliency_loss(torch.rand(3, 4, 4), torch.rand(4, 4, 4), torch.zeros(2, 2, dtype=torch.long),
                            torch.full((2, 2), 0.5))
