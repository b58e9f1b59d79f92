"""Which frames of a video make a clip: TSN-style uniform segments or dense strided windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Sampling = Literal["uniform", "dense"]


@dataclass(frozen=True)
class ClipSpec:
    """What one clip is: `num_frames` frames of `size` x `size` pixels.

    sampling="uniform" splits the whole video into `num_frames` equal segments and takes one frame from each
    (TSN; a random frame per segment in training, evenly spaced positions for the eval views).
    sampling="dense" takes `num_frames` frames `frame_stride` apart from one window (random start in training,
    windows evenly spaced over the video for the eval views).
    eval_short_side: short side the eval frames are resized to before the centre crop (default size * 8/7,
    i.e. 256 for 224).
    """

    num_frames: int = 8
    sampling: Sampling = "uniform"
    frame_stride: int = 4
    size: int = 224
    eval_short_side: int | None = None

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "dense"):
            raise ValueError(f"ClipSpec.sampling must be 'uniform' or 'dense', got {self.sampling!r}")
        if self.num_frames < 1 or self.frame_stride < 1 or self.size < 1:
            raise ValueError(
                f"ClipSpec needs num_frames, frame_stride and size >= 1, got "
                f"{self.num_frames}, {self.frame_stride}, {self.size}"
            )
        if self.eval_short_side is not None and self.eval_short_side < self.size:
            raise ValueError(
                f"ClipSpec.eval_short_side ({self.eval_short_side}) must be >= size ({self.size}) for a centre crop"
            )

    @property
    def resolved_eval_short_side(self) -> int:
        return self.eval_short_side if self.eval_short_side is not None else round(self.size * 8 / 7)


def train_frame_indices(spec: ClipSpec, num_video_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Random clip for training: (num_frames,) int64 indices into the video, sorted."""
    n = _check_length(num_video_frames)
    t = spec.num_frames
    if spec.sampling == "uniform":
        segment = n / t
        offsets = rng.random(t)
        indices = np.floor((np.arange(t) + offsets) * segment)
    else:
        span = (t - 1) * spec.frame_stride + 1
        start = rng.integers(0, max(n - span, 0) + 1)
        indices = start + np.arange(t) * spec.frame_stride
    return np.clip(indices, 0, n - 1).astype(np.int64)


def eval_frame_indices(spec: ClipSpec, num_video_frames: int, view: int, num_views: int) -> np.ndarray:
    """Temporal view `view` of `num_views`, evenly spaced and deterministic: (num_frames,) int64 indices."""
    n = _check_length(num_video_frames)
    t = spec.num_frames
    if not 0 <= view < num_views:
        raise ValueError(f"temporal view {view} out of range for {num_views} views")
    if spec.sampling == "uniform":
        segment = n / t
        # view k of N sits at (k + 0.5) / N inside each segment; one view = segment centres (TSN test).
        indices = np.floor((np.arange(t) + (view + 0.5) / num_views) * segment)
    else:
        span = (t - 1) * spec.frame_stride + 1
        slack = max(n - span, 0)
        # SlowFast convention: one view = centre window, N views = windows from first to last start.
        start = slack / 2 if num_views == 1 else slack * view / (num_views - 1)
        indices = math.floor(start) + np.arange(t) * spec.frame_stride
    return np.clip(indices, 0, n - 1).astype(np.int64)


def _check_length(num_video_frames: int) -> int:
    if num_video_frames < 1:
        raise ValueError(f"video has {num_video_frames} frames; need at least 1")
    return int(num_video_frames)
