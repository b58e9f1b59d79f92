"""Re-encoding one source (video file or frames folder) into the shard format, in memory, with PyAV.

The frames go through FFmpeg's own filters (transpose for rotated phones, `fps` for variable or other
frame rates, `scale` to the short side) so the result matches what the `ffmpeg` CLI would produce with the
same settings; only the choice of settings and the failure reporting are ours. Memory per call is one
decoded frame plus the encoded output of one video.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from actionrec.shards.layouts import Source, is_image_name, natural_sort_key

FORMATS = ("mp4", "jpg")


class UnpackableSource(Exception):
    """The source cannot be packed; str(err) is the reason recorded in dataset.json."""


FPS_MODES = ("cap", "exact")
X264_TUNES = ("none", "fastdecode", "film", "animation", "grain", "stillimage", "zerolatency")


@dataclass(frozen=True)
class EncodeSettings:
    format: str = "mp4"  # "mp4" (H.264) or "jpg" (one JPEG per frame)
    short_side: int = 256  # target short side; smaller sources are not upscaled
    fps: float = 30.0  # the frame-rate cap (fps_mode "cap") or every output's exact rate (fps_mode "exact")
    # "cap": a source above `fps` is down-sampled to `fps`, one at or below it keeps its own rate (no
    # duplicated frames); "exact": every video is re-timed to `fps`, repeating frames of slower sources.
    fps_mode: str = "cap"
    # The defaults (format v2) come from benchmarks/bench_encoding.py (docs/loader.md): against v1's GOP 16
    # with the preset's B-frames, crf 23 and no tune, an 8 x 224^2 TSN training clip costs 3.0x to 4.4x less
    # CPU, depending on the content, for 1.6x to 2.4x the bytes at a PSNR to the source from -1.3 to +0.2 dB
    # (tables by content type in docs/loader.md).
    gop: int = 4  # frames per keyframe interval (fixed, no scene-cut keyframes): a needed frame is <= 3 decodes away
    crf: int = 24
    preset: str = "veryfast"
    tune: str = "fastdecode"  # x264 tune ("fastdecode": no CABAC, no deblocking, no weighted prediction; "none")
    bframes: int | None = 0  # consecutive B-frames (None: the preset's choice, 3 for veryfast)
    jpeg_quality: int = 90

    def __post_init__(self):
        object.__setattr__(self, "fps", float(self.fps))  # 30 and 30.0 are the same setting on resume
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.fps_mode not in FPS_MODES:
            raise ValueError(f"fps_mode must be one of {FPS_MODES}, got {self.fps_mode!r}")
        if self.short_side < 2 or self.fps <= 0 or self.gop < 1:
            raise ValueError("short_side must be >= 2, fps > 0 and gop >= 1")
        if not 0 <= self.crf <= 51 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError("crf must be in [0, 51] and jpeg_quality in [1, 100]")
        if self.tune not in X264_TUNES:
            raise ValueError(f"tune must be one of {X264_TUNES}, got {self.tune!r}")
        if self.bframes is not None and not 0 <= self.bframes <= 16:
            raise ValueError(f"bframes must be in [0, 16], got {self.bframes}")

    @property
    def rate(self) -> Fraction:
        return Fraction(self.fps).limit_denominator(1001)

    def output_rate(self, source_rate: Fraction | None) -> Fraction:
        """The packed video's frame rate for a source of `source_rate` (None: unknown, e.g. frames folders)."""
        if self.fps_mode == "exact" or not source_rate or source_rate <= 0:
            return self.rate
        return min(self.rate, Fraction(source_rate).limit_denominator(1001))


