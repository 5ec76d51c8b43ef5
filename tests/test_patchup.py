"""PatchUp (Faramarzi et al. 2020): mask statistics and shapes, mixing and loss against per-sample loops
written from the paper's formulas, the hook's effect on a model, plans, resume, and bad inputs. CPU only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regpipe.core.batch import Batch
from regpipe.functional.patchup import (block_mask, box_holes, cutmix_box, patchup_gamma, patchup_loss,
                                        patchup_mix, patchup_targets, unchanged_fraction)
from regpipe.core.patchup_plan import PatchUpPlan
from regpipe.hooks import PatchUpHook
from regpipe.hooks.patchup import plan_mask
from regpipe.engine.models import preact_resnet_small
from regpipe.ops.patchup import PatchUp

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
LAYERS = {1: "conv1", 2: "layer1", 3: "layer2", 4: "layer3"}


def _batch(n: int = 8, k: int = 4, seed: int = 0, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch.from_labels(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % k, num_classes=k)


def _shape(n: int = 8, size: int = 32) -> Batch:
    """A batch whose only use is its row count and image size (what ``PatchUp.draw`` reads)."""
    return Batch.from_labels(torch.zeros(n, 3, size, size), torch.zeros(n, dtype=torch.int64), num_classes=4)


def _model(k: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return preact_resnet_small(num_classes=k).eval()


# ------------------------------------------------------------------------------- masks (paper eq. 2)


def _naive_block_mask(seeds: torch.Tensor, b: int) -> torch.Tensor:
    """Paint a b x b square for every seed: (b - 1) // 2 rows/cols before it, b // 2 after, clipped."""
    out = torch.zeros_like(seeds)
    *lead, h, w = seeds.shape
    for idx in torch.nonzero(seeds):
        *pre, s, t = idx.tolist()
        out[(*pre, slice(max(0, s - (b - 1) // 2), min(h, s + b // 2 + 1)),
             slice(max(0, t - (b - 1) // 2), min(w, t + b // 2 + 1)))] = 1
    return out


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 3, 7, 11), (2, 10, 5)])
@pytest.mark.parametrize("b", [1, 2, 3, 4, 5])
def test_block_mask_matches_naive_loop(shape: tuple[int, ...], b: int) -> None:
    if b > min(shape[-2:]):
        pytest.skip("block larger than map")
    g = torch.Generator().manual_seed(b)
    seeds = (torch.rand(shape, generator=g) < 0.08).float()
    torch.testing.assert_close(block_mask(seeds, b), _naive_block_mask(seeds, b), atol=0, rtol=0)
    h, w = shape[-2:]  # the DropBlock construction literally: one b x b max-pool, cropped to H x W
    spec = F.max_pool2d(seeds, b, stride=1, padding=b // 2)[..., :h, :w]
    torch.testing.assert_close(block_mask(seeds, b), spec, atol=0, rtol=0)


@pytest.mark.parametrize("b", [3, 4, 5, 6, 7])
@pytest.mark.parametrize("hw", [(16, 16), (12, 20)])
def test_single_seed_gives_square_clipped_at_border(b: int, hw: tuple[int, int]) -> None:
    h, w = hw
    seeds = torch.zeros(1, h, w)
    seeds[0, h // 2, w // 2] = 1
    holes = block_mask(seeds, b)
    rows, cols = torch.nonzero(holes[0], as_tuple=True)
    assert holes.sum() == b * b and rows.max() - rows.min() + 1 == b and cols.max() - cols.min() + 1 == b
    assert rows.min() == h // 2 - (b - 1) // 2 and cols.min() == w // 2 - (b - 1) // 2
    corner = torch.zeros(1, h, w)
    corner[0, 0, w - 1] = 1
    assert block_mask(corner, b).sum() == (b // 2 + 1) * ((b - 1) // 2 + 1)  # clipped above and right


def _expected_altered(p: float, b: int, h: int, w: int) -> float:
    """E[altered fraction] of the clipped max-pool expansion: position (i, j) is altered unless all
    n_i * m_j seeds whose block covers it are 0 (seed s covers rows s - (b-1)//2 .. s + b//2)."""
    def cover(size: int) -> torch.Tensor:
        i = torch.arange(size, dtype=torch.float64)
        return (torch.clamp(i + b // 2, max=size - 1) - torch.clamp(i - (b - 1) // 2, min=0) + 1)
    counts = cover(h)[:, None] * cover(w)[None, :]
    return float((1 - (1 - p) ** counts).mean())


@pytest.mark.parametrize("gamma,b,hw", [(0.75, 7, (32, 32)), (0.5, 5, (16, 16)), (0.6, 4, (12, 20)),
                                        (0.9, 3, (8, 8))])
def test_altered_fraction_matches_gamma_adjustment(gamma: float, b: int, hw: tuple[int, int]) -> None:
    h, w = hw
    p = patchup_gamma(gamma, b, h, w)
    assert p == pytest.approx(gamma / b**2 * h * w / ((h - b + 1) * (w - b + 1)))
    # 4 plans x 64 rows x 8 channels = 2048 independent masks; the per-mask altered fraction has a
    # standard deviation below 0.15, so the mean's is below 0.004: tolerance 0.015 (> 3.5 sigma).
    fractions = []
    for seed in range(4):
        plan = PatchUpPlan(apply=True, layer=1, perm=torch.arange(64), lam=torch.tensor(0.5), mode="soft",
                           block_size=b, gamma=gamma, per_sample=True, mask_seed=seed)
        fractions.append(plan_mask(plan, (64, 8, h, w), "cpu").mean())
    realised = float(torch.stack(fractions).mean())
    assert realised == pytest.approx(_expected_altered(p, b, h, w), abs=0.015)


def test_gamma_errors() -> None:
    with pytest.raises(ValueError, match="1.5"):
        patchup_gamma(1.5, 3, 8, 8)
    with pytest.raises(ValueError, match="gamma"):
        patchup_gamma(0.0, 3, 8, 8)
    with pytest.raises(ValueError, match="gamma"):
        patchup_gamma(float("nan"), 3, 8, 8)
    with pytest.raises(ValueError, match="block_size 7 is larger than the 4x9"):
        patchup_gamma(0.5, 7, 4, 9)
    with pytest.raises(ValueError, match="gamma must be in"):
        PatchUp(gamma=-0.1)


def test_unchanged_is_one_minus_mask_mean() -> None:
    holes = block_mask((torch.rand(5, 3, 9, 9) < 0.05).float(), 3)
    torch.testing.assert_close(unchanged_fraction(holes), 1 - holes.flatten(1).mean(1))
    torch.testing.assert_close(unchanged_fraction(holes[0]), 1 - holes[0].mean())
    model, batch = _model(), _batch()
    batch = PatchUp(candidate_layers=(2,), seed=3)(batch)
    plan = batch.patchup
    hook = PatchUpHook(model, LAYERS)
    hook.forward(batch)
    holes = plan_mask(plan, (8, 16, 32, 32), "cpu")  # layer1's output shape; same plan -> same mask
    torch.testing.assert_close(hook.unchanged, 1 - holes.mean())


# ------------------------------------------------------------------------ mixing and loss (eqs. 3-8)


def _loop_mix(h, holes, perm, lam, mode):
    out = torch.empty_like(h)
    for i in range(h.shape[0]):
        m = holes[i] if holes.dim() == 4 else holes
        li = lam[i] if torch.as_tensor(lam).dim() else lam
        j = int(perm[i])
        unchanged, own, partner = (1 - m) * h[i], m * h[i], m * h[j]
        out[i] = unchanged + partner if mode == "hard" else unchanged + li * own + (1 - li) * partner
    return out


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_mix_against_loop(mode: str, per_sample: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n, c, h, w = 6, 3, 7, 9
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    shape = (n, c, h, w) if per_sample else (c, h, w)
    holes = block_mask((torch.rand(shape, generator=g) < 0.1).double(), 3)
    perm = torch.randperm(n, generator=g)
    lam = torch.rand(n, generator=g, dtype=torch.float64) if per_sample else torch.tensor(0.3, dtype=torch.float64)
    torch.testing.assert_close(patchup_mix(x, holes, perm, lam, mode), _loop_mix(x, holes, perm, lam, mode),
                               **TOL[torch.float64])


def _bce(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def _loop_loss(logits, y, perm, lam, u, mode, kind, a, b):
    """The PatchUp loss (eqs. 6-8) one row at a time: targets from the formulas, l = BCE(softmax) or CE."""
    total = 0.0
    for i in range(logits.shape[0]):
        li = float(lam[i]) if torch.as_tensor(lam).dim() else float(lam)
        ui = float(u[i]) if torch.as_tensor(u).dim() else float(u)
        ci, yi, yj = 1 - ui, y[i], y[int(perm[i])]
        if mode == "hard":
            tb, trw = yj, ui * yi + ci * yj
        else:
            tb, trw = li * yi + (1 - li) * yj, ui * yi + li * ci * yi + (1 - li) * ci * yj
        p = torch.softmax(logits[i], 0)
        ell = (lambda t: _bce(p, t)) if kind == "bce" else (lambda t: -(t * torch.log(p)).sum())
        total = total + a * ell(yi) * ui + ell(tb) * (1 - ui) + b * ell(trw)
    return total / logits.shape[0]


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("kind", ["bce", "ce"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_loss_against_loop(mode: str, kind: str, per_sample: bool) -> None:
    g = torch.Generator().manual_seed(2)
    n, k = 7, 5
    logits = torch.randn(n, k, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.tensor([0, 1, 1, 4, 2, 3, 1]), k).double()  # same-class partners included
    perm = torch.randperm(n, generator=g)
    lam = torch.rand(n, generator=g) if per_sample else torch.tensor(0.35)
    u = torch.rand(n, generator=g) if per_sample else torch.tensor(0.8)
    got = patchup_loss(logits, y, perm, lam, u, mode, kind=kind, loss_alpha=0.7, loss_beta=1.3)
    want = _loop_loss(logits, y, perm, lam, u, mode, kind, 0.7, 1.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if kind == "bce" and not per_sample:  # the official formula with nn.BCELoss
        tb, trw = patchup_targets(y.float(), perm, lam, u, mode)
        p, bce = torch.softmax(logits.float(), 1), nn.BCELoss()
        official = 0.7 * bce(p, y.float()) * u + bce(p, tb) * (1 - u) + 1.3 * bce(p, trw)
        torch.testing.assert_close(got, official.float(), atol=1e-6, rtol=1e-6)
    _, trw = patchup_targets(y, perm, lam, u, mode)
    torch.testing.assert_close(trw.sum(1), torch.ones(n, dtype=torch.float64))


def test_loss_rejects_mismatched_targets() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 5\)"):
        patchup_loss(torch.zeros(4, 3), torch.zeros(4, 5), torch.arange(4), 0.5, 0.5, "soft")
    with pytest.raises(ValueError, match=r"perm must have shape \(4,\)"):
        patchup_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.arange(5), 0.5, 0.5, "soft")
    with pytest.raises(ValueError, match="'medium'"):
        patchup_mix(torch.zeros(2, 1, 3, 3), torch.zeros(1, 3, 3), torch.arange(2), 0.5, "medium")
    hook = PatchUpHook(_model(), LAYERS)
    with pytest.raises(ValueError, match="do not match the batch targets"):
        hook.loss(torch.zeros(8, 3), _batch())


# ------------------------------------------------------------------------------------ hook and op


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_prob_zero_is_exactly_the_plain_forward() -> None:
    model, batch = _model(), _batch()
    plain = model(batch.inputs)
    mixed = PatchUp(mode="hard", patchup_prob=0.0)(batch)
    assert not mixed.patchup.apply
    with PatchUpHook(model, LAYERS) as hook:
        logits = hook.forward(mixed)
        assert torch.equal(logits, plain)
        torch.testing.assert_close(hook.loss(logits, mixed), F.binary_cross_entropy(torch.softmax(plain, 1),
                                                                                    batch.targets))


@pytest.mark.parametrize("layer", [0, 1, 2, 3, 4])
def test_hook_removal_leaves_model_unchanged(layer: int) -> None:
    model, batch = _model(), _batch()
    before = model(batch.inputs)
    hook = PatchUpHook(model, LAYERS)
    b = PatchUp(candidate_layers=(layer,), seed=layer)(batch)
    assert not torch.allclose(hook.forward(b), before)  # it did mix
    assert _no_hooks(model)  # one-shot: nothing registered between steps
    hook.set_plan(b.patchup)
    assert not _no_hooks(model)
    hook.close()
    assert _no_hooks(model) and torch.equal(model(batch.inputs), before)


def test_set_plan_then_model_call_and_loss() -> None:
    model, batch = _model(), _batch()
    b = PatchUp(candidate_layers=(3,), seed=5)(batch)
    hook = PatchUpHook(model, ["conv1", "layer1", "layer2"])  # list -> indices 1..3
    hook.set_plan(b.patchup)
    logits = model(b.inputs)
    torch.testing.assert_close(logits, hook.forward(b))  # same plan, same mask
    assert hook.loss(logits, b, kind="ce").isfinite()
    with pytest.raises(ValueError, match="did not apply"):
        PatchUpHook(model, LAYERS).loss(logits, b)


def test_gradients_reach_layers_before_the_mixing_point() -> None:
    model, batch = _model(), _batch()
    model.train()
    b = PatchUp(mode="soft", candidate_layers=(2,), seed=1)(batch)
    with PatchUpHook(model, LAYERS) as hook:
        hook.loss(hook.forward(b), b).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_layer0_is_cutmix_on_the_inputs() -> None:
    batch, seen = _batch(), []
    model = _model()
    model.conv1.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    plan = PatchUp(candidate_layers=(0,), seed=4)(batch).patchup
    hook = PatchUpHook(model, LAYERS)
    hook.forward(batch.replace(patchup=plan))
    y0, y1, x0, x1 = plan.box.tolist()
    want = batch.inputs.clone()
    want[:, :, y0:y1, x0:x1] = batch.inputs[plan.perm][:, :, y0:y1, x0:x1]
    torch.testing.assert_close(seen[0], want, atol=0, rtol=0)
    assert plan.mode == "hard" and float(plan.lam) == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 32**2)
    torch.testing.assert_close(hook.unchanged, plan.lam)


def test_cutmix_box_clips_and_corrects_lam() -> None:
    box, kept = cutmix_box(32, 32, 0.75, (0, 31))  # sides 16, centred on the corner
    assert box.tolist() == [0, 8, 23, 32] and float(kept) == pytest.approx(1 - 8 * 9 / 1024)
    assert box_holes(box, 32, 32).sum() == 8 * 9


def test_bad_layer_names_sizes_and_plans() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"'layer9'.*conv1"):
        PatchUpHook(model, {1: "conv1", 2: "layer9"})
    with pytest.raises(ValueError, match="larger than the 8x8"):  # block 7 at layer3 is fine, 9 is not
        plan_mask(PatchUp(candidate_layers=(4,), block_sizes={4: 9}).draw(_shape()), (8, 64, 8, 8), "cpu")
    op = PatchUp(candidate_layers=(1,))
    plan = op.draw(_shape(6))
    with pytest.raises(ValueError, match="batch of 6 rows, got a tensor of 8"):
        op.apply(_batch(), plan)
    with pytest.raises(ValueError, match="batch of 6 rows, got a tensor of 8"):
        _batch().replace(patchup=plan)  # a batch never carries a plan for another row count
    hook = PatchUpHook(model, LAYERS)
    hook.set_plan(plan)
    with pytest.raises(ValueError, match="batch of 6 rows, got a tensor of 8"):
        model(_batch().inputs)  # the hook checks the feature map's rows too
    hook.close()
    with pytest.raises(ValueError, match="does not apply"):
        plan_mask(PatchUpPlan.skip(8, "cpu"), (8, 3, 32, 32), "cpu")
    with pytest.raises(TypeError, match="needs a PatchUpPlan, got dict"):
        op.apply(_batch(), {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer 3"):
        PatchUpHook(model, {1: "conv1"}).set_plan(PatchUp(candidate_layers=(3,)).draw(_shape()))


def test_wrapped_model_names_resolve() -> None:
    model, batch = _model(), _batch()
    wrapped = nn.DataParallel(model)  # on CPU it just calls the module
    b = PatchUp(candidate_layers=(1,), seed=2)(batch)
    with PatchUpHook(wrapped, LAYERS) as hook, PatchUpHook(model, LAYERS) as direct:
        torch.testing.assert_close(hook.forward(b), direct.forward(b))
    assert PatchUpHook(wrapped, {1: "module.conv1"}).modules[1] is model.conv1


def test_faithful_defaults_and_per_sample() -> None:
    op = PatchUp(mode="hard", candidate_layers=(1, 2), seed=0)
    assert (op.gamma, op.patchup_prob, op.alpha) == (0.5, 0.7, 2.0)
    plans = [op.draw(_shape()) for _ in range(600)]
    applied = [p for p in plans if p.apply]
    assert len(applied) / len(plans) == pytest.approx(0.7, abs=0.06)
    assert {p.layer for p in applied} == {1, 2}
    lam = torch.stack([p.lam for p in applied])
    assert lam.dim() == 1  # one lam per batch; Beta(2, 2): mean 1/2, variance 1/20
    assert float(lam.mean()) == pytest.approx(0.5, abs=0.03) and float(lam.var()) == pytest.approx(0.05, abs=0.012)
    mask = plan_mask(applied[0], (8, 4, 32, 32), "cpu")
    assert mask.shape == (4, 32, 32) and not torch.equal(mask[0], mask[1])  # independent channels
    per = PatchUp(candidate_layers=(1,), per_sample=True, seed=0).draw(_shape())
    masks = plan_mask(per, (8, 4, 32, 32), "cpu")
    assert per.lam.shape == (8,) and per.lam.unique().numel() == 8
    assert masks.shape == (8, 4, 32, 32) and not torch.equal(masks[0], masks[1])
    box0 = PatchUp(candidate_layers=(0,), per_sample=True, seed=0).draw(_shape())
    assert box0.box.shape == (8, 4) and box0.lam.shape == (8,)


def _same(p: PatchUpPlan, q: PatchUpPlan) -> bool:
    return (p.apply, p.layer, p.mask_seed) == (q.apply, q.layer, q.mask_seed) and torch.equal(p.perm, q.perm) \
        and torch.equal(p.lam, q.lam)


def test_same_seed_same_plan_and_resume() -> None:
    a, b = PatchUp(seed=7), PatchUp(seed=7)
    assert all(_same(a.draw(_shape()), b.draw(_shape())) for _ in range(5))
    assert not _same(PatchUp(seed=8).draw(_shape()), PatchUp(seed=7).draw(_shape()))
    state = a.state_dict()
    expected = [a.draw(_shape()) for _ in range(4)]
    resumed = PatchUp(mode="hard", seed=123)
    resumed.load_state_dict(state)
    assert resumed.mode == "soft" and all(_same(resumed.draw(_shape()), e) for e in expected)
