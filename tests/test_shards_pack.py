"""The packing workflow end to end: round trip through WebDataset, a split that never moves, resume after
a real SIGKILL, byte-sized shards, the inspection script."""

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from actionrec.shards import (EncodeSettings, PackOptions, SyntheticSpec, generate_synthetic, pack_videos,
                              read_split_csv, sample_key)
from tests.shards_media import decode_video, encode_video
from tests.repo import REPO
from tests.shards_scripts import run_script

SPEC = SyntheticSpec(classes=4, videos_per_class=6, frames=8, size=32, seed=3)


def quiet(_message):
    pass


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    src = tmp_path_factory.mktemp("synth")
    generate_synthetic(src, SPEC, progress=False)
    return src


def read_all(out: Path, manifest: dict) -> list[dict]:
    urls = [str(out / shard) for split in ("train", "val", "test") for shard in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.mark.parametrize("fmt", ["mp4", "jpg"])
def test_round_trip_every_sample_comes_back_once(synth, tmp_path, fmt):
    out = tmp_path / "out"
    options = PackOptions(encode=EncodeSettings(format=fmt), workers=2, val=0.2, test=0.2, seed=1)
    result = pack_videos(synth, out, options, progress=False, log=quiet)
    manifest = json.loads((out / "dataset.json").read_text())
    samples = read_all(out, manifest)
    sources = sorted(p.relative_to(synth).as_posix() for p in synth.rglob("*.mp4"))
    assert len(samples) == len(sources) == 24 and result.skipped == []
    assert sorted(s["__key__"] for s in samples) == sorted(sample_key(r) for r in sources)
    splits = read_split_csv(out / "split.csv")
    for sample in samples:
        meta = json.loads(sample["json"])
        label = meta["source"].split("/")[0]
        assert meta["label"] == label and manifest["classes"][int(sample["cls"])] == label
        if fmt == "mp4":
            frames = decode_video(sample["mp4"])
        else:
            names = sorted(k for k in sample if k.endswith(".jpg"))
            assert names == [f"{i:03d}.jpg" for i in range(SPEC.frames)]
            frames = np.stack([np.asarray(Image.open(io.BytesIO(sample[n]))) for n in names])
        assert len(frames) == meta["num_frames"] == SPEC.frames
        assert frames.shape[1:3] == (meta["height"], meta["width"]) == (SPEC.size, SPEC.size)
        assert meta["format"] == fmt and meta["fps"] == 30.0
    for split in ("train", "val", "test"):
        in_split = [s for s in samples if json.loads(s["json"])["source"] in
                    {r for r, (_, sp) in splits.items() if sp == split}]
        assert manifest["splits"][split]["num_samples"] == len(in_split)
        assert manifest["splits"][split]["num_frames"] == len(in_split) * SPEC.frames
        assert all(n == (4 if split == "train" else 1) for n in manifest["per_class_counts"][split].values())
    assert manifest["frames_per_category"]["move_left"] == {"videos": 6, "frames": 48, "mean": 8.0, "min": 8, "max": 8}
    assert manifest["format_version"] == 2 and manifest["pack"]["format"] == fmt
    assert (out / "frames_per_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_is_written_once_and_never_reshuffled(synth, tmp_path):
    base = PackOptions(workers=0, encode=EncodeSettings(short_side=16))
    pack_videos(synth, tmp_path / "a", base, progress=False, log=quiet)
    pack_videos(synth, tmp_path / "b", base, progress=False, log=quiet)
    first = (tmp_path / "a" / "split.csv").read_text()
    assert first == (tmp_path / "b" / "split.csv").read_text(), "same seed, same split"
    other_seed = PackOptions(workers=0, seed=99, encode=EncodeSettings(short_side=16))
    pack_videos(synth, tmp_path / "c", other_seed, progress=False, log=quiet)
    assert (tmp_path / "c" / "split.csv").read_text() != first

    # Re-running into an existing OUT with another seed keeps the split; new videos are added, old rows stay.
    extra = tmp_path / "grown"
    generate_synthetic(extra, SyntheticSpec(classes=4, videos_per_class=9, frames=8, size=32, seed=3), progress=False)
    notes = []
    pack_videos(extra, tmp_path / "a2", base, progress=False, log=quiet)
    before = read_split_csv(tmp_path / "a2" / "split.csv")
    pack_videos(synth, tmp_path / "a2", other_seed, progress=False, log=notes.append)
    assert read_split_csv(tmp_path / "a2" / "split.csv") == before
    assert any("split.csv already exists" in n for n in notes)
    old = read_split_csv(tmp_path / "a" / "split.csv")
    small_then_grown = tmp_path / "d"
    pack_videos(synth, small_then_grown, base, progress=False, log=quiet)
    result = pack_videos(extra, small_then_grown, PackOptions(workers=0, encode=EncodeSettings(short_side=16)),
                         progress=False, log=quiet)
    grown = read_split_csv(small_then_grown / "split.csv")
    assert {k: grown[k] for k in old} == old and len(grown) == 36
    assert result.resumed == 24 and result.newly_packed == 12


def test_user_split_csv_is_used(synth, tmp_path):
    sources = sorted(p.relative_to(synth).as_posix() for p in synth.rglob("*.mp4"))
    user = tmp_path / "my_split.csv"
    with open(user, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "label", "split"])
        for i, relpath in enumerate(sources):
            writer.writerow([relpath, relpath.split("/")[0], "test" if i % 3 == 0 else "train"])
    result = pack_videos(synth, tmp_path / "out", PackOptions(workers=0, split_csv=str(user),
                                                                encode=EncodeSettings(short_side=16)),
                         progress=False, log=quiet)
    assert result.packed == {"train": 16, "val": 0, "test": 8}
    assert read_split_csv(tmp_path / "out" / "split.csv") == {r: (r.split("/")[0], "test" if i % 3 == 0 else "train")
                                            for i, r in enumerate(sources)}


def test_shards_are_byte_sized_and_settings_are_checked_on_rerun(synth, tmp_path):
    out = tmp_path / "out"
    options = PackOptions(workers=0, val=0.0, test=0.0, shard_bytes=20_000)
    result = pack_videos(synth, out, options, progress=False, log=quiet)
    shards = result.shards["train"]
    assert len(shards) > 2 and shards == [f"train-{i:06d}.tar" for i in range(len(shards))]
    sizes = [(out / s).stat().st_size for s in shards]
    largest_sample = max(m.size for s in shards for m in tarfile.open(out / s) if m.name.endswith(".mp4"))
    assert all(size <= 20_000 + largest_sample + 3 * 512 + 10240 for size in sizes)  # + headers, tar record
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(Exception, match="other settings.*fps: 30.0 -> 15.0"):
        pack_videos(synth, out, PackOptions(workers=0, encode=EncodeSettings(fps=15)), progress=False, log=quiet)


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    src = tmp_path / "src"
    generate_synthetic(src, SyntheticSpec(classes=4, videos_per_class=10, frames=8, size=32, seed=5), progress=False)
    out = tmp_path / "out"
    command = [sys.executable, "shards/pack.py", str(src), "--out", str(out), "--workers", "1",
               "--shard-size", "6KB", "--no-progress"]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("train-*.tar"))) < 3:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the packer and its worker processes, mid-run
    process.wait()
    published_before = {p.name: p.read_bytes() for p in out.glob("*-*.tar")}
    assert len(published_before) >= 3 and not (out / "dataset.json").exists(), "killed before it finished"

    rerun = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stdout
    manifest = json.loads((out / "dataset.json").read_text())
    for name, data in published_before.items():
        assert (out / name).read_bytes() == data, "published shards are never rewritten"
    keys = [s["__key__"] for s in read_all(out, manifest)]
    expected = sorted(sample_key(p.relative_to(src).as_posix()) for p in src.rglob("*.mp4"))
    assert sorted(keys) == expected, "nothing lost, nothing duplicated"
    assert sum(manifest["splits"][s]["num_samples"] for s in ("train", "val", "test")) == 40
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_show_prints_summary_lists_keys_and_dumps_frames(synth, tmp_path, capsys):
    out = tmp_path / "out"
    pack_videos(synth, out, PackOptions(workers=0), progress=False, log=quiet)
    code, summary, _ = run_script(capsys, "show.py", str(out))
    assert code == 0 and "train" in summary and "move_left" in summary and "skipped 0" in summary
    code, keys, _ = run_script(capsys, "show.py", str(out), "--keys")
    rows = [line.split("\t") for line in keys.strip().split("\n")]
    assert code == 0 and len(rows) == 24 and {label for _, _, label in rows} == set(SPEC.class_names)
    split, key, label = rows[0]
    code, _, err = run_script(capsys, "show.py", str(out), "--dump", key, "--to", str(tmp_path / "png"))
    assert code == 0, err
    pngs = sorted((tmp_path / "png").glob("frame_*.png"))
    assert len(pngs) == SPEC.frames and Image.open(pngs[0]).size == (SPEC.size, SPEC.size)
    code, _, err = run_script(capsys, "show.py", str(out), "--dump", "no/such-key")
    assert code == 1 and err.startswith("error: no sample with key 'no/such-key'")
    code, _, err = run_script(capsys, "show.py", str(tmp_path))
    assert code == 2 and "no dataset.json" in err


