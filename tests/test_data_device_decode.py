"""data.decode_on=device on real shards: workers ship bytes, the training process decodes. On this CPU machine
the training process decodes with the workers' readers, so the batches must equal decode_on=worker's."""

import logging
import re
import shutil

import pytest
import torch

from actionrec.data import ClipSpec, TrainAugment, build_eval_loader, build_train_loader
from tests.data_shard_fixtures import corrupt_samples, index_from_pixels, make_videos, pack_test_shards

CLASSES = ["archery", "bowling", "cycling"]
CLIP = ClipSpec(num_frames=4, size=32)
FRAME_COUNTS = [20, 33, 47, 61, 75]
AUGMENT = TrainAugment(short_side_range=(36, 40), hflip=True, color_jitter=0.2)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """The same train and val videos as mp4 shards and as jpg shards, and a two-class mp4 set with corrupt
    samples."""
    root = tmp_path_factory.mktemp("device_shards")
    train = make_videos(CLASSES, 2, FRAME_COUNTS, "train")
    val = make_videos(CLASSES, 2, FRAME_COUNTS, "val", offset=50)
    sources = root / "sources"
    pack_test_shards(root / "mp4", train + val, shard_bytes=1024, sources=sources)
    pack_test_shards(root / "jpg", train + val, fmt="jpg", shard_bytes=1024, sources=sources)
    shutil.copytree(root / "mp4", root / "corrupt")
    corrupt_samples(root / "corrupt", {train[1].key: "garbage_mp4", train[3].key: "truncated_mp4",
                                       val[0].key: "no_cls", val[4].key: "garbage_mp4"})
    return root


def _batches(loader):
    return [batch for batch in loader]


def _assert_same_batches(worker, device):
    assert len(worker) == len(device) > 0
    for a, b in zip(worker, device, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["label"], b["label"]) and torch.equal(a["view"], b["view"])
        assert torch.equal(a["frame_index"], b["frame_index"])
        assert b["video"].dtype == torch.uint8 and torch.equal(a["video"], b["video"])  # the same pixels
        assert int(a["skipped"]) == int(b["skipped"])
        if "weight" in a:
            assert torch.equal(a["weight"], b["weight"]) and a["skipped_clips"] == b["skipped_clips"]
            assert a["micro_batch"] == b["micro_batch"]


@pytest.mark.parametrize("fmt", ["mp4", "jpg"])
@pytest.mark.parametrize("clips_per_video, num_workers", [(1, 0), (2, 1)])
def test_device_decoding_gives_the_worker_paths_train_batches(shard_sets, fmt, clips_per_video, num_workers):
    def loader(decode_on):
        return build_train_loader(shard_sets / fmt, clip=CLIP, batch_size=3, num_workers=num_workers,
                                  batches_per_pass=4, seed=5, rank=0, world_size=1, augment=AUGMENT,
                                  clips_per_video=clips_per_video, decode_on=decode_on, device="cpu")

    worker, device = _batches(loader("worker")), _batches(loader("device"))
    _assert_same_batches(worker, device)
    for batch in device:  # and they are the sampled frames (pixel values encode the frame number)
        assert batch["video"].shape == (3, 3, 4, 32, 32)
    unaugmented = build_train_loader(shard_sets / fmt, clip=CLIP, batch_size=3, num_workers=num_workers,
                                     batches_per_pass=2, seed=5, rank=0, world_size=1, decode_on="device")
    for batch in unaugmented:
        for video, indices in zip(batch["video"], batch["frame_index"]):
            assert index_from_pixels(video) == indices.tolist()


@pytest.mark.parametrize("fmt", ["mp4", "jpg"])
@pytest.mark.parametrize("spatial_crops, num_workers", [(1, 0), (3, 1)])
def test_device_decoding_gives_the_worker_paths_eval_batches(shard_sets, fmt, spatial_crops, num_workers):
    def loader(decode_on):
        return build_eval_loader(shard_sets / fmt, clip=CLIP, batch_size=4, num_workers=num_workers,
                                 temporal_clips=2, spatial_crops=spatial_crops, rank=0, world_size=1,
                                 decode_on=decode_on, device="cpu")

    _assert_same_batches(_batches(loader("worker")), _batches(loader("device")))


