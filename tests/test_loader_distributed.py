"""Multi-GPU helpers of regpipe.loaders.distributed: ranks from the torchrun environment, DALI shards, FFCV flag,
per-rank seeds."""

from __future__ import annotations

import pytest
import torch

from regpipe.core.batch import Batch
from regpipe.loaders.distributed import dali_shard, ffcv_distributed, ranks, reseed
from regpipe.ops.sum_mix import SumMix

ENV = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}


def test_ranks_and_loader_arguments_from_torchrun_env() -> None:
    assert ranks({}) == ranks({"WORLD_SIZE": "1"}) and ranks({}).world_size == 1
    assert dali_shard(ENV) == {"shard_id": 3, "num_shards": 4, "device_id": 1}
    assert dali_shard({}) == {"shard_id": 0, "num_shards": 1, "device_id": 0}
    assert ffcv_distributed(ENV) == {"distributed": True} and ffcv_distributed({}) == {"distributed": False}


@pytest.mark.parametrize("env, match", [({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4 must be below"),
                                        ({"RANK": "x"}, r"\$RANK must be an integer, got 'x'"),
                                        ({"WORLD_SIZE": "-1"}, r"\$WORLD_SIZE must be >= 0")])
def test_bad_environment_is_named(env, match) -> None:
    with pytest.raises(ValueError, match=match):
        ranks(env)


def test_reseed_gives_rank_0_the_single_process_draws_and_others_their_own() -> None:
    batch = Batch.from_labels(torch.rand(8, 3, 2, 2), torch.arange(8) % 2, 2)
    draws = {}
    for rank in (0, 1):
        op = SumMix(groups=2, mode="permute", seed=11)
        reseed([op], 11, {"RANK": str(rank), "WORLD_SIZE": "2"})
        draws[rank] = op.draw(batch).sources
    assert torch.equal(draws[0], SumMix(groups=2, mode="permute", seed=11).draw(batch).sources)
    assert not torch.equal(draws[0], draws[1])
    with pytest.raises(TypeError, match="object has no per-rank seed"):
        reseed([object()], 0, {})


def test_reseed_sets_the_counter_seed_of_ffcv_operations() -> None:
    pytest.importorskip("ffcv")
    from regpipe.loaders.ffcv import ReplicatedCropDecoder
    from regpipe.ops.augment import Augment, RandomResizedCrop

    dec = ReplicatedCropDecoder(2, Augment([RandomResizedCrop(size=8)]), seed=5)
    reseed([dec], 5, ENV)
    assert dec.seed == 5 + 3 * 1_000_003
