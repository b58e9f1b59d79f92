"""Small shard sets in shard format v1 for the loader tests, with frames that say which frame they are.

Frame i of every test video is a flat grey image of value `frame_value(i)`, so after decoding, resizing
and cropping the mean pixel value still names the frame (`index_from_pixels`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import webdataset as wds
from PIL import Image

MAX_FRAMES = 80
FPS = 25


def frame_value(index: int) -> int:
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"test videos have at most {MAX_FRAMES} frames")
    return 10 + 3 * index


def index_from_pixels(frames: torch.Tensor) -> list[int]:
    """(..., T, H, W) with channels anywhere before T -> frame index per t, from the mean grey level."""
    means = frames.float().flatten(-2).mean(-1)  # (..., T)
    means = means.reshape(-1, means.shape[-1]).mean(0)
    return [round((float(m) - 10) / 3) for m in means]


def encode_index_video(num_frames: int, width: int, height: int, gop: int = 8) -> bytes:
    """H.264 yuv420p mp4 in memory (no temp file), constant FPS, short GOP, with B-frames."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"crf": "10", "preset": "veryfast"}
        for i in range(num_frames):
            image = np.full((height, width, 3), frame_value(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def sample_key(relpath: str) -> str:
    """Contract v1 key: lowercase path without extension, [a-z0-9_/-] only, plus 8 hex of sha1(relpath)."""
    stem = relpath.rsplit(".", 1)[0].lower()
    safe = "".join(c if c.isalnum() and c.isascii() or c in "_/-" else "_" for c in stem)
    return f"{safe}-{hashlib.sha1(relpath.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Video:
    relpath: str
    label: int
    num_frames: int


def make_videos(classes: list[str], per_class: int, frame_counts: list[int], offset: int = 0) -> list[Video]:
    videos = []
    for c, name in enumerate(classes):
        for j in range(per_class):
            n = frame_counts[(c * per_class + j + offset) % len(frame_counts)]
            videos.append(Video(f"{name}/clip {j + offset:03d}.MP4", c, n))
    return videos


def write_shard_set(
    out: Path,
    splits: dict[str, list[Video]],
    classes: list[str],
    samples_per_shard: int,
    fmt: str = "mp4",
    width: int = 64,
    height: int = 48,
    corrupt: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Write {split}-NNNNNN.tar shards + dataset.json; returns the keys per split (corrupt ones included).

    corrupt: relpath -> "garbage_mp4" | "truncated_mp4" | "no_cls" | "bad_label" makes that sample broken.
    """
    out.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    manifest_splits, keys = {}, {}
    for split, videos in splits.items():
        shard_names = []
        keys[split] = []
        for start in range(0, len(videos), samples_per_shard):
            name = f"{split}-{len(shard_names):06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for video in videos[start : start + samples_per_shard]:
                    sink.write(_sample(video, classes, fmt, width, height, corrupt.get(video.relpath)))
                    keys[split].append(sample_key(video.relpath))
            shard_names.append(name)
        manifest_splits[split] = {
            "shards": shard_names,
            "num_samples": len(videos),
            "num_frames": sum(v.num_frames for v in videos),
        }
    manifest = {
        "format_version": 1,
        "classes": classes,
        "format": fmt,
        "splits": manifest_splits,
        "per_class_counts": {s: {c: sum(v.label == i for v in vs) for i, c in enumerate(classes)} for s, vs in splits.items()},
        "pack": {"short_side": min(width, height), "fps": FPS, "gop": 8, "format": fmt},
        "skipped": [],
        "created": "2026-01-01T00:00:00",
    }
    (out / "dataset.json").write_text(json.dumps(manifest, indent=1))
    return keys


def _sample(video: Video, classes: list[str], fmt: str, width: int, height: int, corruption: str | None) -> dict:
    sample = {
        "__key__": sample_key(video.relpath),
        "cls": str(video.label if corruption != "bad_label" else len(classes) + 5).encode(),
        "json": json.dumps({
            "label": classes[video.label], "source": video.relpath, "fps": float(FPS),
            "num_frames": video.num_frames, "width": width, "height": height,
            "duration": video.num_frames / FPS, "format": fmt,
        }).encode(),
    }
    if corruption == "no_cls":
        del sample["cls"]
    if fmt == "mp4":
        data = encode_index_video(video.num_frames, width, height)
        if corruption == "garbage_mp4":
            data = bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8))
        elif corruption == "truncated_mp4":
            data = data[: len(data) // 3]
        sample["mp4"] = data
    else:
        for i in range(video.num_frames):
            encoded = io.BytesIO()
            Image.fromarray(np.full((height, width, 3), frame_value(i), dtype=np.uint8)).save(encoded, "JPEG", quality=95)
            sample[f"{i:03d}.jpg"] = encoded.getvalue()
        if corruption == "garbage_mp4":
            sample["000.jpg"] = b"not a jpeg"
    return sample