@pytest.mark.parametrize("clips_per_video, num_workers", [(1, 0), (2, 1)])
def test_device_decoding_skips_counts_and_resumes_exactly_after_corrupt_samples(shard_sets, clips_per_video,
                                                                                num_workers, caplog):
    def loader(decode_on, start_batch=0):
        return build_train_loader(shard_sets / "corrupt", clip=CLIP, batch_size=2, num_workers=num_workers,
                                  start_batch=start_batch, batches_per_pass=8 - start_batch, seed=0, rank=0,
                                  world_size=1, augment=AUGMENT, clips_per_video=clips_per_video,
                                  decode_on=decode_on, device="cpu")

    batches = _batches(loader("device"))
    _assert_same_batches(_batches(loader("worker")), batches)
    first_bad = next(i for i, b in enumerate(batches) if int(b["skipped"]))
    for start in sorted({min(first_bad + 1, 7), 7}):  # resume points after a corrupt sample
        _assert_same_batches(batches[start:], _batches(loader("device", start_batch=start)))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actionrec.data"):
        evaluation = build_eval_loader(shard_sets / "corrupt", clip=CLIP, batch_size=2, num_workers=0, rank=0,
                                       world_size=1, decode_on="device", device="cpu")
        keys = [k for b in _batches(evaluation) for k in b["key"]]
    assert evaluation.skipped_in_last_pass == 2 and len(keys) == 6 - 2
    assert sum("skipping corrupt sample" in r.getMessage() for r in caplog.records) == 2


def test_a_bitstream_that_fails_only_when_decoded_is_dropped_from_its_batch_and_counted(shard_sets, tmp_path):
    """Headers intact, H.264 data zeroed: the worker cannot see it. Evaluation drops the sample's clips from
    the batch and counts it; training keeps its slot with weight 0, counts it, lists it as skipped, and a run
    resumed after it gets exactly the uninterrupted run's batches."""
    import io
    import tarfile

    target = tmp_path / "broken"
    shutil.copytree(shard_sets / "mp4", target)
    victim = sorted(target.glob("*train*.tar"))[0]
    with tarfile.open(victim) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(victim, "w") as tar:
        for member, data in members:
            if member.name.endswith(".mp4"):
                mdat = data.find(b"mdat")
                data = data[: mdat + 4 + 64] + bytes(len(data) - mdat - 4 - 64)  # keep moov, wipe the frames
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    loader = build_eval_loader(target, split="train", clip=CLIP, batch_size=30, num_workers=0, rank=0,
                               world_size=1, decode_on="device", device="cpu")
    batches = _batches(loader)
    assert loader.skipped_in_last_pass == 1
    assert len([k for b in batches for k in b["key"]]) == 5  # 6 train videos, one dropped

    def train(**kw):
        return _batches(build_train_loader(target, clip=CLIP, batch_size=2, num_workers=0, seed=1, rank=0,
                                           world_size=1, augment=AUGMENT, decode_on="device", device="cpu", **kw))

    batches = train()
    hit = [n for n, b in enumerate(batches) if b["skipped_clips"]]
    assert len(hit) == 1 and sum(int(b["skipped"]) for b in batches) == 1
    broken = batches[hit[0]]
    assert [w for k, w in zip(broken["key"], broken["weight"].tolist()) if not k] == [0.0]
    assert sum(len([k for k in b["key"] if k]) for b in batches) == 5  # the other 5 videos, each once
    start = min(hit[0] + 1, len(batches) - 1)
    _assert_same_batches(batches[start:], train(start_batch=start))


def _damage_jpg_frames(shard_dir, damage: dict) -> None:
    """Rewrite the jpg shards with the frames of the samples in `damage` (key -> how) broken: "garbage" (every
    frame not an image), "png" (every frame a PNG named .jpg), "sizes" (frames from 10 on 8 px narrower: every
    clip of these videos holds frames of both sizes)."""
    import io

    import webdataset as wds
    from PIL import Image

    def broken(blob: bytes, how: str, late: bool) -> bytes:
        if how == "garbage":
            return bytes(range(256)) * 4
        with Image.open(io.BytesIO(blob)) as image:
            if how == "sizes" and late:
                image = image.resize((image.width - 8, image.height))
            out = io.BytesIO()
            image.save(out, format="PNG" if how == "png" else "JPEG")
        return out.getvalue()

    for tar in sorted(shard_dir.glob("*.tar")):
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        with wds.TarWriter(str(tar)) as sink:
            for sample in samples:
                fields = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
                how = damage.get(sample["__key__"])
                if how is not None:
                    fields = {k: broken(v, how, int(k[:-4]) >= 10) if k.endswith(".jpg") else v
                              for k, v in fields.items()}
                sink.write(fields)


