"""The streaming loader on real shards packed by the packer (H.264 mp4 and jpg samples, shard format v1)."""

import collections
import functools
import http.server
import io
import logging
import shutil
import threading
import time

import av
import numpy as np
import psutil
import pytest
import torch

from actionrec.data import (
    ClipSpec,
    ShardSet,
    TrainAugment,
    build_eval_loader,
    build_train_loader,
    eval_frame_indices,
)
from actionrec.data.decode import PyAVFrameReader, TorchCodecFrameReader, torchcodec_load_error
from tests.data_shard_fixtures import (
    corrupt_samples,
    index_from_pixels,
    make_videos,
    pack_test_shards,
    replicate_shards,
)

CLASSES = ["archery", "bowling", "cycling"]
CLIP = ClipSpec(num_frames=4, size=32)
FRAME_COUNTS = [20, 33, 47, 61, 75]


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """mp4 shards (one video per shard), the val split as jpg shards, and a copy with corrupt samples."""
    root = tmp_path_factory.mktemp("shards")
    train = make_videos(CLASSES, 4, FRAME_COUNTS, "train")
    val = make_videos(CLASSES, 2, FRAME_COUNTS, "val", offset=50)
    sources = root / "sources"
    pack_test_shards(root / "mp4", train + val, shard_bytes=1024, sources=sources)
    pack_test_shards(root / "jpg", val, fmt="jpg", sources=sources)
    shutil.copytree(root / "mp4", root / "corrupt")
    damage = {train[1].key: "garbage_mp4", train[6].key: "truncated_mp4", val[0].key: "no_cls",
              val[3].key: "bad_label", val[4].key: "garbage_mp4"}
    corrupt_samples(root / "corrupt", damage)
    return {"root": root, "frames": {v.key: v.num_frames for v in train + val}, "val_keys": [v.key for v in val],
            "frames_train_keys": [v.key for v in train],
            "corrupt_val_keys": {v.key for v in val if v.key in damage}}


@pytest.fixture(scope="module")
def two_class_corrupt(tmp_path_factory):
    """2 classes x 4 training videos in one shard each, two of them garbage mp4 bytes."""
    root = tmp_path_factory.mktemp("two_class")
    train = make_videos(["archery", "bowling"], 4, FRAME_COUNTS, "train")
    pack_test_shards(root / "shards", train, shard_bytes=1024)
    corrupt_samples(root / "shards", {train[1].key: "garbage_mp4", train[6].key: "garbage_mp4"})
    return root / "shards"


def _collect(loader):
    return [batch for batch in loader]


def _signature(batches):
    """What a training step sees of each batch: samples, clip of the sample, frames, pixels, skipped count."""
    return [(b["key"], b["view"].tolist(), b["frame_index"].tolist(), b["video"].sum().item(), int(b["skipped"]))
            for b in batches]


def test_train_batches_have_contract_shapes_and_the_sampled_frames(shard_sets):
    loader = build_train_loader(shard_sets["root"] / "mp4", clip=CLIP, batch_size=3, num_workers=2,
                                seed=0, rank=0, world_size=1)
    batches = _collect(loader)
    assert len(batches) == len(loader) == 4  # 12 training videos, 3 a batch: one epoch
    assert sorted(k for b in batches for k in b["key"]) == sorted(shard_sets["frames_train_keys"])
    for batch in batches:
        assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 3, 4, 32, 32)
        assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= {0, 1, 2}
        assert int(batch["skipped"]) == 0 and batch["weight"].tolist() == [1.0, 1.0, 1.0]
        for video, key, indices in zip(batch["video"], batch["key"], batch["frame_index"]):
            n = shard_sets["frames"][key]
            # the pixels say which frames were decoded: exactly the sampled ones, one per TSN segment
            assert index_from_pixels(video) == indices.tolist()
            assert all(int(t * n / 4) <= i < (t + 1) * n / 4 + 1 for t, i in enumerate(indices.tolist()))


