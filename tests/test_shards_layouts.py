"""Every supported layout is auto-detected, read with its labels and official split, and packed."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from actionrec.shards import (EncodeSettings, LayoutError, PackError, PackOptions, list_sources, pack_videos,
                              read_split_csv)
from tests.shards_media import decode_video, encode_video, marker_frames, write_frames_folder, write_video
from tests.shards_scripts import run_script

FAST = EncodeSettings(short_side=32, fps=30)


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    """One small H.264 mp4 (8 frames) copied wherever a layout needs a video."""
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", n=8).read_bytes()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pack(src, out, **kwargs):
    options = PackOptions(encode=kwargs.pop("encode", FAST), workers=0, **kwargs)
    result = pack_videos(src, out, options, progress=False, log=lambda message: None)
    return result, json.loads((Path(out) / "dataset.json").read_text())


def test_frames_folders_are_packed_in_frame_number_order(tmp_path):
    src = tmp_path / "src"
    for label in ("jump", "wave"):
        for i in range(3):
            write_frames_folder(src / label / f"clip{i}", n=12)
    (src / "wave" / "empty_clip").mkdir()
    listing = list_sources(src)
    assert listing.layout == "frames" and len(listing.sources) == 6
    result, manifest = pack(src, tmp_path / "out", val=0.0, test=0.0)
    assert result.packed["train"] == 6
    assert manifest["skipped"] == [{"source": "wave/empty_clip", "reason": "folder without frame images"}]
    sample = next(iter(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False)))
    frames = decode_video(sample["mp4"])
    assert len(frames) == 12
    brightness = frames[:, -4:, -4:].mean(axis=(1, 2, 3))  # background brightens frame by frame
    assert np.all(np.diff(brightness) > 0), "frame_10.jpg must come after frame_9.jpg, not after frame_1.jpg"


def test_frames_layout_as_jpg_format_keeps_one_jpeg_per_frame(tmp_path):
    src = tmp_path / "src"
    write_frames_folder(src / "jump" / "clip0", n=5)
    write_frames_folder(src / "wave" / "clip0", n=4)
    result, manifest = pack(src, tmp_path / "out", val=0.0, test=0.0,
                            encode=EncodeSettings(format="jpg", short_side=32))
    samples = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False))
    counts = sorted(len([k for k in s if k.endswith(".jpg")]) for s in samples)
    assert counts == [4, 5] and manifest["format"] == "jpg"
    assert sorted(k for k in samples[0] if k.endswith(".jpg"))[0] == "000.jpg"


def test_csv_manifest_with_partial_split_column(tmp_path, clip_bytes):
    src = tmp_path / "src"
    rows = [("videos/a1.mp4", "open", "test"), ("videos/a2.mp4", "open", ""), ("videos/a3.mp4", "open", ""),
            ("videos/b1.mp4", "close", "validation"), ("videos/b2.mp4", "close", ""), ("missing.mp4", "close", "")]
    for path, _, _ in rows[:-1]:
        put(src / path, clip_bytes)
    with open(src / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    listing = list_sources(src)
    assert listing.layout == "csv" and listing.classes == ["close", "open"]
    result, manifest = pack(src, tmp_path / "out", val=0.0, test=0.0)
    split = read_split_csv(tmp_path / "out" / "split.csv")
    assert split["videos/a1.mp4"] == ("open", "test") and split["videos/b1.mp4"] == ("close", "val")
    assert split["videos/a2.mp4"][1] == "train"  # rows without a split get the seeded split (here all train)
    assert result.packed == {"train": 3, "val": 1, "test": 1}
    assert manifest["skipped"] == [{"source": "missing.mp4", "reason": "unreadable: file not found"}]


def test_csv_manifest_file_as_src(tmp_path, clip_bytes):
    put(tmp_path / "clips" / "x.mp4", clip_bytes)
    put(tmp_path / "clips" / "y.mp4", clip_bytes)
    (tmp_path / "list.csv").write_text("path,label\nclips/x.mp4,a\nclips/y.mp4,b\n")
    result, _ = pack(tmp_path / "list.csv", tmp_path / "out", val=0.0, test=0.0)
    assert result.layout == "csv" and result.classes == ["a", "b"] and result.total_packed == 2


def group(entry: str) -> int:
    return int(entry.rsplit("_g", 1)[1][:2])


def make_ucf101(src: Path, clip: bytes) -> None:
    classes = ["ApplyEyeMakeup", "Basketball"]
    lists = src / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, start=1)))
    videos = {c: [f"{c}/v_{c}_g0{g}_c01.avi" for g in range(1, 5)] for c in classes}
    for c in classes:
        for entry in videos[c]:
            put(src / "UCF-101" / entry, clip)
    for fold in (1, 2):
        test_groups = {fold}  # fold N tests on group N
        train = [f"{e} {classes.index(c) + 1}" for c in classes for e in videos[c] if group(e) not in test_groups]
        test = [e for c in classes for e in videos[c] if group(e) in test_groups]
        (lists / f"trainlist0{fold}.txt").write_text("\n".join(train + ["Basketball/v_Basketball_g09_c01.avi 2"]) + "\n")
        (lists / f"testlist0{fold}.txt").write_text("\n".join(test) + "\n")


def test_ucf101_official_split_and_fold(tmp_path, clip_bytes):
    src = tmp_path / "ucf"
    make_ucf101(src, clip_bytes)
    assert list_sources(src).layout == "ucf101"
    result, manifest = pack(src, tmp_path / "out1", val=0.0)
    assert result.classes == ["ApplyEyeMakeup", "Basketball"], "classInd.txt order defines the class indices"
    split1 = read_split_csv(tmp_path / "out1" / "split.csv")
    assert split1["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"][1] == "test"
    assert split1["ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi"][1] == "train"
    assert result.packed == {"train": 6, "val": 0, "test": 2}
    assert manifest["skipped"][0]["source"] == "Basketball/v_Basketball_g09_c01.avi"
    assert "not found" in manifest["skipped"][0]["reason"]
    result2, _ = pack(src, tmp_path / "out2", fold=2, val=0.0)
    split2 = read_split_csv(tmp_path / "out2" / "split.csv")
    assert split2["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"][1] == "train"
    assert split2["ApplyEyeMakeup/v_ApplyEyeMakeup_g02_c01.avi"][1] == "test"
    # with a val fraction, val is carved out of the official train part only, per class
    result3, _ = pack(src, tmp_path / "out3", val=0.34)
    assert result3.packed == {"train": 4, "val": 2, "test": 2}


def test_kinetics_csv_trimmed_and_untrimmed_downloads(tmp_path, clip_bytes):
    src = tmp_path / "k400"
    put(src / "train" / "abseiling" / "aaaaaaaaaaa_000010_000020.mp4", clip_bytes)
    put(src / "train" / "archery" / "bbbbbbbbbbb_000000_000010.mp4", clip_bytes)
    write_video(src / "raw" / "ccccccccccc.mp4", n=60, width=32, height=24)  # 2 s, untrimmed
    (src / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n"
                                   "abseiling,aaaaaaaaaaa,10,20,train\narchery,bbbbbbbbbbb,0,10,train\n"
                                   "archery,ddddddddddd,5,15,train\n")
    (src / "validate.csv").write_text("label,youtube_id,time_start,time_end,split\nabseiling,ccccccccccc,0.5,1.5,val\n")
    assert list_sources(src).layout == "kinetics"
    result, manifest = pack(src, tmp_path / "out")
    assert result.packed == {"train": 2, "val": 1, "test": 0}
    assert manifest["skipped"] == [{"source": "archery/ddddddddddd", "reason": "not found under SRC (train.csv:4)"}]
    (val_sample,) = wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False)
    assert json.loads(val_sample["json"])["num_frames"] == 30  # [0.5 s, 1.5 s) of the untrimmed file


def test_something_something_v2_json(tmp_path):
    src = tmp_path / "ssv2"
    templates = ["Pushing something from left to right", "Pushing something from right to left"]
    (src / "videos").mkdir(parents=True)
    src.joinpath("labels.json").write_text(json.dumps({t: str(i) for i, t in enumerate(templates)}))
    frames = marker_frames(6, 32, 24)
    for video_id in (11, 12, 13, 14):
        encode_video(src / "videos" / f"{video_id}.webm", frames, fps=12, fmt="webm", codec="libvpx-vp9")
    src.joinpath("train.json").write_text(json.dumps([
        {"id": "11", "template": "Pushing [something] from left to right", "label": "pushing a cup from left to right"},
        {"id": "12", "template": "Pushing [something] from right to left", "label": "pushing a pen from right to left"},
        {"id": "13", "template": "Pushing [something] from left to right", "label": "pushing a box from left to right"}]))
    src.joinpath("validation.json").write_text(json.dumps([{"id": "14", "template": "Pushing [something] from right to left"}]))
    src.joinpath("test.json").write_text(json.dumps([{"id": "15"}]))
    assert list_sources(src).layout == "ssv2"
    result, manifest = pack(src, tmp_path / "out", val=0.0)
    assert result.classes == templates and result.packed == {"train": 3, "val": 1, "test": 0}
    assert manifest["skipped"] == [{"source": "15", "reason": "no label in test.json (unlabelled test entry)"}]
    (val_sample,) = wds.WebDataset(str(tmp_path / "out" / "val-000000.tar"), shardshuffle=False)
    assert int(val_sample["cls"]) == 1 and json.loads(val_sample["json"])["num_frames"] == 6  # 12 fps kept


def test_forced_layout_and_layout_errors(tmp_path, clip_bytes):
    src = tmp_path / "src"
    put(src / "a" / "x.mp4", clip_bytes)
    put(src / "b" / "y.mp4", clip_bytes)
    assert list_sources(src).layout == "folder"
    forced = list_sources(src, layout="frames")
    assert forced.sources == [] and {u.reason for u in forced.unusable} == {"not a folder of frame images"}
    with pytest.raises(LayoutError, match="unknown layout 'hmdb'"):
        list_sources(src, layout="hmdb")
    with pytest.raises(LayoutError, match="no classInd.txt"):
        list_sources(src, layout="ucf101")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="empty folder"):
        list_sources(tmp_path / "empty")
    with pytest.raises(PackError, match="inside SRC"):
        pack(src, src / "shards")


def test_pack_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    code, _, err = run_script(capsys, "pack.py", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"))
    assert code == 2 and err.strip() == f"error: SRC {str(tmp_path / 'nope')!r} does not exist"
    (tmp_path / "empty").mkdir()
    code, _, err = run_script(capsys, "pack.py", str(tmp_path / "empty"), "--out", str(tmp_path / "o2"))
    assert code == 2 and err.count("\n") == 1 and "empty folder" in err
    code, _, err = run_script(capsys, "pack.py", str(tmp_path / "empty"), "--out", str(tmp_path / "o3"),
                              "--layout", "hmdb")
    assert code == 2 and "invalid choice: 'hmdb'" in err
    code, _, err = run_script(capsys, "pack.py", str(tmp_path / "empty"), "--out", str(tmp_path / "o3"),
                              "--val", "0.7", "--test", "0.5")
    assert code == 2 and err.startswith("error: --val and --test must be fractions")
    junk = tmp_path / "junk"
    put(junk / "a" / "x.mp4", b"not a video at all")
    (junk / "a" / "readme.txt").write_text("hello")
    code, out, err = run_script(capsys, "pack.py", str(junk), "--out", str(tmp_path / "o4"), "--no-progress",
                                "--workers", "1")
    assert code == 1 and err.startswith("error: nothing packable") and err.count("\n") == 1
    assert "skipped 2" in out
    code, out, _ = run_script(capsys, "pack.py", "--help")
    assert code == 0 and "--shard-size" in out


def test_empty_class_folder_and_hidden_files_are_not_sources(tmp_path, clip_bytes):
    src = tmp_path / "src"
    put(src / "a" / "x.mp4", clip_bytes)
    put(src / "a" / ".DS_Store", b"\0\0")
    (src / "b").mkdir()
    listing = list_sources(src)
    assert [s.relpath for s in listing.sources] == ["a/x.mp4"] and listing.unusable == []
    shutil.rmtree(src / "b")
