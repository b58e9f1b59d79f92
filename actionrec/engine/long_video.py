"""What happens when in a long video: sliding windows scored as evaluation scores a video, merged into segments.

A window is W consecutive frames of the video as stored, one every S frames (W and S in frames, or in seconds
converted with the stream's frame rate). Each window is treated as a whole video by the evaluation pipeline:
its frames are sampled with `eval_frame_indices` over the window's W frames, cropped with `eval_view_params`,
and its probabilities are the mean over the run's temporal x spatial views (`read_eval_views` does all of
it). So a window's scores equal the video-level scores evaluation gives a video made of exactly those frames.

Windows start at frames 0, S, 2S, ... and lie inside the video; the tail after the last window (fewer than S
frames) is not scored. A video shorter than W is one window of the whole video.

Memory. The file is decoded forward once, streaming (PyAV reads packets from the file as it goes), and only
the decoded frames some pending window samples are kept: at most one window's frames (all W of them while
the first window is pending, since until then the video might be shorter than W). It does not grow with the
video's length; the per-window results (a few numbers per window) are what grows.

Segments (the merging rule). Each window stands for the span of one stride at its centre, [centre - d/2,
centre + d/2) with d = min(S, W) (the first window's span starts at its start, the last window's ends at its
end), so with overlapping windows neighbouring spans tile the time line. Consecutive windows whose top-1
class is the same merge into one segment from the first one's span start to the last one's span end; its
score is the mean of their top-1 probabilities. With smoothing (`smooth` = K > 1, odd), each window's top-1
comes from the mean of the probabilities of the K windows centred on it (fewer at the ends) instead of its
own: a window that straddles a cut between two actions, or a moment the model misreads, no longer breaks a
segment in two. windows.csv keeps every window's own probabilities either way.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from actionrec.data.decode import CorruptSample, FrameReader, frame_to_rgb
from actionrec.data.pipeline import HeapTrimmer
from actionrec.data.sampling import ClipSpec, eval_frame_indices
from actionrec.data.transforms import read_eval_views
from actionrec.engine.inference import ScoreClips

_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s?)\s*$")


@dataclass(frozen=True)
class Span:
    """A length of video: `value` frames, or `value` seconds when `seconds`."""

    value: float
    seconds: bool

    @classmethod
    def parse(cls, text: str) -> Span:
        """'16' (frames of the video as stored) or '2.5s' (seconds); raises ValueError for anything else."""
        match = _SPAN.match(text)
        if not match:
            raise ValueError(f"{text!r} is neither a frame count (e.g. 64) nor seconds (e.g. 2.5s)")
        value, unit = float(match.group(1)), match.group(2)
        if not unit and not value.is_integer():
            raise ValueError(f"{text!r}: a frame count is a whole number; write seconds with an s (e.g. {text}s)")
        if value <= 0:
            raise ValueError(f"{text!r} must be positive")
        return cls(value, bool(unit))

    def frames(self, fps: float) -> int:
        return max(1, round(self.value * fps)) if self.seconds else int(self.value)


@dataclass(frozen=True)
class Window:
    """Frames [start, start + length) of the video; times in seconds at the stream's frame rate."""

    index: int
    start: int
    length: int
    fps: float

    @property
    def start_s(self) -> float:
        return self.start / self.fps

    @property
    def end_s(self) -> float:
        return (self.start + self.length) / self.fps


class _BufferedWindowReader(FrameReader):
    """The frames of one window, held decoded, read by their index inside the window: what
    `read_eval_views` reads a whole video through."""

    def __init__(self, frames: dict[int, np.ndarray], start: int, length: int):
        self._frames, self._start, self.num_frames = frames, start, length

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        clip = np.stack([self._frames[self._start + int(i)] for i in indices])  # (T, H, W, 3)
        return torch.from_numpy(clip).permute(0, 3, 1, 2)  # (T, 3, H, W)


def stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or float(rate) <= 0:
        raise CorruptSample("the video stream states no frame rate")
    return float(rate)