def test_broken_jpg_frames_are_skipped_alike_on_both_paths_with_the_readers_reason(shard_sets, tmp_path, caplog):
    """Frames that are not jpgs, do not decode, or differ in size: the reader (decode.py) says so once, the
    sample is skipped in the worker on either path, and the rest of the batches are the same."""
    target = tmp_path / "jpg"
    shutil.copytree(shard_sets / "jpg", target)
    val_keys = sorted({k for b in build_eval_loader(target, clip=CLIP, num_workers=0, rank=0, world_size=1)
                       for k in b["key"]})
    _damage_jpg_frames(target, {val_keys[0]: "garbage", val_keys[1]: "png", val_keys[2]: "sizes"})

    def loader(decode_on):
        return build_eval_loader(target, clip=CLIP, batch_size=4, num_workers=0, temporal_clips=2,
                                 spatial_crops=3, rank=0, world_size=1, decode_on=decode_on, device="cpu")

    seen = {}
    for decode_on in ("worker", "device"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="actionrec.data"):
            evaluation = loader(decode_on)
            seen[decode_on] = (_batches(evaluation), evaluation.skipped_in_last_pass,
                                  [re.sub(" at 0x[0-9a-f]+", "", r.getMessage()) for r in caplog.records])
    _assert_same_batches(seen["worker"][0], seen["device"][0])
    assert seen["worker"][1:] == seen["device"][1:]
    assert seen["worker"][1] == 3 and len({k for b in seen["worker"][0] for k in b["key"]}) == len(val_keys) - 3
    messages = " | ".join(seen["worker"][2])
    assert "does not decode as a jpg" in messages and "is a PNG, not a jpg" in messages
    assert "jpg frames differ in size" in messages


def test_bad_decode_on_fails_with_one_clear_message(shard_sets):
    with pytest.raises(ValueError, match="decode_on must be 'worker' or 'device', got 'gpu'"):
        build_train_loader(shard_sets / "mp4", clip=CLIP, batch_size=2, num_workers=0, decode_on="gpu")
    with pytest.raises(ValueError, match="decode_on must be 'worker' or 'device'"):
        build_eval_loader(shard_sets / "mp4", clip=CLIP, batch_size=2, num_workers=0, decode_on="cuda")


def test_run_config_takes_decode_on_and_rejects_anything_else():
    from actionrec.config import ConfigError, build_config

    assert build_config({}, [], check_paths=False).data.decode_on == "worker"
    assert build_config({}, ["data.decode_on=device"], check_paths=False).data.decode_on == "device"
    with pytest.raises(ConfigError, match="config key 'data.decode_on' must be one of 'worker', 'device', got 'gpu'"):
        build_config({}, ["data.decode_on=gpu"], check_paths=False)


def test_train_py_with_device_decoding_logs_the_losses_of_worker_decoding(shards, runs):
    """End to end (1 process, 1 loader worker, 2 clips per video, evaluation included): the same losses."""
    from tests.train_fixtures import launch, metrics, tiny_overrides, train_losses

    settings = {"train.max_steps": 4, "train.checkpoint_every": 4, "train.eval_every": 4, "data.num_workers": 1,
                "data.clips_per_video": 2}
    for decode_on in ("worker", "device"):
        run = launch("train.py", tiny_overrides(shards, runs, f"decode_{decode_on}", **settings,
                                                **{"data.decode_on": decode_on}), timeout=480)
        assert run.returncode == 0, run.stderr[-3000:]
    worker, device = train_losses(runs / "decode_worker"), train_losses(runs / "decode_device")
    assert sorted(device) == [1, 2, 3, 4] and device == pytest.approx(worker, rel=1e-6)
    val_loss = [next(r["val/loss"] for r in metrics(runs / f"decode_{d}") if "val/loss" in r)
                for d in ("worker", "device")]
    assert val_loss[0] == pytest.approx(val_loss[1], rel=1e-6)