@dataclass
class EncodedVideo:
    fields: dict[str, bytes]  # {"mp4": ...} or {"000.jpg": ..., "001.jpg": ...}
    num_frames: int
    width: int
    height: int
    fps: float

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.fields.values())


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Scale so the short side is `short_side` (never upscaling), both sides even (yuv420p needs it)."""
    short = min(width, height)
    target = max(2, min(short_side, short) // 2 * 2)
    scale = target / short
    new_w = max(2, round(width * scale / 2) * 2)
    new_h = max(2, round(height * scale / 2) * 2)
    return new_w, new_h


def rotation_filters(rotation: int) -> list[tuple[str, str]]:
    """Filters that turn a frame stored with a display-matrix rotation upright (like ffmpeg's autorotate).
    `rotation` is PyAV's VideoFrame.rotation: degrees counter-clockwise."""
    turn = rotation % 360
    if turn == 90:
        return [("transpose", "cclock")]
    if turn == 270:
        return [("transpose", "clock")]
    if turn == 180:
        return [("hflip", ""), ("vflip", "")]
    return []


def encode_source(source: Source, settings: EncodeSettings) -> EncodedVideo:
    """Decode, convert and re-encode one source; raises UnpackableSource with the reason."""
    if source.kind == "frames":
        rate = settings.rate  # frames folders carry no timing of their own
        frames = _frames_from_folder(source.path, rate)
    else:
        _check_readable(source.path)
        frames, source_rate = _frames_from_video(source)
        rate = settings.output_rate(source_rate)
    sink = _FrameSink(settings, rate)
    for frame in frames:
        sink.add(frame)
    return sink.finish()


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        if os.path.islink(path):
            raise UnpackableSource(f"unreadable: dangling symlink to {os.readlink(path)}")
        raise UnpackableSource("unreadable: file not found")
    if os.path.isdir(path):
        raise UnpackableSource("unreadable: a folder, not a video file")
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as err:
        raise UnpackableSource(f"unreadable: {err.strerror or err}") from None
    if not head:
        raise UnpackableSource("empty file (0 bytes)")


class _FrameSink:
    """Filter graph (rotate, fps, scale, pixel format) feeding the encoder; built on the first frame
    because the rotation and the size are only known from decoded frames. `rate` is the output frame rate:
    at the source's own rate the fps filter passes every frame through once (and makes variable-rate
    sources constant-rate)."""

    def __init__(self, settings: EncodeSettings, rate: Fraction):
        self.settings = settings
        self.rate = rate
        self.graph = None
        self.encoder = None
        self.jpegs: list[bytes] = []
        self.num_frames = 0

    def add(self, frame: av.VideoFrame | None) -> None:
        if self.graph is None:
            self._build(frame)
        self.graph.vpush(frame)
        while True:
            try:
                out = self.graph.vpull()
            except (av.BlockingIOError, av.EOFError):
                return
            self._encode(out)

    def _build(self, first: av.VideoFrame) -> None:
        rotation = rotation_filters(first.rotation)
        width, height = first.width, first.height
        if rotation and rotation[0][0] == "transpose":
            width, height = height, width
        self.width, self.height = output_size(width, height, self.settings.short_side)
        pix_fmt = "yuv420p" if self.settings.format == "mp4" else "rgb24"
        graph = av.filter.Graph()
        chain = [graph.add_buffer(width=first.width, height=first.height, format=first.format,
                                  time_base=first.time_base)]
        for name, args in [*rotation, ("fps", f"fps={self.rate}"),
                           ("scale", f"{self.width}:{self.height}"), ("format", pix_fmt)]:
            chain.append(graph.add(name, args))
        chain.append(graph.add("buffersink"))
        graph.link_nodes(*chain).configure()
        self.graph = graph
        if self.settings.format == "mp4":
            self.buffer = io.BytesIO()
            self.container = av.open(self.buffer, "w", format="mp4")
            options = {"crf": str(self.settings.crf), "preset": self.settings.preset,
                       "sc_threshold": "0", "keyint_min": str(self.settings.gop)}
            if self.settings.tune != "none":
                options["tune"] = self.settings.tune
            if self.settings.bframes is not None:
                options["x264-params"] = f"bframes={self.settings.bframes}"
            stream = self.container.add_stream("libx264", rate=self.rate, options=options)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.codec_context.gop_size = self.settings.gop
            stream.codec_context.thread_count = 1  # parallelism comes from --workers processes
            self.encoder = stream

    def _encode(self, frame: av.VideoFrame) -> None:
        if self.encoder is not None:
            frame.pts = self.num_frames
            frame.time_base = 1 / self.rate
            self.container.mux(self.encoder.encode(frame))
        else:
            out = io.BytesIO()
            frame.to_image().save(out, format="JPEG", quality=self.settings.jpeg_quality)
            self.jpegs.append(out.getvalue())
        self.num_frames += 1

    def finish(self) -> EncodedVideo:
        if self.graph is None:
            raise UnpackableSource("no decodable frames")
        self.add(None)  # flush: the fps filter emits its last frames at end of stream
        if self.num_frames == 0:
            raise UnpackableSource("no frames after conversion to the target frame rate")
        if self.encoder is not None:
            self.container.mux(self.encoder.encode(None))
            self.container.close()
            fields = {"mp4": self.buffer.getvalue()}
        else:
            digits = max(3, len(str(self.num_frames - 1)))
            fields = {f"{i:0{digits}d}.jpg": data for i, data in enumerate(self.jpegs)}
        return EncodedVideo(fields, self.num_frames, self.width, self.height, float(self.rate))


def _frames_from_video(source: Source):
    """(decoded frames of the first video stream, its average frame rate or None): audio and other streams
    are never decoded, frames are trimmed to [start, end) when given. Raises UnpackableSource for files
    FFmpeg cannot read or that end early."""
    try:
        container = av.open(source.path)
    except av.error.InvalidDataError as err:
        kind = _container_signature(source.path)
        what = f"corrupt or truncated {kind}" if kind else "not a video"
        raise UnpackableSource(f"{what}: FFmpeg cannot parse it ({_ffmpeg_message(err)})") from None
    except av.error.EOFError:
        raise UnpackableSource("corrupt or truncated: the file ends before any video data") from None
    except (av.FFmpegError, OSError) as err:
        raise UnpackableSource(f"unreadable: {_ffmpeg_message(err)}") from None
    if not container.streams.video:
        container.close()
        raise UnpackableSource("no video stream (audio-only, or a container without video frames)")
    stream = container.streams.video[0]
    stream.thread_count = 1
    declared = stream.frames
    trimmed = source.start is not None

    def frames():
        decoded = 0
        try:
            if trimmed and source.start > 0:
                container.seek(int(source.start / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if trimmed:
                    if frame.time is not None and frame.time < source.start:
                        continue
                    if source.end is not None and frame.time is not None and frame.time >= source.end:
                        break
                decoded += 1
                yield frame
        except av.FFmpegError as err:
            raise UnpackableSource(f"corrupt or truncated: decoding failed after {decoded} frames "
                                   f"({_ffmpeg_message(err)})") from None
        finally:
            container.close()
        # A file cut short (an interrupted download) decodes fine up to the cut; the container header
        # still knows how many frames there should be. Packing the stub would silently shorten the video.
        if not trimmed and declared and decoded < declared - 1:
            raise UnpackableSource(f"truncated: decoded {decoded} of the {declared} frames its header lists")

    return frames(), stream.average_rate or stream.guessed_rate


def _frames_from_folder(folder: str, rate: Fraction):
    """Frames folders carry no timing: frame i is shown at i / fps, so none are dropped or repeated."""
    names = sorted((e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name)),
                   key=natural_sort_key)
    if not names:
        raise UnpackableSource("no frame images in the folder")

    def frames():
        size = None
        for index, name in enumerate(names):
            try:
                with Image.open(Path(folder) / name) as image:
                    image = image.convert("RGB")
            except (OSError, Image.DecompressionBombError) as err:
                raise UnpackableSource(f"corrupt frame image {name}: {err}") from None
            if size is None:
                size = image.size
            elif image.size != size:  # the filter graph has one input size; extraction tools rarely vary
                image = image.resize(size, Image.BICUBIC)
            frame = av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")
            frame.pts, frame.duration = index, 1  # the duration lets the fps filter keep the last frame
            frame.time_base = 1 / rate
            yield frame

    return frames()


def _container_signature(path: str) -> str | None:
    """Name of the container a file's first bytes announce, to tell a damaged video from a non-video."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] == b"ftyp":
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    return None


def _ffmpeg_message(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)
