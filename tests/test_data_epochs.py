"""The training order as pure functions (no shards, no processes): every clip once per epoch, the same global
batches for every split of a global batch into processes and micro batches, the loss weights of the last batch."""

import collections

import numpy as np
import pytest

from actionrec.data import EpochPlan, MicroBatchLayout, clip_rng


def layouts(global_batch: int):
    """Every (world size, accumulation, per-device batch) with that product, up to 64 processes."""
    for world in range(1, min(global_batch, 64) + 1):
        for accumulation in range(1, global_batch // world + 1):
            if global_batch % (world * accumulation) == 0:
                yield world, accumulation, global_batch // (world * accumulation)


def global_batches(plan: EpochPlan, world: int, accumulation: int, per_device: int, steps: int) -> list[list]:
    """The slots of each of the first `steps` global batches, gathered from every rank's micro batches."""
    out = [[] for _ in range(steps)]
    for rank in range(world):
        layout = MicroBatchLayout(rank, world, per_device, accumulation)
        for micro_batch in range(steps * accumulation):
            step, _, _ = layout.locate(micro_batch)
            out[step].extend(layout.slots(plan, micro_batch))
    return [sorted(slots, key=lambda s: (s.video, s.clip)) for slots in out]


@pytest.mark.parametrize("videos,clips,batch", [(800, 1, 16), (13, 2, 6), (7, 1, 8), (100, 3, 12), (1, 1, 4)])
def test_every_clip_exactly_once_per_epoch_and_padding_only_at_its_end(videos, clips, batch):
    plan = EpochPlan(videos, clips, batch, seed=3)
    for epoch in range(3):
        seen = collections.Counter()
        for b in range(plan.batches_per_epoch):
            slots = plan.slots(epoch * plan.batches_per_epoch + b, 0, batch)
            assert {s.epoch for s in slots} == {epoch}
            real = [s for s in slots if not s.padding]
            assert len(real) == plan.real_clips(b)
            if b < plan.batches_per_epoch - 1:
                assert len(real) == batch  # padding only in the epoch's last batch
            seen.update((s.video, s.clip) for s in real)
        assert seen == collections.Counter({(v, k): 1 for v in range(videos) for k in range(clips)})
    assert plan.padding_per_epoch == plan.batches_per_epoch * batch - videos * clips < batch


@pytest.mark.parametrize("videos,clips,batch", [(50, 1, 12), (17, 2, 8), (5, 1, 16)])
def test_global_batches_are_the_same_for_every_world_size_and_accumulation(videos, clips, batch):
    plan = EpochPlan(videos, clips, batch, seed=0)
    steps = 3 * plan.batches_per_epoch  # three epochs
    reference = global_batches(plan, 1, 1, batch, steps)
    for world, accumulation, per_device in layouts(batch):
        assert global_batches(plan, world, accumulation, per_device, steps) == reference, (world, accumulation)


def test_simulated_64_ranks_cover_each_global_batch_once():
    plan = EpochPlan(9537, 1, 64 * 2 * 4, seed=1)  # a UCF101-sized set on 64 GPUs, 2 micro batches of 4
    places = collections.Counter()
    for rank in range(64):
        layout = MicroBatchLayout(rank, 64, 4, 2)
        for micro_batch in (0, 1, 2 * plan.batches_per_epoch - 2, 2 * plan.batches_per_epoch - 1):
            _, _, first = layout.locate(micro_batch)
            places.update((micro_batch // 2, q) for q in range(first, first + 4))
    assert set(places.values()) == {1} and len(places) == 2 * 512


def test_the_last_batch_weighs_its_real_clips_like_a_full_batch():
    plan = EpochPlan(10, 1, 4, seed=0)  # batches of 4, 4, 2 real clips
    weights = [plan.slot_weight(b) * plan.real_clips(b) for b in range(plan.batches_per_epoch)]
    assert weights == [4.0, 4.0, 4.0]  # the weights of a step's real slots sum to the global batch


def test_orders_differ_between_epochs_and_seeds_and_repeat_for_the_same_pair():
    plan = EpochPlan(1000, 1, 8, seed=0)
    assert not np.array_equal(plan.order(0), plan.order(1))
    assert not np.array_equal(plan.order(0), EpochPlan(1000, 1, 8, seed=1).order(0))
    assert np.array_equal(plan.order(2), EpochPlan(1000, 1, 8, seed=0).order(2))
    assert sorted(plan.order(0)) == list(range(1000))


def test_a_clips_draws_depend_on_seed_epoch_key_and_clip_only():
    draw = lambda *args: clip_rng(*args).random(4).tolist()  # noqa: E731
    assert draw(0, 1, "a/x", 0) == draw(0, 1, "a/x", 0)
    assert len({tuple(draw(*args)) for args in [(0, 1, "a/x", 0), (1, 1, "a/x", 0), (0, 2, "a/x", 0),
                                                  (0, 1, "a/y", 0), (0, 1, "a/x", 1)]}) == 5
