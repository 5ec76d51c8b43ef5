"""Losses against their formulas, and the model resolver."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from regpipe.functional import interpolated_loss, multi_hot_bce, soft_target_cross_entropy
from regpipe.engine.models import build_model, preact_resnet_small


def test_soft_ce_equals_cross_entropy_for_one_hot_and_formula_for_soft() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.randint(0, 5, (6,), generator=g)
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(labels, 5).float()),
                               F.cross_entropy(logits, labels))
    soft = torch.softmax(torch.randn(6, 5, generator=g), 1)
    expected = sum(-sum(soft[i, c] * math.log(math.exp(logits[i, c]) / sum(math.exp(v) for v in logits[i]))
                        for c in range(5)) for i in range(6)) / 6
    assert float(soft_target_cross_entropy(logits, soft)) == pytest.approx(float(expected), rel=1e-5)


def test_multi_hot_bce_formula() -> None:
    logits = torch.tensor([[0.3, -1.2, 2.0]])
    target = torch.tensor([[0.5, 0.5, 0.0]])  # two classes summed, multi-hot / k
    p = torch.sigmoid(logits)
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(multi_hot_bce(logits, target), expected)


def test_interpolated_loss_matches_soft_ce_of_the_mixed_target() -> None:
    logits = torch.randn(4, 3)
    y_a, y_b = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    mixed = 0.7 * F.one_hot(y_a, 3).float() + 0.3 * F.one_hot(y_b, 3).float()
    torch.testing.assert_close(interpolated_loss(logits, y_a, y_b, 0.7), soft_target_cross_entropy(logits, mixed))


def test_loss_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        soft_target_cross_entropy(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(TypeError, match="soft targets"):
        multi_hot_bce(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long))


def test_models() -> None:
    model = build_model("preact-small", num_classes=7, in_channels=1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert sum(p.numel() for p in preact_resnet_small().parameters()) < 300_000
    assert build_model("regpipe.engine.models:preact_resnet_small", 10, 3)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        build_model("resnet9000", 10, 3)
    with pytest.raises(ValueError, match="cannot load model factory"):
        build_model("regpipe.engine.models:nothing_here", 10, 3)
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        build_model("builtins:dict", 10, 3)
