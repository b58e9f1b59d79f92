"""What happens when, on the demo: a long video stitched from the demo's test videos of known classes (20 s of
each of 9 classes, 3 minutes), scored by `predict.py --window --stride` as a user runs it, and its segments
compared with the truth frame by frame.

    make demo                                                       # trains runs/demo (once)
    PYTHONPATH=. .venv/bin/python benchmarks/stitched_demo.py --run runs/demo
    PYTHONPATH=. .venv/bin/python benchmarks/stitched_demo.py --run runs/demo --smoke   # 3 classes x 2 s

The stitched video is H.264 at the test videos' size and frame rate: for each class (a seeded choice and
order), that class's test videos (split.csv) one after another in a seeded order, repeated until the class's
--seconds are full. Frame-level agreement: the share of the video's frames whose time lies in a predicted segment
of the frame's true class (frames in no segment, e.g. a tail shorter than the stride, count as wrong).
The test videos are 16 frames each, so most windows that do not start on a video's first frame span a cut
between two videos (the object jumps); segments come from the mean of --smooth windows (predict.py --smooth),
and the agreement of each window alone (--smooth 1, recomputed from windows.csv) is reported beside it.
Writes OUT/stitched.mp4, truth.csv, the predict.py outputs (windows.csv, segments.csv, timeline.png: here with
the true segments as a band above the predicted ones) and stitched_demo.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a trained run (default runs/demo)")
    parser.add_argument("--videos", type=Path, default=None,
                        help="the source videos of the run's shard set (default: data/videos/<shard set name>)")
    parser.add_argument("--classes", type=int, default=9, help="classes in the video, each once (default 9)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per class (default 20)")
    parser.add_argument("--window", default="16", help="predict.py --window (default 16 frames: one test video)")
    parser.add_argument("--stride", default="8", help="predict.py --stride (default 8 frames)")
    parser.add_argument("--smooth", type=int, default=9,
                        help="predict.py --smooth (default 9 windows, 2.4 s at stride 8); the agreement without "
                             "smoothing is reported beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="3 classes x 2 s: checks that it runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "stitched_demo")
    args = parser.parse_args(argv)
    if args.smoke:
        args.classes, args.seconds = 3, 2.0
    if args.classes < 1 or args.seconds <= 0:
        parser.error("--classes and --seconds must be positive")
    return args


def read_frames(path: Path) -> tuple[list[np.ndarray], Fraction]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], stream.average_rate


def stitch(videos: Path, split_csv: Path, classes: list[str], num_classes: int, seconds: float, seed: int,
           out: Path) -> tuple[list[tuple[str, int, int]], float]:
    """Write out (H.264) from the test videos of `num_classes` classes, `seconds` each. Returns the true
    segments as (class, first frame, end frame) and the frame rate."""
    import av

    rng = np.random.default_rng(seed)
    with open(split_csv, newline="") as handle:
        tests = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    by_class = {name: sorted(row["source"] for row in tests if row["label"] == name) for name in classes}
    present = [name for name in classes if by_class[name]]
    if len(present) < num_classes:
        raise SystemExit(f"error: {split_csv} has test videos of {len(present)} classes; --classes {num_classes} "
                         "needs that many")
    chosen = [present[k] for k in rng.permutation(len(present))[:num_classes]]
    truth, container, stream, fps, written = [], None, None, None, 0
    try:
        for name in chosen:
            sources = [by_class[name][k] for k in rng.permutation(len(by_class[name]))]
            first, k = written, 0
            while True:
                frames, rate = read_frames(videos / sources[k % len(sources)])
                if container is None:
                    fps = rate
                    container = av.open(str(out), "w")
                    stream = container.add_stream("libx264", rate=rate)
                    stream.height, stream.width = frames[0].shape[:2]
                    stream.pix_fmt = "yuv420p"
                if rate != fps or frames[0].shape[:2] != (stream.height, stream.width):
                    raise SystemExit(f"error: {sources[k % len(sources)]} is {frames[0].shape[1]}x"
                                     f"{frames[0].shape[0]} at {rate} fps, the first video {stream.width}x"
                                     f"{stream.height} at {fps}: stitching needs one size and frame rate")
                need = round(seconds * fps) - (written - first)
                for image in frames[:need]:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                written += min(need, len(frames))
                k += 1
                if written - first >= round(seconds * fps):
                    break
            truth.append((name, first, written))
        container.mux(stream.encode(None))
    finally:
        if container is not None:
            container.close()
    return truth, float(fps)


def read_segments(path: Path) -> list[tuple[str, float, float]]:
    with open(path, newline="") as handle:
        return [(row["label"], float(row["start_s"]), float(row["end_s"])) for row in csv.DictReader(handle)]


def frame_agreement(segments: list[tuple[str, float, float]], truth: list[tuple[str, int, int]],
                    fps: float) -> tuple[float, dict[str, float]]:
    """The share of frames whose predicted label (the segment holding the frame's mid-time; none: wrong)
    is its true label, overall and per true class."""
    total = truth[-1][2]
    predicted = np.full(total, "", dtype=object)
    for label, start_s, end_s in segments:
        # Frame f covers [f, f+1) / fps; it belongs to the segment holding its middle.
        first = max(0, int(np.ceil(start_s * fps - 0.5)))
        end = min(total, int(np.ceil(end_s * fps - 0.5)))
        predicted[first:end] = label
    per_class = {name: float(np.mean(predicted[first:end] == name)) for name, first, end in truth}
    right = sum(float(np.sum(predicted[first:end] == name)) for name, first, end in truth)
    return right / total, per_class


def read_windows(out: Path, classes: list[str], fps: float):
    """The windows of windows.csv (written with every class's probability) and their (windows, classes) table."""
    from actionrec.engine.long_video import Window

    index = {name: k for k, name in enumerate(classes)}
    windows, rows = [], []
    with open(out / "windows.csv", newline="") as handle:
        for k, row in enumerate(csv.DictReader(handle)):
            start, end = round(float(row["start_s"]) * fps), round(float(row["end_s"]) * fps)
            windows.append(Window(k, start, end - start, fps))
            probs = np.zeros(len(classes), dtype=np.float32)
            for r in range(1, len(classes) + 1):
                suffix = "" if r == 1 else f"_{r}"
                probs[index[row["label" + suffix]]] = float(row["score" + suffix])
            rows.append(probs)
    return windows, np.stack(rows)


def segments_at(windows, table: np.ndarray, stride_frames: int, smooth: int, classes: list[str]):
    """The segments predict.py writes for these windows with --smooth `smooth` (its own functions)."""
    from actionrec.engine.long_video import merge_segments, smooth_windows

    smoothed = smooth_windows(table, smooth)
    segments = merge_segments(windows, smoothed.argmax(1).tolist(), smoothed.max(1).tolist(), stride_frames)
    return [(classes[s.label], s.start_s, s.end_s) for s in segments]


def timeline_with_truth(out: Path, windows, table: np.ndarray, smooth: int, truth: list[tuple[str, int, int]],
                        fps: float, classes: list[str]) -> Path:
    """timeline.png again, with the true segments as a band above the predicted ones."""
    from actionrec.engine.long_video import Segment, plot_timeline, smooth_windows

    index = {name: k for k, name in enumerate(classes)}
    segments = [Segment(index[label], start, end, 0.0) for label, start, end in read_segments(out / "segments.csv")]
    true_segments = [Segment(index[name], first / fps, end / fps, 1.0) for name, first, end in truth]
    path = out / "timeline.png"
    title = "test videos stitched" + (f" (mean of {smooth} windows)" if smooth > 1 else "")
    plot_timeline(windows, smooth_windows(table, smooth), segments, classes, path, title, truth=true_segments)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = args.run
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"error: {run} is not a trained run (no config.yaml): run `make demo` first, or give --run")
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    shards = Path(config["data"]["shards"])
    shards = shards if shards.is_absolute() else REPO / shards
    videos = args.videos or REPO / "data" / "videos" / shards.name
    classes = json.loads((run / "classes.json").read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    video = args.out / "stitched.mp4"
    truth, fps = stitch(videos, shards / "split.csv", classes, args.classes, args.seconds, args.seed, video)
    with open(args.out / "truth.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "start_s", "end_s"])
        writer.writerows([name, f"{first / fps:.3f}", f"{end / fps:.3f}"] for name, first, end in truth)
    command = [sys.executable, str(REPO / "predict.py"), str(video), "--checkpoint", str(run), "--window",
               args.window, "--stride", args.stride, "--smooth", str(args.smooth), "--top-k", str(len(classes)), "--out", str(args.out)]
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    segments = read_segments(args.out / "segments.csv")
    agreement, per_class = frame_agreement(segments, truth, fps)
    windows, table = read_windows(args.out, classes, fps)
    stride_frames = windows[1].start - windows[0].start if len(windows) > 1 else windows[0].length
    alone = segments_at(windows, table, stride_frames, 1, classes)
    agreement_alone, _ = frame_agreement(alone, truth, fps)
    timeline_with_truth(args.out, windows, table, args.smooth, truth, fps, classes)
    seconds = truth[-1][2] / fps
    result = {"run": str(run), "video_s": seconds, "fps": fps, "classes": [name for name, _, _ in truth],
              "window": args.window, "stride": args.stride, "smooth": args.smooth, "windows": len(windows),
              "segments": len(segments), "true_segments": len(truth), "frame_agreement": agreement,
              "per_class": per_class, "segments_unsmoothed": len(alone), "frame_agreement_unsmoothed": agreement_alone,
              "predict_wall_s": wall}
    (args.out / "stitched_demo.json").write_text(json.dumps(result, indent=1))
    lines = [f"{seconds:.0f} s video ({len(truth)} classes x {args.seconds:g} s, {fps:g} fps), {len(windows)} windows "
             f"of {args.window} every {args.stride}, --smooth {args.smooth}: {len(segments)} segments for "
             f"{len(truth)} true ones, frame-level agreement {100 * agreement:.1f} % (each window alone: "
             f"{len(alone)} segments, {100 * agreement_alone:.1f} %); predict.py took {wall:.0f} s.", "",
             "| true class | start s | end s | frames agreeing |", "|---|---|---|---|"]
    lines += [f"| {name} | {first / fps:.1f} | {end / fps:.1f} | {100 * per_class[name]:.1f} % |"
              for name, first, end in truth]
    (args.out / "stitched_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