def window_views(path: str | Path, window: Span, stride: Span, spec: ClipSpec, temporal_clips: int,
                 spatial_crops: int) -> Iterator[tuple[Window, torch.Tensor]]:
    """Every window of the video at `path` with its evaluation views, uint8 (V, C, T, S, S) with
    V = temporal_clips * spatial_crops, in order, decoding the file forward once (see the module docstring).
    Raises CorruptSample when the file does not open or decode as a video."""
    try:
        container = av.open(str(path))  # reads the file as it demuxes: never the whole file in memory
    except (av.error.FFmpegError, OSError) as exc:
        raise CorruptSample(f"does not open as a video: {exc}") from exc
    with container:
        if not container.streams.video:
            raise CorruptSample("has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's frame threads: one decoder here, not the loader's many workers
        fps = stream_fps(stream)
        length, step = window.frames(fps), stride.frames(fps)
        # Frame offsets inside a window that any of its views samples (a window's frames are a whole video to
        # evaluation's sampler).
        sampled = set(np.concatenate([eval_frame_indices(spec, length, k, temporal_clips)
                                      for k in range(temporal_clips)]).tolist())

        def needed_from(frame: int, first_window: int) -> bool:
            """Whether a window from `first_window` on samples `frame`."""
            lowest = max(first_window, math.ceil((frame - length + 1) / step))
            return any(frame - k * step in sampled for k in range(lowest, frame // step + 1))

        frames: dict[int, np.ndarray] = {}
        heap = HeapTrimmer()  # freed frame buffers back to the OS: glibc's heap otherwise creeps with length
        pending = 0  # the next window to emit; it ends at frame pending * step + length - 1
        count = 0
        try:
            for count, frame in enumerate(container.decode(stream), start=1):
                heap.tick()
                index = count - 1
                if index < length or needed_from(index, pending):
                    frames[index] = frame_to_rgb(frame)  # the evaluation reader's conversion: the same pixels
                if index == pending * step + length - 1:  # window `pending` has all its frames
                    start = pending * step
                    yield Window(pending, start, length, fps), _views(frames, start, length, spec, temporal_clips,
                                                                     spatial_crops)
                    pending += 1
                    for kept in [f for f in frames if not needed_from(f, pending)]:
                        del frames[kept]
        except av.error.FFmpegError as exc:
            raise CorruptSample(f"decode failed at frame {count}: {exc}") from exc
        if count == 0:
            raise CorruptSample("has no decodable frames")
        if count < length:  # shorter than one window: the whole video is the one window
            yield Window(0, 0, count, fps), _views(frames, 0, count, spec, temporal_clips, spatial_crops)


def _views(frames: dict[int, np.ndarray], start: int, length: int, spec: ClipSpec, temporal_clips: int,
           spatial_crops: int) -> torch.Tensor:
    _, views = read_eval_views(_BufferedWindowReader(frames, start, length), spec, temporal_clips, spatial_crops)
    return torch.stack([view for row in views for view in row])  # (V, C, T, S, S)


def score_windows(windows: Iterator[tuple[Window, torch.Tensor]], score_clips: ScoreClips,
                  batch_views: int = 8) -> Iterator[tuple[Window, torch.Tensor]]:
    """(window, probabilities (num_classes,): the mean over its views), scoring several windows' views per call
    (at least `batch_views` views) so a small model is not run one view at a time."""
    pending: list[tuple[Window, torch.Tensor]] = []

    def flush() -> Iterator[tuple[Window, torch.Tensor]]:
        probs = score_clips(torch.cat([views for _, views in pending]))
        offset = 0
        for window, views in pending:
            yield window, probs[offset:offset + len(views)].mean(dim=0)
            offset += len(views)
        pending.clear()

    for item in windows:
        pending.append(item)
        if sum(len(views) for _, views in pending) >= batch_views:
            yield from flush()
    if pending:
        yield from flush()


@dataclass(frozen=True)
class Segment:
    label: int
    start_s: float
    end_s: float
    score: float


def merge_segments(windows: Sequence[Window], top1: Sequence[int], top1_scores: Sequence[float],
                   stride_frames: int) -> list[Segment]:
    """Consecutive windows with the same top-1 class as one segment (the rule in the module docstring)."""
    if not windows:
        return []
    spans = []
    for k, window in enumerate(windows):
        half = min(stride_frames, window.length) / 2
        centre = window.start + window.length / 2
        begin = window.start if k == 0 else centre - half
        end = window.start + window.length if k == len(windows) - 1 else centre + half
        spans.append((begin / window.fps, end / window.fps))
    segments: list[Segment] = []
    first = 0
    for k in range(1, len(windows) + 1):
        if k == len(windows) or top1[k] != top1[first]:
            scores = top1_scores[first:k]
            segments.append(Segment(top1[first], spans[first][0], spans[k - 1][1], float(sum(scores) / len(scores))))
            first = k
    return segments


def topk_columns(top_k: int) -> list[str]:
    """label, score, label_2, score_2, ... label_k, score_k."""
    return ["label", "score"] + [f"{name}_{r}" for r in range(2, top_k + 1) for name in ("label", "score")]


def topk_cells(probs: torch.Tensor, classes: Sequence[str], top_k: int) -> list[str]:
    top = probs.topk(min(top_k, len(probs)))
    cells = []
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        cells += [classes[i], f"{p:.6f}"]
    return cells


@dataclass
class LongVideoResult:
    windows: int
    segments: list[Segment]
    window_frames: int
    stride_frames: int
    fps: float


def check_smooth(smooth: int) -> None:
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"smoothing over {smooth} windows: give an odd number >= 1 (1: no smoothing)")


def smooth_windows(table: np.ndarray, smooth: int) -> np.ndarray:
    """(windows, classes) probabilities -> the mean over the `smooth` windows centred on each (fewer at the
    ends, where the centred run would leave the video)."""
    check_smooth(smooth)
    half = smooth // 2
    sums = np.concatenate([np.zeros((1, table.shape[1]), dtype=np.float64), np.cumsum(table, axis=0, dtype=np.float64)])
    first = np.clip(np.arange(len(table)) - half, 0, len(table))
    end = np.clip(np.arange(len(table)) + half + 1, 0, len(table))
    return ((sums[end] - sums[first]) / (end - first)[:, None]).astype(np.float32)


def predict_long_video(path: str | Path, out: Path, window: Span, stride: Span, spec: ClipSpec,
                       score_clips: ScoreClips, classes: Sequence[str], temporal_clips: int, spatial_crops: int,
                       top_k: int = 5, progress=None, smooth: int = 1) -> LongVideoResult:
    """Score every window of the video at `path` and write out/windows.csv, out/segments.csv and
    out/timeline.png. `progress`: wraps the window iterator (a progress bar). `smooth`: segments from the mean
    probabilities of that many windows centred on each (odd; 1: each window's own). Raises CorruptSample."""
    check_smooth(smooth)  # before any decoding
    out.mkdir(parents=True, exist_ok=True)
    scored = score_windows(window_views(path, window, stride, spec, temporal_clips, spatial_crops), score_clips)
    windows: list[Window] = []
    # Per-window probabilities for the timeline: a few numbers per window, float16 to keep hours of video small.
    probs_rows: list[np.ndarray] = []
    with open(out / "windows.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["start_s", "end_s"] + topk_columns(min(top_k, len(classes))))
        for item, probs in (progress(scored) if progress else scored):
            writer.writerow([f"{item.start_s:.3f}", f"{item.end_s:.3f}"] + topk_cells(probs, classes, top_k))
            windows.append(item)
            probs_rows.append(probs.numpy().astype(np.float16))
    table = smooth_windows(np.stack(probs_rows).astype(np.float32), smooth)  # (windows, classes)
    top1 = table.argmax(axis=1).tolist()
    stride_frames = stride.frames(windows[0].fps)
    segments = merge_segments(windows, top1, table.max(axis=1).tolist(), stride_frames)
    with open(out / "segments.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "start_s", "end_s", "score"])
        for segment in segments:
            writer.writerow([classes[segment.label], f"{segment.start_s:.3f}", f"{segment.end_s:.3f}",
                             f"{segment.score:.6f}"])
    title = Path(path).name + (f" (mean of {smooth} windows)" if smooth > 1 else "")
    plot_timeline(windows, table, segments, classes, out / "timeline.png", title)
    return LongVideoResult(len(windows), segments, windows[0].length, stride_frames, windows[0].fps)


def plot_timeline(windows: Sequence[Window], table: np.ndarray, segments: Sequence[Segment],
                  classes: Sequence[str], path: Path, title: str, max_lines: int = 10,
                  truth: Sequence[Segment] = ()) -> None:
    """Class probabilities over time (at each window's centre) for the classes that are ever top-1 (at most
    `max_lines`, the highest peaks first), with the segments as a coloured band above them (and, where the
    true segments are known, a band of those above that, in the same colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = np.array([(w.start_s + w.end_s) / 2 for w in windows])
    shown = sorted(set(table.argmax(axis=1).tolist()), key=lambda c: -table[:, c].max())[:max_lines]
    shown += [s.label for s in truth if s.label not in shown]
    colours = {c: plt.get_cmap("tab10")(k % 10) for k, c in enumerate(shown)}
    bands = [("truth", truth)] if truth else []
    bands.append(("segments", segments))
    fig, axes = plt.subplots(len(bands) + 1, 1, figsize=(12, 4.5 + 0.6 * (len(bands) - 1)), sharex=True,
                             gridspec_kw={"height_ratios": [1] * len(bands) + [6]})
    for band, (name, spans) in zip(axes, bands):
        for segment in spans:
            band.axvspan(segment.start_s, segment.end_s, color=colours.get(segment.label, "grey"), alpha=0.8)
        band.set_yticks([])
        band.set_ylabel(name, rotation=0, ha="right", va="center")
    lines = axes[-1]
    axes[0].set_title(f"{title}: {len(windows)} windows, {len(segments)} segments")
    for c in shown:
        lines.plot(centres, table[:, c], color=colours[c], label=classes[c], marker="." if len(windows) < 60 else None)
    lines.set_ylim(0, 1)
    lines.set_xlim(windows[0].start_s, windows[-1].end_s)
    lines.set_xlabel("time (s)")
    lines.set_ylabel("probability")
    lines.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
