"""predict.py --window: a long video scored window by window through its command line, with the evaluation
pipeline's scores, in memory that does not grow with the video's length."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from actionrec.data.decode import PyAVFrameReader
from actionrec.engine.inference import load_classifier
from actionrec.engine.long_video import Window, merge_segments, smooth_windows
from tests.predict_fixtures import CLASSES, FramesOf, evaluation_probs, write_moving_video, write_tiny_run
from tests.train_fixtures import REPO, run_env


def predict(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args, "--no-progress"], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def class_scores(row: dict[str, str]) -> dict[str, float]:
    """All classes' scores of a windows.csv row written with --top-k = number of classes."""
    pairs = [("label", "score")] + [(f"label_{r}", f"score_{r}") for r in range(2, len(CLASSES) + 1)]
    return {row[label]: float(row[score]) for label, score in pairs}


@pytest.mark.parametrize("sampling, window, stride, views", [
    ("uniform", "20", "10", (2, 3)),  # overlapping windows, 2 temporal x 3 spatial views
    ("dense", "1s", "0.6s", (1, 1)),  # seconds: 25 and 15 frames at 25 fps
])
def test_every_window_scores_as_evaluation_scores_the_same_frames(tmp_path, sampling, window, stride, views):
    run = write_tiny_run(tmp_path / "run", sampling=sampling, frame_stride=3, eval_temporal_clips=views[0],
                         eval_spatial_crops=views[1])
    video = write_moving_video(tmp_path / "long.mp4", frames=100)
    done = predict(str(video), "--checkpoint", str(run), "--window", window, "--stride", stride,
                   "--out", str(tmp_path / "out"), "--top-k", str(len(CLASSES)))
    assert done.returncode == 0, done.stderr
    rows = read_csv(tmp_path / "out" / "windows.csv")
    length, step = {"20": (20, 10), "1s": (25, 15)}[window]
    starts = list(range(0, 100 - length + 1, step))
    assert [(float(r["start_s"]), float(r["end_s"])) for r in rows] == [(s / 25, (s + length) / 25) for s in starts]

    classifier = load_classifier(run, "cpu")
    with PyAVFrameReader(video.read_bytes()) as whole:
        expected = evaluation_probs(classifier.model, classifier.cfg,
                                    {f"{s:03d}": FramesOf(whole, s, length) for s in starts}, *views)
    for start, row in zip(starts, rows):
        scores, reference = class_scores(row), expected[f"{start:03d}"]
        assert max(abs(scores[c] - float(reference[i])) for i, c in enumerate(CLASSES)) < 1e-5, (start, row)
    assert len({row["label"] for row in rows}) > 1 or len({row["score"] for row in rows}) > 1, "windows all alike"


