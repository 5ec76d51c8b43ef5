"""The attacks of regpipe.functional.attacks against independent references.

References: FGSM's step on a linear softmax model is ``eps * sign(W^T (softmax(z) - e_y))`` in closed form;
BIM, MIM and PGD against a per-sample loop written here from the papers' update rules; the projection
invariants on every iterate; accuracy that falls monotonically with eps on a trained tiny model.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from regpipe.functional.attacks import (
    ATTACKS,
    bim,
    default_step_size,
    fgsm,
    iterative_attack,
    mim,
    pgd,
    pixel_eps,
    valid_range,
)

MEAN, STD = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)


def _images(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised images of pixels in [0, 1] (some exactly at 0 and 1, so the range clip matters)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 4, 4, generator=g, dtype=dtype)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0.0, 1.0
    mean = torch.tensor(MEAN, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _bounds(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return valid_range(MEAN, STD, dtype=dtype)


def _linear(seed: int, classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, classes)).double()


def _cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(96, 5)).double().eval()


def test_valid_range_and_pixel_eps_are_the_normalised_images_of_0_1_and_eps() -> None:
    lower, upper = valid_range(MEAN, STD, dtype=torch.float64)
    for c in range(3):
        assert lower[0, c, 0, 0].item() == pytest.approx((0 - MEAN[c]) / STD[c])
        assert upper[0, c, 0, 0].item() == pytest.approx((1 - MEAN[c]) / STD[c])
    eps = pixel_eps(8 / 255, STD, dtype=torch.float64)
    assert eps.flatten().tolist() == pytest.approx([8 / 255 / s for s in STD])


def test_fgsm_on_a_linear_softmax_model_is_the_closed_form_step() -> None:
    model = _linear(0)
    weight = model[1].weight.detach()
    bias = model[1].bias.detach()
    x = _images(6, 1)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    eps = pixel_eps(4 / 255, STD, dtype=torch.float64)
    lower, upper = _bounds()
    # d CE / d x = W^T (softmax(W x + b) - e_y), per row.
    probs = torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)
    grad = ((probs - F.one_hot(y, 4).double()) @ weight).view_as(x)
    expected = torch.clamp(x + eps * grad.sign(), lower, upper)
    torch.testing.assert_close(fgsm(model, x, y, eps, lower=lower, upper=upper), expected, rtol=0, atol=1e-12)


def _reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, steps: int,
               step: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, mu: float | None,
               start: torch.Tensor | None) -> torch.Tensor:
    """The papers' update rules, one sample at a time, with explicit element-wise min/max clipping."""
    out = []
    for i in range(x.shape[0]):
        xi, yi = x[i:i + 1], y[i:i + 1]
        lo, hi = torch.max(xi - eps, lower), torch.min(xi + eps, upper)
        adv = xi.clone() if start is None else torch.min(torch.max(start[i:i + 1], lo), hi)
        g_acc = torch.zeros_like(xi)
        for _ in range(steps):
            leaf = adv.clone().requires_grad_(True)
            loss = F.cross_entropy(model(leaf), yi)
            (g,) = torch.autograd.grad(loss, leaf)
            if mu is not None:
                g_acc = mu * g_acc + g / g.abs().sum()
                g = g_acc
            adv = torch.min(torch.max(adv + step * g.sign(), lo), hi).detach()
        out.append(adv)
    return torch.cat(out)


@pytest.mark.parametrize("attack", ["bim", "mim", "pgd"])
def test_iterative_attacks_equal_a_per_sample_loop(attack: str) -> None:
    model = _cnn(2)
    x = _images(5, 3)
    y = torch.tensor([0, 1, 2, 3, 4])
    eps = pixel_eps(8 / 255, STD, dtype=torch.float64)
    step = pixel_eps(2 / 255, STD, dtype=torch.float64)
    lower, upper = _bounds()
    start = None
    if attack == "pgd":
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        start = x + (2 * u - 1) * eps
        ours = pgd(model, x, y, eps, 6, step, lower=lower, upper=upper, generator=torch.Generator().manual_seed(7))
    elif attack == "mim":
        ours = mim(model, x, y, eps, 6, step, lower=lower, upper=upper, momentum=0.9)
    else:
        ours = bim(model, x, y, eps, 6, step, lower=lower, upper=upper)
    expected = _reference(model, x, y, eps, 6, step, lower, upper, 0.9 if attack == "mim" else None, start)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_iterate_stays_in_the_ball_and_the_valid_range(attack: str) -> None:
    model = _cnn(4)
    seen: list[torch.Tensor] = []

    def recording(inputs: torch.Tensor) -> torch.Tensor:
        seen.append(inputs.detach().clone())
        return model(inputs)

    x = _images(8, 5)
    y = torch.arange(8) % 5
    eps = pixel_eps(16 / 255, STD, dtype=torch.float64)
    lower, upper = _bounds()
    out = iterative_attack(recording, x, y, eps, 1 if attack == "fgsm" else 7, eps / 3, lower=lower, upper=upper,
                           momentum=1.0 if attack == "mim" else None, random_start=attack == "pgd",
                           generator=torch.Generator().manual_seed(0))
    assert len(seen) == (1 if attack == "fgsm" else 7)
    for it in [*seen, out]:
        assert bool(((it - x).abs() <= eps + 1e-12).all())
        assert bool((it >= lower - 1e-12).all() & (it <= upper + 1e-12).all())
    assert not torch.equal(out, x)


