"""The samplers that split one epoch between torchrun ranks: together they form exactly the one-process
batches, disjoint, with or without a resume skip."""

from __future__ import annotations

import pytest

from boxrefiner.features.sources import EpochShuffle, RankShare, Strided, object_batches


def one_process_batches(size: int, batch: int, epoch: int, skip: int = 0) -> list[list[int]]:
    order = EpochShuffle(size, seed=7)
    order.set_epoch(epoch, skip)
    return [list(b) for b in object_batches(size, batch, order)]


def rank_batches(size: int, batch: int, world: int, epoch: int, skip: int = 0) -> list[list[list[int]]]:
    per_rank = []
    for rank in range(world):
        share = RankShare(EpochShuffle(size, seed=7), batch, rank, world)
        share.set_epoch(epoch, skip)
        per_rank.append([list(b) for b in object_batches(size, batch // world, share)])
    return per_rank


@pytest.mark.parametrize(("size", "batch", "world"), [(24, 8, 2), (29, 8, 2), (30, 12, 4), (25, 8, 4), (9, 4, 4)])
@pytest.mark.parametrize("skip_batches", [0, 1])
def test_the_ranks_pieces_of_each_step_make_the_one_process_batch(size, batch, world, skip_batches):
    alone = one_process_batches(size, batch, epoch=3, skip=skip_batches * batch)
    together = rank_batches(size, batch, world, epoch=3, skip=skip_batches * batch)
    steps = {len(b) for b in together}
    assert len(steps) == 1, "every rank must take the same number of steps"
    kept = [b for b in alone if len(b) >= world]  # a last batch smaller than the world is left out
    assert steps == {len(kept)}
    for step, expected in enumerate(kept):
        pieces = [together[rank][step] for rank in range(world)]
        assert all(pieces) and [o for piece in pieces for o in piece] == expected


def test_the_epoch_length_counts_the_full_epoch_not_the_skipped_part():
    share = RankShare(EpochShuffle(29, seed=7), 8, 1, 2)
    full = share.objects_per_epoch
    share.set_epoch(0, skip=16)
    assert share.objects_per_epoch == full == 14 and len(share) == 6  # 4+4+4+2 kept of the epoch; 4+2 left


@pytest.mark.parametrize(("size", "world"), [(8, 2), (3, 4), (10, 3)])
def test_validation_shards_cover_every_object_once(size, world):
    shards = [list(Strided(size, rank, world)) for rank in range(world)]
    assert sorted(o for shard in shards for o in shard) == list(range(size))
    assert [Strided(size, r, world).objects_per_epoch for r in range(world)] == [len(s) for s in shards]
