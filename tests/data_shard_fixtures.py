"""Small shard sets for the loader tests, packed by the real packer (actionrec.shards.pack_videos) from
source videos whose frames say which frame they are.

Frame i of every source video is a flat grey image of value `frame_value(i)`, so after packing, decoding,
resizing and cropping, the mean pixel value still names the frame (`index_from_pixels`).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import webdataset as wds

from actionrec.shards import EncodeSettings, PackOptions, pack_videos, sample_key

MAX_FRAMES = 80
FPS = 25


def frame_value(index: int) -> int:
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"test videos have at most {MAX_FRAMES} frames")
    return 10 + 3 * index


def index_from_pixels(frames: torch.Tensor) -> list[int]:
    """(C, T, H, W) or (T, ..., H, W) clip -> frame index per t, from the mean grey level."""
    if frames.dim() == 4 and frames.shape[0] == 3:
        frames = frames.transpose(0, 1)  # (T, C, H, W)
    return [round((float(frame.float().mean()) - 10) / 3) for frame in frames]


@dataclass(frozen=True)
class Video:
    relpath: str  # class/name.mp4 under the source folder
    label: int
    num_frames: int
    split: str

    @property
    def key(self) -> str:
        return sample_key(self.relpath)


def make_videos(classes: list[str], per_class: int, frame_counts: list[int], split: str, offset: int = 0) -> list[Video]:
    return [
        Video(f"{name}/clip {j + offset:03d}.mp4", c, frame_counts[(c * per_class + j + offset) % len(frame_counts)], split)
        for c, name in enumerate(classes)
        for j in range(per_class)
    ]


def write_source_video(path: Path, num_frames: int, width: int = 64, height: int = 48) -> None:
    """An H.264 source file at FPS whose frame i is flat grey frame_value(i)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "8", "preset": "veryfast"}
        for i in range(num_frames):
            image = np.full((height, width, 3), frame_value(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pack_test_shards(out: Path, videos: list[Video], fmt: str = "mp4", shard_bytes: int = 256 * 2**20,
                     sources: Path | None = None) -> Path:
    """Source videos -> shards with the real packer, splits as given by each Video (via a split CSV).

    shard_bytes=1024 gives one video per shard (the packer's minimum shard size); the default one shard per split.
    """
    sources = sources or out.parent / f"{out.name}-sources"
    for video in videos:
        if not (sources / video.relpath).exists():
            write_source_video(sources / video.relpath, video.num_frames)
    split_csv = out.parent / f"{out.name}-split.csv"
    with open(split_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "label", "split"])
        for video in videos:
            writer.writerow([video.relpath, video.relpath.split("/")[0], video.split])
    # crf 12: the grey levels that number the frames must survive the packer's re-encode to +-1
    options = PackOptions(encode=EncodeSettings(format=fmt, short_side=48, fps=FPS, crf=12, jpeg_quality=95),
                          split_csv=str(split_csv), shard_bytes=shard_bytes, workers=0)
    result = pack_videos(sources, out, options, progress=False, log=lambda line: None)
    assert not result.skipped, result.skipped
    return out


def replicate_shards(shard_dir: Path, out: Path, copies: int, pad_bytes: int = 0) -> Path:
    """The packed train samples `copies` times under new keys: the same videos, a data set `copies` x larger.
    pad_bytes > 0 adds a field of that many random bytes to every sample (the loader reads and ignores it)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((shard_dir / "dataset.json").read_text())
    names = []
    for copy in range(copies):
        for shard in manifest["splits"]["train"]["shards"]:
            names.append(f"train-{len(names):06d}.tar")
            with wds.TarWriter(str(out / names[-1])) as sink:
                for sample in wds.WebDataset(str(shard_dir / shard), shardshuffle=False):
                    fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                    if pad_bytes:
                        fields["pad"] = os.urandom(pad_bytes)
                    sink.write({**fields, "__key__": f"{sample['__key__']}-copy{copy}"})
    train = manifest["splits"]["train"]
    manifest["splits"] = {"train": {**train, "shards": names, "num_samples": train["num_samples"] * copies}}
    (out / "dataset.json").write_text(json.dumps(manifest))
    return out


CORRUPTIONS = ("garbage_mp4", "truncated_mp4", "no_cls", "bad_label", "bad_jpg")


def corrupt_samples(shard_dir: Path, damage: dict[str, str]) -> None:
    """Rewrite packed shards with the samples named in `damage` (key -> one of CORRUPTIONS) broken, as a
    disk error or a hand-edited shard would leave them."""
    for tar in sorted(shard_dir.glob("*.tar")):
        samples = list(wds.WebDataset(str(tar), shardshuffle=False))
        if not any(s["__key__"] in damage for s in samples):
            continue
        temp = tar.with_name(f".{tar.name}.tmp")
        with wds.TarWriter(str(temp)) as sink:
            for sample in samples:
                fields = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
                _damage(fields, damage.get(sample["__key__"]))
                sink.write(fields)
        os.replace(temp, tar)


def _damage(fields: dict, kind: str | None) -> None:
    if kind is None:
        return
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {CORRUPTIONS}")
    if kind == "garbage_mp4":
        fields["mp4"] = bytes(np.random.default_rng(0).integers(0, 256, len(fields["mp4"]), dtype=np.uint8))
    elif kind == "truncated_mp4":
        fields["mp4"] = fields["mp4"][: len(fields["mp4"]) // 3]
    elif kind == "no_cls":
        del fields["cls"]
    elif kind == "bad_label":
        fields["cls"] = b"999"
    elif kind == "bad_jpg":
        first = sorted(name for name in fields if name.endswith(".jpg"))[0]
        fields[first] = b"not a jpeg"
