"""Real small media files for the shard tests, encoded with PyAV (no fixtures checked into the repo)."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def marker_frames(n: int, width: int, height: int) -> np.ndarray:
    """(n, H, W, 3) frames: grey background brightening over time, a red block in the top-left corner."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = 40 + int(150 * i / max(1, n - 1))
        frames[i, : height // 3, : width // 3] = (230, 20, 20)
    return frames


def encode_video(path: Path | None, frames: np.ndarray, fps: float = 30, *, fmt: str = "mp4",
                 codec: str = "libx264", pix_fmt: str = "yuv420p", rotation: int | None = None,
                 audio: bool = False, frame_ms: list[int] | None = None, options: dict | None = None) -> bytes:
    """Encode frames; frame_ms gives per-frame durations (variable frame rate). Returns the file bytes."""
    target = io.BytesIO() if path is None else str(path)
    with av.open(target, "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if frame_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        sound = container.add_stream("aac", rate=8000) if audio else None
        if len(frames) == 0:
            container.start_encoding()  # a real container header with a video stream and no frames
        pts = 0
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if frame_ms is not None:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += frame_ms[i]
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 8000, 0
            container.mux(sound.encode(samples))
            container.mux(sound.encode(None))
    if path is None:
        return target.getvalue()
    return Path(path).read_bytes()


def write_video(path: Path, n: int = 8, width: int = 48, height: int = 32, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(path, marker_frames(n, width, height), **kwargs)
    return path


def write_frames_folder(folder: Path, n: int, width: int = 32, height: int = 24) -> Path:
    """frame_1.jpg ... frame_N.jpg (not zero-padded: the order must come from the numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(marker_frames(n, width, height), start=1):
        Image.fromarray(image).save(folder / f"frame_{i}.jpg", quality=95)
    return folder


def decode_video(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def stream_counts(data: bytes) -> tuple[int, int]:
    """(video streams, audio streams) of an encoded file."""
    with av.open(io.BytesIO(data)) as container:
        return len(container.streams.video), len(container.streams.audio)