def test_eval_multiview_yields_every_video_view_once_with_evenly_spaced_frames(shard_sets):
    loader = build_eval_loader(shard_sets["root"] / "mp4", clip=CLIP, batch_size=4, num_workers=2,
                               temporal_clips=2, spatial_crops=3, rank=0, world_size=1)
    seen = collections.Counter()
    for batch in loader:
        for video, key, view, indices in zip(batch["video"], batch["key"], batch["view"].tolist(), batch["frame_index"]):
            seen[(key, view)] += 1
            expected = eval_frame_indices(CLIP, shard_sets["frames"][key], view // 3, 2).tolist()
            assert indices.tolist() == expected and index_from_pixels(video) == expected
    assert seen == collections.Counter({(k, v): 1 for k in shard_sets["val_keys"] for v in range(6)})


def test_dense_eval_clips_hold_strided_frames_from_evenly_spaced_windows(shard_sets):
    dense = ClipSpec(num_frames=4, sampling="dense", frame_stride=3, size=32)
    loader = build_eval_loader(shard_sets["root"] / "mp4", clip=dense, batch_size=6, num_workers=0,
                               temporal_clips=3, rank=0, world_size=1)
    for batch in loader:
        for video, key, view in zip(batch["video"], batch["key"], batch["view"].tolist()):
            expected = eval_frame_indices(dense, shard_sets["frames"][key], view, 3).tolist()
            assert index_from_pixels(video) == expected and expected[1] - expected[0] == 3


def test_jpg_shards_decode_the_same_frames_as_mp4_shards(shard_sets):
    def views(fmt):
        loader = build_eval_loader(shard_sets["root"] / fmt, clip=CLIP, batch_size=5, num_workers=0, rank=0, world_size=1)
        return {key: index_from_pixels(video) for b in loader for key, video in zip(b["key"], b["video"])}

    jpg, mp4 = views("jpg"), views("mp4")
    assert jpg == mp4 and len(jpg) == len(shard_sets["val_keys"])


def _noisy_video(num_frames=70, gop=12):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "28", "preset": "veryfast"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_gop_skipping_decode_matches_decoding_every_frame_and_torchcodec():
    data = _noisy_video()
    with av.open(io.BytesIO(data)) as container:
        every_frame = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])
    every_frame = every_frame.permute(0, 3, 1, 2)  # (N, 3, H, W)
    index_sets = [[0], [69], [5, 6, 7], [11, 12], [3, 30, 31, 68], [40, 10, 10, 55], list(range(0, 70, 9))]
    for indices in index_sets:
        reader = PyAVFrameReader(data)
        assert reader.num_frames == 70
        assert torch.equal(reader.read(indices), every_frame[indices]), indices
    if torchcodec_load_error() is not None:
        pytest.skip(f"torchcodec does not load here: {torchcodec_load_error()}")
    for indices in index_sets:
        assert torch.equal(TorchCodecFrameReader(data).read(indices), every_frame[indices]), indices


@pytest.mark.skipif(torchcodec_load_error() is not None, reason="torchcodec's FFmpeg libraries do not load here")
def test_pyav_and_torchcodec_loaders_give_identical_batches(shard_sets):
    def run(decoder):
        loader = build_train_loader(shard_sets["root"] / "mp4", clip=CLIP, batch_size=4, num_workers=0,
                                    batches_per_pass=3, seed=5, rank=0, world_size=1, decoder=decoder)
        return _collect(loader)

    for a, b in zip(run("pyav"), run("torchcodec"), strict=True):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])


@pytest.mark.parametrize("clips_per_video", [1, 3])
def test_train_is_deterministic_resumable_and_differs_across_ranks_epochs_and_seeds(shard_sets, clips_per_video):
    def loader(**kw):
        args = dict(clip=CLIP, batch_size=2, num_workers=2, seed=0, rank=0, world_size=2,
                    augment=TrainAugment(short_side_range=(36, 40), hflip=True, color_jitter=0.2),
                    clips_per_video=clips_per_video)
        return build_train_loader(shard_sets["root"] / "mp4", **(args | kw))

    signature = _signature
    per_epoch = 12 * clips_per_video // (2 * 2)  # 12 videos x K clips over 2 ranks x 2 clips

    first = loader()
    epoch0, epoch1 = signature(_collect(first)), signature(_collect(first))
    assert len(epoch0) == len(epoch1) == per_epoch and first.epoch == 2
    assert signature(_collect(loader())) == epoch0  # same seed, rank, epoch -> same batches
    assert epoch1 != epoch0
    resumed = loader(start_batch=per_epoch + 2)  # epoch 1, batch 2: nothing before it is read
    assert len(resumed) == per_epoch - 2 and signature(_collect(resumed)) == epoch1[2:]
    assert len(resumed) == per_epoch and resumed.epoch == 2
    assert signature(_collect(loader(rank=1))) != epoch0
    assert signature(_collect(loader(seed=1))) != epoch0


