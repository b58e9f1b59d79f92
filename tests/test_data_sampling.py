"""Pure-Python checks of clip sampling, transforms and the distributed assignment (no shards, no processes)."""

import collections

import numpy as np
import pytest
import torch

from actionrec.data import (
    ClipSpec,
    TrainAugment,
    eval_frame_indices,
    eval_shard_parts,
    normalize_on_device,
    train_frame_indices,
)
from actionrec.data.transforms import eval_views, train_transform


def test_uniform_train_sampling_takes_one_frame_per_segment():
    spec = ClipSpec(num_frames=8, sampling="uniform")
    rng = np.random.default_rng(0)
    for n in (8, 9, 100, 301):
        for _ in range(20):
            indices = train_frame_indices(spec, n, rng)
            segment = n / 8
            assert indices.dtype == np.int64 and indices.shape == (8,)
            assert all(np.floor(t * segment) <= i < np.ceil((t + 1) * segment) for t, i in enumerate(indices))


def test_dense_train_sampling_is_one_strided_window_and_clamps_short_videos():
    spec = ClipSpec(num_frames=4, sampling="dense", frame_stride=3)
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(50):
        indices = train_frame_indices(spec, 40, rng)
        assert np.all(np.diff(indices) == 3) and indices[-1] < 40
        starts.add(int(indices[0]))
    assert len(starts) > 10  # random offsets over the whole valid range
    assert train_frame_indices(spec, 5, rng).tolist() == [0, 3, 4, 4]


def test_eval_views_are_evenly_spaced_deterministic_and_cover_the_video():
    uniform = ClipSpec(num_frames=4, sampling="uniform")
    assert eval_frame_indices(uniform, 40, 0, 1).tolist() == [5, 15, 25, 35]
    assert [eval_frame_indices(uniform, 40, k, 2).tolist() for k in range(2)] == [[2, 12, 22, 32], [7, 17, 27, 37]]
    dense = ClipSpec(num_frames=4, sampling="dense", frame_stride=2)  # window of 7 frames
    assert eval_frame_indices(dense, 47, 0, 1).tolist() == [20, 22, 24, 26]  # centre window
    views = [eval_frame_indices(dense, 47, k, 3).tolist() for k in range(3)]
    assert views == [[0, 2, 4, 6], [20, 22, 24, 26], [40, 42, 44, 46]]  # first to last window
    with pytest.raises(ValueError, match="view 3 out of range"):
        eval_frame_indices(dense, 47, 3, 3)


def test_clip_spec_rejects_bad_values_with_the_field_name():
    with pytest.raises(ValueError, match="sampling"):
        ClipSpec(sampling="random")
    with pytest.raises(ValueError, match="eval_short_side"):
        ClipSpec(size=224, eval_short_side=200)


def _numbered_clip(t=4, h=60, w=90):
    """Pixel (y, x) of every frame holds x so crops can be located."""
    columns = torch.arange(w, dtype=torch.uint8).expand(h, w)
    return columns.expand(t, 3, h, w).clone()


def test_train_transform_crops_within_the_rescaled_frame_and_keeps_uint8():
    clip = _numbered_clip()
    spec = ClipSpec(num_frames=4, size=32)
    rng = np.random.default_rng(0)
    lefts = set()
    for _ in range(30):
        out = train_transform(clip, spec, TrainAugment(short_side_range=(36, 44)), rng)
        assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
        assert torch.equal(out[0], out[3])  # one crop for the whole clip
        lefts.add(int(out[0, 0, 0, 0]))
    assert len(lefts) > 5


def test_hflip_is_off_by_default_and_flips_when_enabled():
    clip = _numbered_clip()
    spec = ClipSpec(num_frames=4, size=32)
    unflipped = [train_transform(clip, spec, TrainAugment(), np.random.default_rng(s)) for s in range(20)]
    assert all(int(c[0, 0, 0, 0]) < int(c[0, 0, 0, -1]) for c in unflipped)
    flipped = [train_transform(clip, spec, TrainAugment(hflip=True), np.random.default_rng(s)) for s in range(20)]
    assert any(int(c[0, 0, 0, 0]) > int(c[0, 0, 0, -1]) for c in flipped)


def test_eval_three_crops_span_the_long_side_and_one_crop_is_centred():
    clip = _numbered_clip(h=32, w=90)
    spec = ClipSpec(num_frames=4, size=32)
    left, centre, right = eval_views(clip, spec, spatial_crops=3)
    assert [int(v[0, 0, 0, 0]) for v in (left, centre, right)] == [0, 29, 58]
    (single,) = eval_views(clip, ClipSpec(num_frames=4, size=28, eval_short_side=32), spatial_crops=1)
    assert single.shape == (4, 3, 28, 28) and abs(int(single[0, 0, 0, 14]) - 45) <= 1


def test_normalize_on_device_gives_float_zero_mean_unit_std_per_channel():
    video = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    out = normalize_on_device(video, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert out.dtype == torch.float32 and out.shape == video.shape
    assert torch.allclose(out, (video.float() / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(video.float())


@pytest.mark.parametrize("num_shards", [1, 3, 7, 100, 511, 512, 1000])
def test_simulated_64_ranks_x_8_workers_evaluate_every_sample_exactly_once(num_shards):
    rng = np.random.default_rng(num_shards)
    samples_per_shard = rng.integers(0, 40, num_shards)
    seen = collections.Counter()
    per_rank = collections.Counter()
    for rank in range(64):
        for worker in range(8):
            for part in eval_shard_parts(num_shards, rank, 64, worker, 8):
                for position in range(samples_per_shard[part.shard]):
                    if part.keeps(position):
                        seen[(part.shard, position)] += 1
                        per_rank[rank] += 1
    expected = {(s, p) for s in range(num_shards) for p in range(samples_per_shard[s])}
    assert set(seen) == expected and set(seen.values()) == {1}
    if num_shards >= 64 * 8:
        assert max(per_rank.values()) <= 2 * np.mean(list(per_rank.values())) + 40


def test_fewer_shards_than_slots_still_gives_every_slot_work():
    busy = [len(eval_shard_parts(3, r, 2, w, 2)) > 0 for r in range(2) for w in range(2)]
    assert all(busy)
