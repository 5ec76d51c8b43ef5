"""Tests for regpipe.engine.bn.clean_bn_statistics (BN re-estimation on clean batches while training on mixed inputs)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regpipe.engine.bn import clean_bn_statistics


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_batches(sizes, channels: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, channels, 5, 4, generator=g) * (1 + i) + 2.0 * i - 1.0 for i, n in enumerate(sizes)]


def stale_bn(channels: int = 3, momentum: float | None = 0.3) -> nn.BatchNorm2d:
    """A BN layer with non-trivial running statistics, affine parameters and momentum."""
    bn = nn.BatchNorm2d(channels, momentum=0.1)
    bn.train()
    with torch.no_grad():
        for x in make_batches([6, 6, 6], channels, seed=99):
            bn(x * 3 + 5)  # "mixed" statistics, far from the clean ones
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-1, 1, channels))
    bn.momentum = momentum
    return bn


def snapshot(model: nn.Module) -> dict:
    return {"state": copy.deepcopy(model.state_dict()),
            "momenta": [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
            "modes": [m.training for m in model.modules()]}


def assert_same(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["momenta"] == before["momenta"]
    assert after["modes"] == before["modes"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        torch.testing.assert_close(after["state"][key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------ statistics inside the block
def test_bn_only_equal_batches_matches_direct_computation() -> None:
    bn = stale_bn()
    batches = make_batches([8, 8, 8, 8])
    with clean_bn_statistics(bn, batches) as model:
        assert model is bn
        assert not bn.training
        everything = torch.cat(batches)
        # Equal batch sizes: the average of per-batch means is the mean over all the data.
        torch.testing.assert_close(bn.running_mean, everything.mean(dim=(0, 2, 3)))
        per_batch_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
        torch.testing.assert_close(bn.running_var, per_batch_var.mean(0))
        assert int(bn.num_batches_tracked) == 4
        # Inference inside uses those statistics.
        x = batches[0][:3]
        expected = ((x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
                    * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))
        with torch.no_grad():
            torch.testing.assert_close(bn(x), expected)


def test_unequal_batches_average_the_per_batch_statistics() -> None:
    bn = stale_bn()
    batches = make_batches([2, 7, 4])
    with clean_bn_statistics(bn, batches):
        means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
        variances = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
        torch.testing.assert_close(bn.running_mean, means.mean(0))
        torch.testing.assert_close(bn.running_var, variances.mean(0))


def test_statistics_do_not_depend_on_previous_running_stats() -> None:
    batches = make_batches([5, 5])
    a, b = stale_bn(momentum=0.3), nn.BatchNorm2d(3)
    with clean_bn_statistics(a, batches), clean_bn_statistics(b, batches):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)


def test_batches_can_be_a_generator_consumed_once() -> None:
    bn = stale_bn()
    batches = make_batches([4, 4, 4])
    with clean_bn_statistics(bn, (b for b in batches)):
        torch.testing.assert_close(bn.running_mean, torch.cat(batches).mean(dim=(0, 2, 3)))


def test_nested_network_matches_manual_forward() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, momentum=0.05))
    model.train()
    with torch.no_grad():
        for x in make_batches([6, 6], seed=5):
            model(x * 4)  # stale statistics
    model.eval()
    batches = make_batches([3, 5, 6], seed=6)
    conv1, bn1, _, conv2, bn2 = model
    # Reference: per batch, the first BN normalises with the batch's own (biased) statistics.
    mean1, var1, mean2, var2 = [], [], [], []
    with torch.no_grad():
        for x in batches:
            h1 = conv1(x)
            mean1.append(h1.mean(dim=(0, 2, 3)))
            var1.append(h1.var(dim=(0, 2, 3), unbiased=True))
            z = F.batch_norm(h1, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps)
            h2 = conv2(torch.relu(z))
            mean2.append(h2.mean(dim=(0, 2, 3)))
            var2.append(h2.var(dim=(0, 2, 3), unbiased=True))
    before = snapshot(model)
    with clean_bn_statistics(model, batches):
        assert all(not m.training for m in model.modules())
        torch.testing.assert_close(bn1.running_mean, torch.stack(mean1).mean(0))
        torch.testing.assert_close(bn1.running_var, torch.stack(var1).mean(0))
        torch.testing.assert_close(bn2.running_mean, torch.stack(mean2).mean(0))
        torch.testing.assert_close(bn2.running_var, torch.stack(var2).mean(0))
        assert int(bn1.num_batches_tracked) == int(bn2.num_batches_tracked) == 3
    assert_same(model, before)


# ------------------------------------------------------------------ restoration on exit
@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("training", [True, False])
def test_buffers_momentum_and_mode_restored(momentum, training: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), stale_bn(momentum=momentum))
    model.train(training)
    before = snapshot(model)
    with clean_bn_statistics(model, make_batches([4, 4])):
        assert not model.training and not model[1].training
        assert not torch.equal(model[1].running_mean, before["state"]["1.running_mean"])
    assert_same(model, before)
    assert model.training is training


def test_restored_after_exception_inside_block() -> None:
    model = nn.Sequential(stale_bn(), nn.ReLU())
    model.train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with clean_bn_statistics(model, make_batches([4, 4])):
            assert not model.training
            raise RuntimeError("boom")
    assert_same(model, before)
    assert model.training


def test_restored_after_exception_while_estimating() -> None:
    model = nn.Sequential(stale_bn())
    model.train()
    before = snapshot(model)

    def batches():
        yield make_batches([4])[0]
        raise KeyError("loader failed")

    with pytest.raises(KeyError, match="loader failed"):
        with clean_bn_statistics(model, batches()):
            pytest.fail("the block must not run")
    assert_same(model, before)


def test_training_after_the_block_continues_as_if_untouched() -> None:
    model_a = nn.Sequential(nn.Conv2d(3, 3, 1), stale_bn(momentum=0.2))
    model_b = copy.deepcopy(model_a)
    model_a.train()
    model_b.train()
    with clean_bn_statistics(model_a, make_batches([4, 4, 4])):
        with torch.no_grad():
            model_a(make_batches([3], seed=3)[0])  # evaluation inside
    x = make_batches([6], seed=4)[0]
    with torch.no_grad():
        model_a(x)
        model_b(x)
    torch.testing.assert_close(model_a.state_dict(), model_b.state_dict(), rtol=0, atol=0)


# ------------------------------------------------------------------ models without BN
def test_model_without_bn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Dropout(0.5), nn.ReLU())
    model.train()
    before = snapshot(model)
    x = make_batches([2])[0]
    calls = []

    def batches():
        calls.append(1)
        yield x

    with clean_bn_statistics(model, batches()) as inner:
        assert inner is model and not model.training and not model[1].training
        with torch.no_grad():
            out = inner(x)  # deterministic: dropout is off in eval mode
            torch.testing.assert_close(out, torch.relu(model[0](x)))
    assert_same(model, before)
    assert model.training


def test_bn_without_running_stats_is_left_alone() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), stale_bn())
    model.train()
    before = snapshot(model)
    batches = make_batches([4, 4])
    with clean_bn_statistics(model, batches):
        assert model[0].running_mean is None
        # The second BN sees the first one's batch-normalised outputs (per batch: mean 0).
        torch.testing.assert_close(model[1].running_mean, torch.zeros(3), atol=1e-6, rtol=0)
    assert_same(model, before)


def test_mixed_submodule_modes_restored() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), stale_bn())
    model.train()
    model[1].eval()  # frozen BN statistics while fine-tuning
    before = snapshot(model)
    with clean_bn_statistics(model, make_batches([4, 4])):
        pass
    assert_same(model, before)
    assert model.training and not model[1].training
