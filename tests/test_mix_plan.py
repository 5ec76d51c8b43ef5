"""Mixing plans: the row tables every mixing op draws (regpipe.functional.partners), their invariants on plain and
replicated batches, and the ops that carry them (groups kept or not, errors named)."""

from __future__ import annotations

import pytest
import torch

from regpipe import Batch, GradualSumMix, MixPlan, SumMix
from regpipe.functional import draw_mix_sources, mix_rows
from regpipe.ops.augment import Augment, RandomFlip, Replicate
from regpipe.ops.cutmix import CutMix, MixUp
from regpipe.ops.tta import TestTimeSumAugmentation

CASES = [(16, 4, 4, "group"), (16, 4, 2, "group"), (8, 2, 8, "group"), (6, 3, 2, "group"), (16, 4, 2, "permute"),
         (5, 4, 3, "permute"), (3, 2, 3, "permute"), (2, 8, 2, "permute")]


def _seeds(table: torch.Tensor, m: int) -> torch.Tensor:
    return table // m


@pytest.mark.parametrize("s, m, k, mode", CASES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replicated_tables_mix_k_different_seeds_copy_by_copy(s: int, m: int, k: int, mode: str, shared: bool,
                                                              seed: int) -> None:
    n = s * m
    table = draw_mix_sources(n, k, mode, torch.Generator().manual_seed(seed), replicas=m, shared=shared)
    n_out = n if mode == "permute" else n // k
    assert table.shape == (n_out, k) and table.dtype == torch.int64
    assert int(table.min()) >= 0 and int(table.max()) < n                       # sources in range
    seeds = _seeds(table, m)
    assert all(len(set(row)) == k for row in seeds.tolist())                    # no row mixes its own seed twice
    copies = table % m
    assert torch.equal(copies, copies[:, :1].expand_as(copies))                # copy j of every seed
    if mode == "permute":
        assert torch.equal(table[:, 0], torch.arange(n))                        # column 0: the row itself
        assert all(sorted(table[:, g].tolist()) == list(range(n)) for g in range(k))
    else:
        assert sorted(table.flatten().tolist()) == list(range(n))               # every row read once
    if shared:  # a group of m output rows: copies 0..m-1 of one seed tuple
        grouped = seeds.view(-1, m, k)
        assert torch.equal(grouped, grouped[:, :1].expand_as(grouped))
        assert torch.equal(copies.view(-1, m, k)[:, :, 0], torch.arange(m).expand(n_out // m, m))


def test_unshared_copies_meet_different_partners() -> None:
    # 64 seeds of 4 copies: one arrangement per copy index, so the copies of a seed rarely share their partners
    table = draw_mix_sources(256, 2, "permute", torch.Generator().manual_seed(0), replicas=4, shared=False)
    partners = _seeds(table, 4)[:, 1].view(64, 4)
    assert (partners == partners[:, :1]).all(1).float().mean() < 0.1


def test_plain_tables_are_the_modes_of_sum_augmentation() -> None:
    g = torch.Generator().manual_seed(3)
    assert draw_mix_sources(6, 3, "group", g).tolist() == [[0, 2, 4], [1, 3, 5]]
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())  # group mode draws nothing
    table = draw_mix_sources(9, 3, "permute", g)
    fresh = torch.Generator().manual_seed(3)
    perms = [torch.randperm(9, generator=fresh) for _ in range(2)]  # MixUp's pairing: one randperm per partner
    assert torch.equal(table, torch.stack([torch.arange(9), *perms], 1))


@pytest.mark.parametrize("n, m, k, mode, match", [
    (24, 4, 4, "group", r"k=4 different seeds per row, so k must divide the number of seeds: the batch of 24 rows "
               r"holds S=6 seeds of m=4"),
    (8, 4, 3, "permute", r"needs at least 3 seeds: the batch of 8 rows holds S=2 seeds of m=4"),
    (10, 4, 2, "group", r"replicas must be a positive integer dividing the 10 rows"),
    (8, 1, 1, "group", r"k >= 2"),
    (8, 1, 2, "pairs", r"mode must be 'group' or 'permute'"),
])
def test_tables_name_what_does_not_fit(n: int, m: int, k: int, mode: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        draw_mix_sources(n, k, mode, torch.Generator(), replicas=m)


def _replicated(s: int = 8, m: int = 4) -> Batch:
    seeds = Batch.from_labels(torch.rand(s, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                              torch.arange(s) % 4, num_classes=4, source_ids=torch.arange(100, 100 + s))
    return Replicate(m, Augment([RandomFlip()], seed=1))(seeds)


@pytest.mark.parametrize("make", [lambda keep: SumMix(2, keep_groups=keep),
                                  lambda keep: SumMix(4, mode="permute", keep_groups=keep),
                                  lambda keep: GradualSumMix(k0=4, gradual_steps=9, keep_groups=keep),
                                  lambda keep: MixUp(keep_groups=keep), lambda keep: CutMix(keep_groups=keep),
                                  lambda keep: CutMix(per_row=True, keep_groups=keep)],
                         ids=["sum-group", "sum-permute", "gradual", "mixup", "cutmix", "cutmix-per-row"])
@pytest.mark.parametrize("keep", [False, True])
def test_ops_keep_the_groups_only_when_asked(make, keep: bool) -> None:
    batch = _replicated()
    assert batch.replicas == 4 and batch.source_ids.view(8, 4).eq(torch.arange(100, 108).view(8, 1)).all()
    out = make(keep)(batch)
    record = out.mixing
    seeds_of = record.source_ids                                                 # (N_out, k) dataset ids
    assert all(len(set(row)) == len(row) for row in seeds_of.tolist())          # k different seeds per row
    assert out.replicas == (4 if keep else 1)
    if keep:  # each output group: m views (copy j) of one mixture, same weights
        grouped = seeds_of.view(-1, 4, seeds_of.shape[1])
        assert torch.equal(grouped, grouped[:, :1].expand_as(grouped))
        weights = record.weights.view(-1, 4, seeds_of.shape[1])
        torch.testing.assert_close(weights, weights[:, :1].expand_as(weights))
        assert torch.equal(record.sources.view(-1, 4, seeds_of.shape[1])[:, :, 0] % 4, torch.arange(4).expand(
            out.size // 4, 4))
    # the record rebuilds the targets from the batch before the mix
    rebuilt = mix_rows(batch.targets, MixPlan(record.sources, record.weights))
    torch.testing.assert_close(out.targets, rebuilt)


def test_tta_partners_avoid_the_rows_own_seed() -> None:
    batch = _replicated(6, 3)
    plan = TestTimeSumAugmentation(k=3, draws=20, seed=0).draw(batch)
    assert plan.sources.shape == (20 * 18, 3) and plan.draws == 20 and plan.batch_size == 18
    own = (plan.sources[:, :1] // 3)
    assert torch.equal(plan.sources[:, 0], torch.arange(18).repeat(20))
    assert not (plan.sources[:, 1:] // 3 == own).any()
    assert int(plan.sources.max()) < 18