def test_a_video_shorter_than_the_window_is_one_window_scored_as_the_whole_video(tmp_path):
    run = write_tiny_run(tmp_path / "run", eval_temporal_clips=2)
    video = write_moving_video(tmp_path / "short.mp4", frames=30)
    done = predict(str(video), "--checkpoint", str(run), "--window", "10s", "--out", str(tmp_path / "out"),
                   "--top-k", str(len(CLASSES)))
    assert done.returncode == 0, done.stderr
    (row,) = read_csv(tmp_path / "out" / "windows.csv")
    assert (float(row["start_s"]), float(row["end_s"])) == (0.0, 30 / 25)
    classifier = load_classifier(run, "cpu")
    with PyAVFrameReader(video.read_bytes()) as whole:  # exactly the evaluation loader's reader of the file
        (reference,) = evaluation_probs(classifier.model, classifier.cfg, {"v": whole}, 2, 1).values()
    scores = class_scores(row)
    assert max(abs(scores[c] - float(reference[i])) for i, c in enumerate(CLASSES)) < 1e-5
    (segment,) = read_csv(tmp_path / "out" / "segments.csv")
    assert segment["label"] == row["label"] and float(segment["end_s"]) == 30 / 25
    assert (tmp_path / "out" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_segments_merge_consecutive_windows_with_the_same_top1_and_tile_the_time_line():
    # 4-frame windows every 2 frames at 2 fps: each stands for the 1 s at its centre.
    windows = [Window(k, 2 * k, 4, 2.0) for k in range(5)]
    segments = merge_segments(windows, [0, 0, 1, 1, 0], [0.9, 0.7, 0.6, 0.8, 0.5], stride_frames=2)
    assert [(s.label, s.start_s, s.end_s, round(s.score, 6)) for s in segments] == [
        (0, 0.0, 2.5, 0.8), (1, 2.5, 4.5, 0.7), (0, 4.5, 6.0, 0.5)]
    # Windows with gaps between them (stride > window) keep their own extent.
    apart = [Window(k, 10 * k, 4, 2.0) for k in range(2)]
    assert [(s.start_s, s.end_s) for s in merge_segments(apart, [0, 1], [0.5, 0.5], 10)] == [(0.0, 2.0), (5.0, 7.0)]


def test_smoothing_joins_a_segment_that_one_misread_window_splits():
    """One window in the middle of an action reads as another class (a cut, a misread moment): alone it splits
    the action's segment in three; the mean over 3 windows keeps one segment, and the ends use what they have."""
    table = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.9, 0.1], [0.8, 0.2]], dtype=np.float32)
    windows = [Window(k, 2 * k, 4, 2.0) for k in range(5)]
    assert len(merge_segments(windows, table.argmax(1).tolist(), table.max(1).tolist(), 2)) == 3
    smoothed = smooth_windows(table, 3)
    assert np.allclose(smoothed[0], table[:2].mean(0)) and np.allclose(smoothed[2], table[1:4].mean(0))
    assert np.allclose(smooth_windows(table, 1), table)
    segments = merge_segments(windows, smoothed.argmax(1).tolist(), smoothed.max(1).tolist(), 2)
    assert [(s.label, s.start_s, s.end_s) for s in segments] == [(0, 0.0, 6.0)]
    with pytest.raises(ValueError, match="odd number"):
        smooth_windows(table, 4)


def test_bad_window_arguments_stop_in_one_line(tmp_path):
    video = write_moving_video(tmp_path / "v.mp4", frames=10)
    for args, says in [(["--window", "2.5"], "frame count is a whole number"), (["--window", "abc"], "neither"),
                       (["--window", "8"], "--window needs --out"), (["--stride", "4"], "--stride and --smooth need --window"),
                       (["--window", "8", "--smooth", "2", "--out", str(tmp_path)], "--smooth 2: give an odd number")]:
        done = predict(str(video), "--checkpoint", str(tmp_path / "nowhere"), *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], (args, done.stderr)


def anonymous_bytes(pid: int) -> int:
    """The process's anonymous memory (its heap, tensors and decoded frames; not the pages of the libraries it
    maps, which count as its own or as shared depending on which other processes happen to map them too)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Anonymous line in /proc/{pid}/smaps_rollup")


def peak_anonymous_of(command: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Run `command`; its peak anonymous memory in bytes, polled every 20 ms, and its result."""
    process = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, anonymous_bytes(process.pid))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.02)
    out, err = process.communicate()
    return peak, subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads /proc/PID/smaps_rollup (Linux)")
def test_memory_does_not_grow_with_the_length_of_the_video(tmp_path):
    run = write_tiny_run(tmp_path / "run")
    peaks = {}
    for minutes in (1, 10):
        video = write_moving_video(tmp_path / f"{minutes}min.mp4", frames=minutes * 60 * 25)
        command = [sys.executable, str(REPO / "predict.py"), str(video), "--checkpoint", str(run), "--window", "2s",
                   "--stride", "2s", "--out", str(tmp_path / f"out{minutes}"), "--no-progress"]
        peaks[minutes], done = peak_anonymous_of(command)
        assert done.returncode == 0, done.stderr
        assert len(read_csv(tmp_path / f"out{minutes}" / "windows.csv")) == minutes * 30
    # Holding the decoded 10-minute video would add 15000 x 64 x 48 x 3 bytes = 138 MB of anonymous memory; the
    # bound is half of that. Anonymous memory, not USS or PSS: those count the pages of libtorch and FFmpeg as
    # unique or shared depending on which other processes map them at the moment, and moved by 140 MiB between
    # two runs of a full suite. Anonymous memory stays within 1-2 MiB between runs of the same video here.
    grown = (peaks[10] - peaks[1]) / 2**20
    assert grown < 69, f"peak anonymous memory 1 min {peaks[1] / 2**20:.0f} MiB, 10 min {peaks[10] / 2**20:.0f} MiB"
