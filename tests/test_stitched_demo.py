"""benchmarks/stitched_demo.py: a long video stitched from test videos of known classes, scored through
`predict.py --window --stride`, and its segments' frame-level agreement with the truth."""

from __future__ import annotations

import csv
import json

import av
import numpy as np
import yaml

from benchmarks import stitched_demo
from tests.predict_fixtures import CLASSES, write_moving_video, write_tiny_run


def test_frame_agreement_counts_frames_by_their_segment():
    truth = [("a", 0, 10), ("b", 10, 20)]  # 20 frames at 10 fps: a for 1 s, then b
    assert stitched_demo.frame_agreement([("a", 0.0, 1.0), ("b", 1.0, 2.0)], truth, 10.0)[0] == 1.0
    # b begins 0.5 s late: frames 10-14 are called a, wrong; a gap (frames in no segment) is wrong as well.
    agreement, per_class = stitched_demo.frame_agreement([("a", 0.0, 1.5), ("b", 1.5, 2.0)], truth, 10.0)
    assert agreement == 0.75 and per_class == {"a": 1.0, "b": 0.5}
    assert stitched_demo.frame_agreement([("a", 0.0, 0.5)], truth, 10.0)[0] == 0.25


def test_stitched_demo_through_predict(tmp_path):
    """The smoke run: the stitched video holds each class's seconds in the classes' order, predict.py's files
    are there, and the reported agreement is the one recomputed from segments.csv and truth.csv."""
    run = write_tiny_run(tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    shards, videos = tmp_path / "shards", tmp_path / "videos"
    config["data"]["shards"] = str(shards)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shards.mkdir()
    rows = []
    for k, name in enumerate(CLASSES):
        for j in range(2):
            (videos / name).mkdir(parents=True, exist_ok=True)
            write_moving_video(videos / name / f"{j}.mp4", frames=20, fps=10, seed=10 * k + j)
            rows.append({"source": f"{name}/{j}.mp4", "label": name, "split": "test"})
        rows.append({"source": f"{name}/train.mp4", "label": name, "split": "train"})  # not used: not a test video
    with open(shards / "split.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["source", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)

    out = tmp_path / "out"
    assert stitched_demo.main(["--run", str(run), "--videos", str(videos), "--smoke", "--window", "8",
                               "--stride", "4", "--smooth", "3", "--out", str(out)]) == 0

    with av.open(str(out / "stitched.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 3 * 20  # 3 classes x 2 s at 10 fps
    with open(out / "truth.csv", newline="") as handle:
        truth = list(csv.DictReader(handle))
    assert sorted(row["label"] for row in truth) == sorted(CLASSES)
    assert [(float(r["start_s"]), float(r["end_s"])) for r in truth] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    for name in ("windows.csv", "segments.csv", "timeline.png"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "stitched_demo.json").read_text())
    segments = stitched_demo.read_segments(out / "segments.csv")
    expected, _ = stitched_demo.frame_agreement(
        segments, [(r["label"], round(float(r["start_s"]) * 10), round(float(r["end_s"]) * 10)) for r in truth], 10.0)
    assert result["frame_agreement"] == expected and 0.0 <= expected <= 1.0
    assert result["segments"] == len(segments) and result["true_segments"] == 3 and result["smooth"] == 3
    assert 0.0 <= result["frame_agreement_unsmoothed"] <= 1.0 and result["segments_unsmoothed"] >= 1
    assert np.isclose(result["video_s"], 6.0)