def test_eps_zero_returns_the_inputs_and_mim_without_momentum_is_bim() -> None:
    model, x, y = _cnn(6), _images(4, 6), torch.tensor([0, 1, 2, 3])
    lower, upper = _bounds()
    for name in ATTACKS:
        out = iterative_attack(model, x, y, 0.0, 3, 0.1, lower=lower, upper=upper, random_start=name == "pgd",
                               generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, x)
    eps, step = pixel_eps(8 / 255, STD, dtype=torch.float64), pixel_eps(2 / 255, STD, dtype=torch.float64)
    torch.testing.assert_close(mim(model, x, y, eps, 5, step, lower=lower, upper=upper, momentum=0.0),
                               bim(model, x, y, eps, 5, step, lower=lower, upper=upper), rtol=0, atol=0)


def test_pgd_start_is_replayed_from_the_generator_seed() -> None:
    model, x, y = _cnn(8), _images(4, 8), torch.tensor([4, 3, 2, 1])
    lower, upper = _bounds()
    eps, step = pixel_eps(8 / 255, STD, dtype=torch.float64), pixel_eps(2 / 255, STD, dtype=torch.float64)

    def run(seed: int) -> torch.Tensor:
        return pgd(model, x, y, eps, 1, step, lower=lower, upper=upper, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@functools.lru_cache(maxsize=1)
def _trained_tiny_model() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small MLP trained to ~100 % on 3 separable classes of 3x4x4 images (pixel means 0.25, 0.5, 0.75)."""
    g = torch.Generator().manual_seed(11)
    labels = torch.arange(300) % 3
    pixels = (0.25 + 0.25 * labels.view(-1, 1, 1, 1) + 0.08 * torch.randn(300, 3, 4, 4, generator=g)).clamp(0, 1)
    x = ((pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).float()
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[:200]), labels[:200]).backward()
        opt.step()
    return model.eval(), x[200:], labels[200:]


@pytest.mark.parametrize("attack", ATTACKS)
def test_accuracy_falls_monotonically_with_eps_on_a_trained_model(attack: str) -> None:
    model, x, y = _trained_tiny_model()
    lower, upper = valid_range(MEAN, STD)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.95
    accuracies = []
    for eps_px in (0.0, 0.02, 0.05, 0.1, 0.2):
        eps = pixel_eps(eps_px, STD)
        step = pixel_eps(default_step_size(attack, eps_px, 10), STD)
        adv = iterative_attack(model, x, y, eps, 1 if attack == "fgsm" else 10, step, lower=lower, upper=upper,
                               momentum=1.0 if attack == "mim" else None, random_start=attack == "pgd",
                               generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            accuracies.append((model(adv).argmax(1) == y).float().mean().item())
    assert accuracies[0] == clean
    assert all(a >= b for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] < 0.5 * clean, accuracies  # the classes are 0.25 apart: eps 0.2 breaks most of them


@pytest.mark.parametrize("kwargs, fragment", [
    ({"eps": -0.1}, "eps must be finite and >= 0"),
    ({"eps": float("nan")}, "eps must be finite and >= 0"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"step_size": float("inf")}, "step_size must be finite"),
    ({"momentum": -1.0}, "momentum must be a finite number >= 0"),
    ({"random_start": True, "generator": None}, "random_start needs a torch.Generator"),
    ({"y": torch.zeros(3)}, "y must be (3,) integer labels"),
    ({"lower": 1.0, "upper": 0.0}, "lower must be < upper"),
])
def test_bad_arguments_are_named_before_any_forward(kwargs: dict, fragment: str) -> None:
    calls = []

    def model(inputs: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return inputs.flatten(1)[:, :2]

    args = {"x": torch.zeros(3, 1, 2, 2), "y": torch.zeros(3, dtype=torch.int64), "eps": 0.1, "steps": 2,
            "step_size": 0.05, "lower": -1.0, "upper": 1.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=fragment.replace("(", r"\(").replace(")", r"\)")):
        iterative_attack(model, args.pop("x"), args.pop("y"), args.pop("eps"), args.pop("steps"),
                         args.pop("step_size"), **args)
    assert not calls


def test_default_step_sizes_and_unknown_attack() -> None:
    assert default_step_size("fgsm", 0.03, 10) == 0.03
    assert default_step_size("bim", 0.03, 10) == pytest.approx(0.003)
    assert default_step_size("mim", 0.03, 10) == pytest.approx(0.003)
    assert default_step_size("pgd", 0.03, 10) == pytest.approx(0.0075)
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        default_step_size("cw", 0.03, 10)


def test_docstring_examples_run() -> None:
    import doctest

    import regpipe.functional.attacks as module

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