@pytest.mark.parametrize("clips_per_video, num_workers", [(1, 2), (2, 2), (3, 1), (1, 0)])
def test_corrupt_videos_keep_their_slots_and_resume_is_exact_after_them(two_class_corrupt, clips_per_video, num_workers):
    """A corrupt video is consumed without giving a clip: its slots stay in the batch with weight 0 (no other
    video drawn in its place), and resuming at any batch gives exactly the uninterrupted run's batches."""
    def loader(**kw):
        return build_train_loader(two_class_corrupt, clip=CLIP, batch_size=2, num_workers=num_workers,
                                  seed=0, rank=0, world_size=1, clips_per_video=clips_per_video,
                                  augment=TrainAugment(short_side_range=(36, 40), hflip=True), **kw)

    batches = _collect(loader())
    assert len(batches) == 8 * clips_per_video // 2 and all(len(b["key"]) == 2 for b in batches)
    trained = collections.Counter((k, v) for b in batches for k, v, w in zip(b["key"], b["view"].tolist(),
                                                                               b["weight"].tolist()) if w > 0)
    corrupt = {key for b in batches for key, _ in b["skipped_clips"]}
    assert len(corrupt) == 2 and not corrupt & {k for k, _ in trained}
    assert set(trained.values()) == {1} and len(trained) == 6 * clips_per_video  # the 6 good videos, once each
    assert sum(int(b["skipped"]) for b in batches) == 2
    reference = _signature(batches)
    first_bad = next(i for i, b in enumerate(batches) if int(b["skipped"]))
    for start in sorted({min(first_bad + 1, len(batches) - 1), len(batches) - 1}):  # resumes after a corrupt video
        assert _signature(_collect(loader(start_batch=start))) == reference[start:], start


def test_several_clips_per_video_come_from_one_decode_with_their_own_frames_and_crops(shard_sets):
    loader = build_train_loader(shard_sets["root"] / "mp4", clip=CLIP, batch_size=6, num_workers=0,
                                batches_per_pass=4, seed=3, rank=0, world_size=1, clips_per_video=3,
                                augment=TrainAugment(short_side_range=(36, 48)))
    assert len(build_train_loader(shard_sets["root"] / "mp4", clip=CLIP, batch_size=6, num_workers=0, rank=0,
                                  world_size=1, clips_per_video=3)) == 12 * 3 // 6  # an epoch: every video once
    differing = 0
    for batch in loader:
        assert batch["video"].shape == (6, 3, 4, 32, 32) and batch["view"].tolist() == [0, 1, 2, 0, 1, 2]
        for video, indices in zip(batch["video"], batch["frame_index"]):
            assert index_from_pixels(video) == indices.tolist()  # each clip holds its own sampled frames
        for first in (0, 3):  # the 3 clips of one video: same key and label, sampled independently
            keys, labels = batch["key"][first : first + 3], batch["label"][first : first + 3]
            assert len(set(keys)) == 1 and len(set(labels.tolist())) == 1
            clips = batch["frame_index"][first : first + 3]
            differing += not (torch.equal(clips[0], clips[1]) and torch.equal(clips[1], clips[2]))
    assert differing >= 6  # of 8 videos: frames are drawn per clip, not shared


def test_one_shard_of_one_video_on_4_ranks_x_2_workers_trains_it_once_per_epoch(shard_sets):
    one_shard = ShardSet.open(shard_sets["root"] / "mp4").urls("train")[:1]  # one video
    seen = collections.Counter()
    for rank in range(4):
        loader = build_train_loader(one_shard, clip=CLIP, batch_size=2, num_workers=2, rank=rank, world_size=4)
        for epoch in range(2):
            batches = _collect(loader)
            assert len(batches) == 1  # one global batch of 8 slots: 1 clip and 7 padding slots
            seen.update((epoch, k) for b in batches for k, w in zip(b["key"], b["weight"].tolist()) if w > 0)
    assert list(seen.values()) == [1, 1] and {epoch for epoch, _ in seen} == {0, 1}


def test_corrupt_samples_are_skipped_counted_and_logged(shard_sets, caplog):
    source = shard_sets["root"] / "corrupt"
    with caplog.at_level(logging.WARNING, logger="actionrec.data"):
        loader = build_eval_loader(source, clip=CLIP, batch_size=2, num_workers=0, rank=0, world_size=1)
        batches = _collect(loader)
    keys = [k for b in batches for k in b["key"]]
    corrupt = shard_sets["corrupt_val_keys"]
    assert sorted(keys) == sorted(set(shard_sets["val_keys"]) - corrupt)
    assert sum(int(b["skipped"]) for b in batches) == loader.skipped_in_last_pass == len(corrupt)
    logged = [r.getMessage() for r in caplog.records if "skipping corrupt sample" in r.getMessage()]
    assert len(logged) == len(corrupt) and all(any(k in line for line in logged) for k in corrupt)
    assert any("no cls field" in line for line in logged) and any("outside the 3 classes" in line for line in logged)

    train = build_train_loader(source, clip=CLIP, batch_size=3, num_workers=2, seed=2, rank=0, world_size=1)
    train_batches = _collect(train)
    assert len(train_batches) == 4 and all(len(b["key"]) == 3 for b in train_batches)
    bad = {k for b in train_batches for k, _ in b["skipped_clips"]}
    assert bad and sum(int(b["skipped"]) for b in train_batches) == len(bad)
    assert all(w == 0 for b in train_batches for k, w in zip(b["key"], b["weight"].tolist()) if not k)