def test_shards_mix_classes_for_streaming_shuffle(synth, tmp_path):
    """A streaming reader's shuffle buffer only mixes neighbours: samples must not come grouped by class."""
    out = tmp_path / "out"
    pack_videos(synth, out, PackOptions(workers=0, val=0.0, test=0.0, encode=EncodeSettings(short_side=16)),
                progress=False, log=quiet)
    labels = [int(s["cls"]) for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)]
    assert len(labels) == 24 and len(set(labels[:8])) >= 3
    changes = sum(a != b for a, b in zip(labels, labels[1:]))
    assert changes > 12, f"labels in shard order look grouped: {labels}"


def test_error_mid_pack_publishes_no_open_shard_and_rerun_completes(synth, tmp_path, monkeypatch):
    """An exception while packing (here: the disk 'fills' on the 5th sample) must not publish the open
    shard, whose last sample may be cut; the next run removes the temp file and finishes."""
    import actionrec.shards.writer as writer_module

    out = tmp_path / "out"
    options = PackOptions(workers=0, val=0.0, test=0.0, shard_bytes=10_000, encode=EncodeSettings(short_side=16))
    original = writer_module.SplitShardWriter.write
    calls = {"n": 0}

    def failing_write(self, key, fields):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return original(self, key, fields)

    monkeypatch.setattr(writer_module.SplitShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        pack_videos(synth, out, options, progress=False, log=quiet)
    published = {p.name for p in out.glob("train-*.tar")}
    held = [s for p in out.glob("train-*.tar") for s in wds.WebDataset(str(p), shardshuffle=False)]
    assert len(held) < 4 and not (out / "dataset.json").exists()
    monkeypatch.undo()
    result = pack_videos(synth, out, options, progress=False, log=quiet)
    assert result.total_packed == 24 and result.resumed == len(held)
    assert published <= set(result.shards["train"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def moving_texture(n: int, width: int = 96, height: int = 64, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3): a smooth random texture panning 3 px per frame, so neighbouring frames clearly differ."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(30, 220, (height // 8 + 1, (width + 3 * n) // 8 + 2, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((coarse.shape[1] * 8, coarse.shape[0] * 8), Image.BICUBIC))
    return np.stack([texture[:height, 3 * i: 3 * i + width] for i in range(n)])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


@pytest.mark.parametrize("fps_mode", ["cap", "exact"])
def test_slower_source_keeps_its_frame_rate_unless_exact_retiming_is_asked(tmp_path, fps_mode):
    src = tmp_path / "src"
    (src / "pan").mkdir(parents=True)
    (src / "other").mkdir(parents=True)
    source = encode_video(src / "pan" / "ssv2_like.mp4", moving_texture(24), fps=12)
    encode_video(src / "other" / "other.mp4", moving_texture(24, seed=1), fps=12)
    source_frames = decode_video(source)
    options = PackOptions(encode=EncodeSettings(fps=30, fps_mode=fps_mode), workers=0, val=0.0, test=0.0)
    result = pack_videos(src, tmp_path / "out", options, progress=False, log=quiet)
    samples = {s["__key__"]: s for s in wds.WebDataset([str(tmp_path / "out" / n) for n in result.shards["train"]],
                                                       shardshuffle=False)}
    sample = samples[sample_key("pan/ssv2_like.mp4")]
    meta, packed = json.loads(sample["json"]), decode_video(sample["mp4"])
    if fps_mode == "cap":
        # Same frames at the same rate: frame i of the pack is frame i of the source (a re-encoding away).
        assert meta["fps"] == 12 and meta["num_frames"] == len(packed) == len(source_frames) == 24
        scores = [psnr(p, s) for p, s in zip(packed, source_frames)]
        assert min(scores) > 30, scores
        assert all(psnr(packed[i], source_frames[i + 1]) < scores[i] - 5 for i in range(23))
    else:
        # Today's exact re-timing: 2 s at 30 fps, most source frames shown two or three times.
        assert meta["fps"] == 30 and meta["num_frames"] == len(packed) == 60
        # Each packed frame re-encodes the source frame shown at its time: the 24 source frames in order, 36 of
        # the 60 packed frames repeating their predecessor's (an encoder-independent check, unlike comparing
        # neighbouring packed frames, which differ where a GOP starts).
        shown = [int(np.argmax([psnr(p, s) for s in source_frames])) for p in packed]
        assert shown == sorted(shown) and set(shown) == set(range(24)), shown
        assert sum(a == b for a, b in zip(shown, shown[1:])) == 36


# Every encoding setting of format v1 (before shard format v2, 2026-12-02): v1 had no tune and no B-frame
# setting (x264's defaults: no tune, the preset's B-frames) and re-timed every video to exactly --fps.
V1_SETTINGS = EncodeSettings(format="mp4", short_side=256, fps=30.0, fps_mode="exact", gop=16, crf=23,
                             preset="veryfast", tune="none", bframes=None)
V1_UNRECORDED = ("fps_mode", "tune", "bframes")  # v1's pack record had no such keys


def v1_pack(src: Path, out: Path) -> None:
    """A pack as format v1 left it: v1's encoding, and its state file and manifest without the keys v1 did not
    record, manifest format_version 1."""
    pack_videos(src, out, PackOptions(encode=V1_SETTINGS, workers=0, val=0.0, test=0.0), progress=False, log=quiet)
    state = json.loads((out / ".pack-state.json").read_text())
    manifest = json.loads((out / "dataset.json").read_text())
    for key in V1_UNRECORDED:
        del state["settings"][key], manifest["pack"][key]
    manifest["format_version"] = 1
    (out / ".pack-state.json").write_text(json.dumps(state))
    (out / "dataset.json").write_text(json.dumps(manifest))


def docs_v1_flags() -> list[str]:
    """The flags docs/shards.md tells a user to resume a v1 pack with."""
    hint = re.search(r"resumes when re-run with v1's encoding flags: `([^`]+)`", (REPO / "docs" / "shards.md").read_text())
    assert hint, "docs/shards.md lost its v1 resume hint"
    return hint.group(1).split()


def test_a_v1_pack_in_progress_resumes_with_the_flags_the_docs_give_and_only_with_them(synth, tmp_path, capsys):
    out = tmp_path / "out"
    v1_pack(synth, out)
    with pytest.raises(Exception, match="other settings.*gop: 16 -> 4.*crf: 23 -> 24.*tune: none -> fastdecode"):
        pack_videos(synth, out, PackOptions(workers=0, val=0.0, test=0.0), progress=False, log=quiet)
    code, stdout, stderr = run_script(capsys, "pack.py", str(synth), "--out", str(out), "--workers", "0", "--val", "0",
                                      "--test", "0", "--no-progress", *docs_v1_flags())
    assert code == 0, stderr
    assert "24 were already packed by an earlier run" in stdout


def test_repack_replaces_a_pack_made_with_other_settings_and_says_why_in_one_line(synth, tmp_path):
    out = tmp_path / "out"
    v1_pack(synth, out)
    split_before = (out / "split.csv").read_bytes()
    lines = []
    result = pack_videos(synth, out, PackOptions(workers=0, val=0.0, test=0.0, repack=True), progress=False,
                         log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("re-packing:") and "gop: 16 -> 4" in lines[0], lines
    assert result.resumed == 0 and result.newly_packed == 24
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["format_version"] == 2 and manifest["pack"]["gop"] == 4 and manifest["pack"]["crf"] == 24
    assert len(read_all(out, manifest)) == 24  # the old shards are gone, not mixed in
    assert (out / "split.csv").read_bytes() == split_before
    again = pack_videos(synth, out, PackOptions(workers=0, val=0.0, test=0.0, repack=True), progress=False, log=quiet)
    assert again.resumed == 24 and again.newly_packed == 0  # same settings: --repack resumes like a plain re-run


def test_make_demo_packs_over_shards_an_earlier_version_packed(synth, tmp_path):
    """The pack step of `make demo`, as the Makefile spells it, on a folder holding a v1 pack."""
    out = tmp_path / "shards"
    v1_pack(synth, out)
    printed = subprocess.run(["make", "-n", "demo", f"DEMO_VIDEOS={synth}", f"DEMO_SHARDS={out}", f"PY={sys.executable}"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    [command] = [line for line in printed.splitlines() if "shards/pack.py" in line]
    result = subprocess.run(command + " --workers 0 --no-progress", shell=True, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "re-packing:" in result.stdout and "packed 24 videos" in result.stdout
    assert json.loads((out / "dataset.json").read_text())["format_version"] == 2
