"""Losses against their formulas, and the model resolver."""

from __future__ import annotations

import math
import sys
from pathlib import Path

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


class _TinyNet(torch.nn.Module):
    """What a library's factory returns: a conv stem and a ``num_classes``-way head."""

    def __init__(self, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(in_chans, 4, 3)
        self.head = torch.nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean(dim=(2, 3)))


@pytest.fixture
def fake_model_libraries(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Stand-ins for ``torchvision`` (``torchvision.models.resnet50(num_classes=)``, ``list_models()``) and
    ``timm`` (``create_model(name, pretrained=, num_classes=, in_chans=)``, ``is_model``, ``list_models``)."""
    import types

    calls: dict = {}
    tv, tv_models, timm = (types.ModuleType(n) for n in ("torchvision", "torchvision.models", "timm"))

    def resnet50(num_classes: int = 1000, weights: object = None) -> torch.nn.Module:
        calls["torchvision"] = {"num_classes": num_classes, "weights": weights}
        return _TinyNet(num_classes)

    tv_models.resnet50 = resnet50
    tv_models.list_models = lambda: ["resnet50"]
    tv.models = tv_models

    def create_model(name: str, pretrained: bool = False, num_classes: int = 1000, in_chans: int = 3) -> torch.nn.Module:
        calls["timm"] = {"name": name, "pretrained": pretrained, "num_classes": num_classes, "in_chans": in_chans}
        return _TinyNet(num_classes, in_chans)

    timm.create_model, timm.is_model, timm.list_models = create_model, lambda n: n == "resnet50", lambda: ["resnet50"]
    for name, module in (("torchvision", tv), ("torchvision.models", tv_models), ("timm", timm)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_models_by_library_name(fake_model_libraries: dict) -> None:
    from regpipe.engine.models import check_model_name

    model = build_model("torchvision:resnet50", num_classes=7, in_channels=3)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 7)
    assert fake_model_libraries["torchvision"] == {"num_classes": 7, "weights": None}  # random init, no download
    model = build_model("timm:resnet50", num_classes=5, in_channels=1)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
    assert fake_model_libraries["timm"] == {"name": "resnet50", "pretrained": False, "num_classes": 5, "in_chans": 1}
    check_model_name("timm:resnet50")
    with pytest.raises(ValueError, match="timm has no model 'resnet5000'"):
        build_model("timm:resnet5000", 5, 3)
    with pytest.raises(ValueError, match="torchvision has no model 'vgg99'"):
        check_model_name("torchvision:vgg99")
    with pytest.raises(ValueError, match="takes 3-channel images, the data has 1"):
        build_model("torchvision:resnet50", 5, 1)


def test_missing_model_libraries_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from regpipe.engine.models import check_model_name

    for name in ("torchvision", "torchvision.models", "timm"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"--model timm:resnet50 needs 'timm', which is not installed: pip install timm"):
        check_model_name("timm:resnet50")
    with pytest.raises(ImportError, match="needs 'torchvision.models', which is not installed: pip install torchvision"):
        build_model("torchvision:resnet50", 10, 3)
    with pytest.raises(ImportError, match="needs 'no_such_pkg.models', which is not installed: install its package"):
        build_model("no_such_pkg.models:net", 10, 3)


def test_broken_model_library_is_not_called_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision that is installed but fails to import (built for another torch: its operators are
    missing) is reported with its error, not as "not installed"."""
    from regpipe.engine.models import check_model_name

    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    (package / "models.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("torchvision", "torchvision.models"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for call in (lambda: check_model_name("torchvision:resnet50"), lambda: build_model("torchvision:resnet50", 10, 3)):
        with pytest.raises(ImportError) as info:
            call()
        message = str(info.value)
        assert "installed but failed to import (RuntimeError: operator torchvision::nms does not exist)" in message
        assert "not installed" not in message
        assert isinstance(info.value.__cause__, RuntimeError)


def factory_without_in_channels(num_classes: int) -> torch.nn.Module:
    return _TinyNet(num_classes)


def test_module_factory_gets_in_channels_only_when_it_takes_it() -> None:
    assert build_model(f"{__name__}:factory_without_in_channels", 3, 3)(torch.zeros(1, 3, 8, 8)).shape == (1, 3)
    with pytest.raises(ValueError, match="use 'package.module:factory'"):
        build_model(":x", 3, 3)


def test_train_builds_a_library_model_by_name(fake_model_libraries: dict, fake_dir, tmp_path) -> None:
    from regpipe.cli import main

    assert main(["train", "--recipe", "baseline", "--model", "timm:resnet50", "--data-dir", str(fake_dir),
                 "--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    assert fake_model_libraries["timm"]["num_classes"] == 10 and fake_model_libraries["timm"]["in_chans"] == 3
