"""Every kind of bad input a real data set has: each one is packed correctly or skipped with its reason,
and the pack of the good videos completes."""

import json
import os

import numpy as np
import pytest
import webdataset as wds

from actionrec.shards import EncodeSettings, PackOptions, pack_videos, sample_key
from tests.shards_media import decode_video, marker_frames, stream_counts, write_video

SHORT_SIDE = 48


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    src = tmp_path_factory.mktemp("bad_src")
    good = src / "good"
    bad = src / "bad"
    for i in range(3):
        write_video(good / f"plain_{i}.mp4")
    write_video(good / f"Long Name {'x' * 140}.v2.mp4")  # key > 100 chars, spaces and dots: PAX tar members
    full = write_video(bad / "full.mp4", n=30).read_bytes()
    (bad / "full.mp4").unlink()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "truncated.mp4").write_bytes(full[: len(full) // 2])  # moov atom at the end: cut off
    faststart = write_video(src / "fs.mp4", n=30, options={"movflags": "+faststart"}).read_bytes()
    (src / "fs.mp4").unlink()
    (bad / "truncated_faststart.mp4").write_bytes(faststart[: int(len(faststart) * 0.6)])
    (bad / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (bad / "text.mp4").write_text("this is a text file, not a video\n" * 20)
    (bad / "notes.txt").write_text("shot list\n")
    (bad / "dangling.mp4").symlink_to(src / "does_not_exist.mp4")
    (bad / "folder.mp4").mkdir()
    write_video(bad / "noperm.mp4").chmod(0)
    write_video(bad / "odd.mp4", width=65, height=49, pix_fmt="yuv444p")  # 4:2:0 cannot hold odd sizes
    write_video(bad / "one_frame.mp4", n=1)
    write_video(bad / "short.mp4", n=3)
    write_video(bad / "big.mp4", width=128, height=96)
    write_video(bad / "rotated.mp4", width=48, height=32, rotation=90)
    write_video(bad / "audio.mp4", audio=True)
    write_video(bad / "vfr.mp4", n=16, frame_ms=[50 if i % 2 == 0 else 20 for i in range(16)])
    write_video(bad / "fps60.mp4", n=32, fps=60)
    write_video(bad / "fps10.mp4", n=8, fps=10)
    write_video(bad / "zero_frames.mkv", n=0, fmt="matroska")
    write_video(bad / "zero_frames.mp4", n=0)
    out = tmp_path_factory.mktemp("bad_out")
    settings = EncodeSettings(short_side=SHORT_SIDE, fps=30)
    result = pack_videos(src, out, PackOptions(encode=settings, workers=0, val=0.0, test=0.0), progress=False)
    manifest = json.loads((out / "dataset.json").read_text())
    samples = {s["__key__"]: s for s in wds.WebDataset([str(out / n) for n in result.shards["train"]],
                                                       shardshuffle=False, empty_check=False)}
    return result, manifest, samples


def skip_reason(manifest, name):
    reasons = [s["reason"] for s in manifest["skipped"] if s["source"] == f"bad/{name}"]
    assert len(reasons) == 1, f"{name} should be skipped exactly once, skipped list: {manifest['skipped']}"
    return reasons[0]


def packed_sample(samples, name):
    key = sample_key(f"bad/{name}")
    assert key in samples, f"{name} should have been packed"
    sample = samples[key]
    meta = json.loads(sample["json"])
    frames = decode_video(sample["mp4"])
    assert frames.shape[0] == meta["num_frames"]
    assert frames.shape[1:3] == (meta["height"], meta["width"])
    return meta, frames, sample


@pytest.mark.parametrize("name, reason", [
    ("empty.mp4", "empty file (0 bytes)"),
    ("truncated.mp4", "corrupt or truncated MP4/MOV"),
    ("truncated_faststart.mp4", "corrupt or truncated: decoding failed after"),
    ("random.mp4", "not a video: FFmpeg cannot parse it"),
    ("text.mp4", "not a video: FFmpeg cannot parse it"),
    ("notes.txt", "not a video file (extension '.txt')"),
    ("dangling.mp4", "unreadable: dangling symlink"),
    ("folder.mp4", "unreadable: a folder, not a video file"),
    ("zero_frames.mkv", "corrupt or truncated: the file ends before any video data"),
    ("zero_frames.mp4", "no video stream"),
])
def test_bad_file_is_skipped_with_its_reason(packed, name, reason):
    _, manifest, _ = packed
    assert skip_reason(manifest, name).startswith(reason)


def test_unreadable_permissions_are_reported_or_packed_honestly(packed):
    """chmod 000: a normal user cannot read it (skipped, reason says so); root can, so it is packed."""
    _, manifest, samples = packed
    if os.geteuid() == 0:
        meta, _, _ = packed_sample(samples, "noperm.mp4")
        assert meta["num_frames"] == 8
    else:
        assert "Permission denied" in skip_reason(manifest, "noperm.mp4")


def test_pack_completes_and_counts_add_up(packed):
    result, manifest, samples = packed
    sources = {s["source"] for s in manifest["skipped"]} | {json.loads(s["json"])["source"] for s in samples.values()}
    on_disk = {f"{d.name}/{f.name}" for d in result.out.parent.glob("bad_src*/*") for f in d.iterdir()}
    assert sources == on_disk, "every entry in SRC is either packed or listed as skipped"
    assert manifest["splits"]["train"]["num_samples"] == len(samples) == result.total_packed
    assert len(result.skipped) == len(manifest["skipped"]) == 10 + (os.geteuid() != 0)
    long_key = sample_key(f"good/Long Name {'x' * 140}.v2.mp4")
    assert long_key in samples and len(long_key) > 100 and "." not in long_key


def test_odd_size_becomes_even_and_small_videos_are_not_upscaled(packed):
    _, _, samples = packed
    odd, _, _ = packed_sample(samples, "odd.mp4")
    assert (odd["width"], odd["height"]) == (64, 48)
    big, _, _ = packed_sample(samples, "big.mp4")
    assert (big["width"], big["height"]) == (64, SHORT_SIDE)
    plain, _, _ = packed_sample(samples, "one_frame.mp4")
    assert (plain["width"], plain["height"]) == (48, 32), "a 48x32 source stays 48x32 (short side 32 < 48)"


def test_one_frame_and_very_short_videos_are_packed(packed):
    _, _, samples = packed
    assert packed_sample(samples, "one_frame.mp4")[0]["num_frames"] == 1
    assert packed_sample(samples, "short.mp4")[0]["num_frames"] == 3


def test_rotated_video_is_turned_upright(packed):
    """Display matrix: 90 degrees counter-clockwise. The stored top-left red block must end up
    bottom-left, and the frame becomes portrait, as every player shows it."""
    _, _, samples = packed
    meta, frames, _ = packed_sample(samples, "rotated.mp4")
    assert (meta["width"], meta["height"]) == (32, 48)
    first = frames[0].astype(int)
    bottom_left, top_left = first[-8:, :8], first[:8, :8]
    assert bottom_left[..., 0].mean() > 180 and bottom_left[..., 1].mean() < 80
    assert top_left[..., 0].mean() < 120


def test_frame_rates_are_capped_never_raised(packed):
    _, _, samples = packed
    vfr, _, _ = packed_sample(samples, "vfr.mp4")
    # Variable rate (50/20 ms alternating) becomes constant at the source's average rate, below the cap.
    assert 20 < vfr["fps"] < 30 and abs(vfr["duration"] - 0.56) < 0.1
    fps60 = packed_sample(samples, "fps60.mp4")[0]
    assert fps60["fps"] == 30 and fps60["num_frames"] == 16  # 32 frames at 60 fps, down-sampled to the cap
    fps10 = packed_sample(samples, "fps10.mp4")[0]
    assert fps10["fps"] == 10 and fps10["num_frames"] == 8  # kept at 10 fps: no repeated frames
    assert abs(fps10["duration"] - 0.8) < 1e-6


def test_audio_track_is_dropped(packed):
    _, _, samples = packed
    _, frames, sample = packed_sample(samples, "audio.mp4")
    assert stream_counts(sample["mp4"]) == (1, 0)
    assert len(frames) == 8


def test_packed_pixels_match_the_source(packed):
    _, _, samples = packed
    sample = samples[sample_key("good/plain_0.mp4")]
    decoded = decode_video(sample["mp4"]).astype(int)
    expected = marker_frames(8, 48, 32).astype(int)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 6