def _peak_pss_growth(source, batches):
    """Peak proportional set size of this process and its loader worker over one pass (polled every 10 ms),
    minus this process's PSS before the pass: what the loader holds, tensors and C heap included."""
    me = psutil.Process()
    before = me.memory_full_info().pss
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in [me, *me.children(recursive=True)]))
            except psutil.Error:  # a worker that just exited
                pass
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        loader = build_train_loader(source, clip=CLIP, batch_size=2, num_workers=1, batches_per_pass=batches,
                                    rank=0, world_size=1)
        for _ in loader:
            time.sleep(0.01)  # let the poller see the worker mid-pass
    finally:
        done.set()
        poller.join()
    return peak[0] - before


def test_memory_is_bounded_by_a_batch_not_the_data_set(shard_sets, tmp_path):
    # 2 MB of padding per sample makes the data set, not the processes' code, the thing that would show:
    # 12 vs 120 samples, 24 vs 240 MB. A loader that reads the samples of its batches only grows the same;
    # one holding the data set would grow by 216 MB more.
    small = replicate_shards(shard_sets["root"] / "mp4", tmp_path / "small", copies=1, pad_bytes=2 * 2**20)
    large = replicate_shards(shard_sets["root"] / "mp4", tmp_path / "large", copies=10, pad_bytes=2 * 2**20)
    data_growth = sum(f.stat().st_size for f in large.glob("*.tar")) - sum(f.stat().st_size for f in small.glob("*.tar"))
    growth_small = _peak_pss_growth(small, batches=6)
    growth_large = _peak_pss_growth(large, batches=60)
    print(f"PSS growth: {growth_small / 2**20:.1f} MiB over 12 samples, {growth_large / 2**20:.1f} MiB over 120")
    assert growth_large - growth_small < data_growth / 4, (growth_small / 2**20, growth_large / 2**20)


def test_shardset_opens_directories_manifests_patterns_lists_and_pipe_urls(shard_sets):
    root = shard_sets["root"] / "mp4"
    by_dir = ShardSet.open(root)
    assert by_dir.classes == CLASSES and by_dir.num_samples("val") == 6 and len(by_dir.urls("train")) == 12
    assert ShardSet.open(root / "dataset.json").urls("val") == by_dir.urls("val")
    pattern = ShardSet.open(f"{root}/train-{{000000..000011}}.tar")
    assert pattern.urls("train") == by_dir.urls("train") and pattern.classes is None
    piped = ShardSet.open([f"pipe:cat {url}" for url in by_dir.urls("val")])
    loader = build_eval_loader(piped, clip=CLIP, batch_size=4, num_workers=0, rank=0, world_size=1)
    assert sorted(k for b in loader for k in b["key"]) == sorted(shard_sets["val_keys"])


def test_shardset_reads_a_manifest_and_its_shards_over_http(shard_sets):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_sets["root"] / "mp4"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        shards = ShardSet.open(f"http://127.0.0.1:{server.server_address[1]}/dataset.json")
        assert shards.urls("val")[0].startswith("http://127.0.0.1") and shards.classes == CLASSES
        loader = build_eval_loader(shards, clip=CLIP, batch_size=4, num_workers=0, rank=0, world_size=1)
        assert sorted(k for b in loader for k in b["key"]) == sorted(shard_sets["val_keys"])
    finally:
        server.shutdown()
        thread.join()


def test_bad_sources_and_settings_fail_with_one_clear_message(shard_sets, tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        ShardSet.open(tmp_path)
    (tmp_path / "dataset.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version 99"):
        ShardSet.open(tmp_path / "dataset.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardSet.open(str(tmp_path / "train-000000.tar"))
    root = shard_sets["root"] / "mp4"
    with pytest.raises(KeyError, match="no shards for split 'test'"):
        build_eval_loader(root, split="test", clip=CLIP)
    with pytest.raises(ValueError, match="spatial_crops"):
        build_eval_loader(root, clip=CLIP, spatial_crops=2)
    with pytest.raises(ValueError, match="short_side_range"):
        build_train_loader(root, clip=CLIP, augment=TrainAugment(short_side_range=(20, 30)))


def test_a_pass_is_one_epoch_over_the_split(shard_sets):
    loader = build_train_loader(shard_sets["root"] / "mp4", clip=CLIP, batch_size=2, num_workers=0, rank=0, world_size=2)
    assert len(loader) == 12 // (2 * 2)
