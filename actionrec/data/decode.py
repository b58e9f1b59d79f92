"""Decode only the frames a clip needs, from the sample's in-memory bytes (never a temp file).

Backends: PyAV (self-contained wheel with its own FFmpeg) and torchcodec (needs the system's FFmpeg shared
libraries). The default, `decoder="auto"`, is PyAV: its reader decodes only GOP prefixes and skips unused
non-reference frames, and costs less CPU per training clip than torchcodec on every encoding measured in
benchmarks/bench_encoding.py (old GOP 16 shards and the v2 default alike). Both give identical pixels and
stay selectable by name. jpg-format samples decode only the chosen frames. Every decoder runs one FFmpeg
thread by default: the loader's parallelism is its worker processes.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
from av.video.reformatter import VideoReformatter
import torch
from PIL import Image

logger = logging.getLogger(__name__)

DecoderName = Literal["auto", "pyav", "torchcodec"]
_JPG_FIELD = re.compile(r"^\d+\.jpg$")


@dataclass(frozen=True)
class Decoder:
    """A backend with libavcodec settings; `build_*_loader(decoder=Decoder(...))` takes it where a name would
    go. skip_loop_filter skips H.264 deblocking (faster on deblocked streams, slightly different pixels;
    PyAV only: torchcodec does not expose it). threads > 1 adds FFmpeg threads per worker (thread_type
    "slice" or "frame"); the loader's parallelism is normally its worker processes."""

    backend: Literal["pyav", "torchcodec"]
    skip_loop_filter: bool = False
    threads: int = 1
    thread_type: Literal["slice", "frame"] = "slice"

    def __post_init__(self) -> None:
        if self.backend not in ("pyav", "torchcodec"):
            raise ValueError(f"Decoder backend must be 'pyav' or 'torchcodec', got {self.backend!r}")
        if self.skip_loop_filter and self.backend != "pyav":
            raise ValueError("skip_loop_filter needs the PyAV backend (torchcodec does not expose it)")
        if self.threads < 1 or self.thread_type not in ("slice", "frame"):
            raise ValueError(f"Decoder threads must be >= 1 and thread_type 'slice' or 'frame', got "
                             f"{self.threads}, {self.thread_type!r}")


class CorruptSample(Exception):
    """A sample whose fields cannot be read; the loader skips and counts it."""


class FrameReader:
    """Frames of one sample; use as a context manager so decoder resources are freed with the sample."""

    num_frames: int
    frame_size: tuple[int, int] = (0, 0)  # mp4 readers: (height, width) from the container's headers

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames at `indices` (sorted or not, repeats allowed) as uint8 (T, 3, H, W)."""
        raise NotImplementedError

    def header_size(self, indices: Sequence[int]) -> tuple[int, int]:
        """(height, width) of the frames at `indices` from the headers alone, without decoding them
        (decode_on=device: the worker ships it, the training process holds the decoded frames to it)."""
        height, width = self.frame_size
        if height < 1 or width < 1:
            raise CorruptSample(f"mp4 header gives a {width}x{height} frame size")
        return height, width

    def close(self) -> None:
        """Release decoder resources (nothing to release by default)."""

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@functools.cache
def torchcodec_load_error() -> str | None:
    """None when torchcodec and its FFmpeg libraries load in this process, else the reason."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as exc:  # torchcodec raises RuntimeError/OSError variants when libavcodec is missing
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def resolve_decoder(name: DecoderName | Decoder) -> str | Decoder:
    """The backend for `name`, picked in the main process: 'auto' is PyAV (always available).
    Logs once per process which backend decodes and why. A Decoder (backend plus settings) is checked and
    passed through."""
    if isinstance(name, Decoder):
        if name.backend == "torchcodec" and torchcodec_load_error() is not None:
            raise RuntimeError(f"Decoder backend 'torchcodec' cannot load ({torchcodec_load_error()}); use 'pyav'")
        _log_choice(name.backend, f"{name} was asked for")
        return name
    if name not in ("auto", "pyav", "torchcodec"):
        raise ValueError(f"decoder must be 'auto', 'pyav' or 'torchcodec', got {name!r}")
    if name == "torchcodec" and torchcodec_load_error() is not None:
        raise RuntimeError(
            f"decoder='torchcodec' but torchcodec cannot load ({torchcodec_load_error()}); install FFmpeg shared "
            "libraries (e.g. apt-get install ffmpeg) or use decoder='pyav' or 'auto'"
        )
    backend, reason = _choose_backend(name)
    _log_choice(backend, reason)
    return backend


def _choose_backend(name: DecoderName) -> tuple[str, str]:
    if name != "auto":
        return name, f"decoder={name!r} was asked for"
    return "pyav", ("decoder='auto': PyAV, less CPU per clip than torchcodec in benchmarks/bench_encoding.py "
                    "(GOP-prefix decoding)")


@functools.cache
def _log_choice(backend: str, reason: str) -> None:
    """One line per process and choice (loaders are built again for every evaluation)."""
    logger.info("decoding videos with %s (%s)", {"pyav": "PyAV", "torchcodec": "torchcodec"}[backend], reason)


class PyAVFrameReader(FrameReader):
    """H.264/mp4 bytes -> selected frames, decoding only GOP prefixes that end at a needed frame.

    The whole (compressed) sample is already in memory, so demuxing every packet up front is cheap
    (about 20 us per packet) and gives exact frame numbering (sorted presentation timestamps) and the
    keyframe positions. A needed frame then costs decoding from its GOP's keyframe to that frame (in
    decode order), then the decoder is drained and reset for the next needed GOP; GOPs with no needed
    frame are never sent to the decoder (the in-memory equivalent of a seek, without the demuxer's seek
    path, which measured slower than decoding straight through). Non-reference frames (B-frames nothing
    depends on) that the clip does not use are skipped by the decoder (`skip_frame`). Frames are
    bit-identical to decoding the whole video.
    """

    def __init__(self, data: bytes, settings: Decoder = Decoder("pyav")):
        try:
            self._container = av.open(io.BytesIO(data), mode="r")
            stream = self._container.streams.video[0]
        except (av.error.FFmpegError, IndexError) as exc:
            raise CorruptSample(f"mp4 does not open as a video: {exc}") from exc
        self._codec = stream.codec_context
        self.frame_size = (self._codec.height, self._codec.width)
        self._codec.thread_count = settings.threads
        if settings.threads > 1:
            self._codec.thread_type = settings.thread_type.upper()
        if settings.skip_loop_filter:
            self._codec.options = {"skip_loop_filter": "all"}  # read when the codec opens, at the first decode
        try:
            self._packets = [p for p in self._container.demux(stream) if p.size > 0]
        except av.error.FFmpegError as exc:
            raise CorruptSample(f"mp4 demux failed: {exc}") from exc
        if not self._packets or any(p.pts is None for p in self._packets):
            raise CorruptSample("mp4 has no video packets with timestamps")
        self._pts_sorted = sorted(p.pts for p in self._packets)
        self.num_frames = len(self._packets)
        self._gops = _split_gops(self._packets)
        self._gop_of = {p.pts: g for g, gop in enumerate(self._gops) for p in gop}  # pts -> GOP holding it

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        wanted = {self._pts_sorted[i]: i for i in set(int(i) for i in indices)}
        frames: dict[int, np.ndarray] = {}
        gops = self._gops
        needed = {self._gop_of[pts] for pts in wanted}
        # Open-GOP streams: frames shown before their keyframe reference the previous GOP, which is then
        # decoded whole and straight into this one.
        feeds_next = set()
        for g in list(needed):
            key_pts = gops[g][0].pts
            if g > 0 and any(pts < key_pts and self._gop_of[pts] == g for pts in wanted):
                needed.add(g - 1)
                feeds_next.add(g - 1)
        try:
            for g in sorted(needed):
                gop = gops[g]
                # Decode order: a GOP's needed frames are out once the last needed packet is sent (and the
                # decoder drained); the rest of the GOP is never decoded.
                end = len(gop) if g in feeds_next else 1 + max(i for i, p in enumerate(gop) if p.pts in wanted)
                for packet in gop[:end]:
                    # A frame no other frame references (a non-reference B-frame) that the clip does not
                    # use is skipped by the decoder: nothing depends on it.
                    self._codec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                    for frame in self._codec.decode(packet):
                        self._keep(frame, wanted, frames)
                if g not in feeds_next:
                    self._drain(wanted, frames)
                    self._codec.flush_buffers()
                if len(frames) == len(wanted):
                    break
        except av.error.FFmpegError as exc:
            raise CorruptSample(f"H.264 decode failed: {exc}") from exc
        if len(frames) != len(wanted):
            missing = sorted(set(wanted.values()) - set(frames))
            raise CorruptSample(f"decoder produced no frame for indices {missing[:5]}")
        return self._stack(indices, frames)

    def _drain(self, wanted: dict[int, int], frames: dict[int, np.ndarray]) -> None:
        for frame in self._codec.decode(None):
            self._keep(frame, wanted, frames)

    @staticmethod
    def _keep(frame: av.VideoFrame, wanted: dict[int, int], frames: dict[int, np.ndarray]) -> None:
        index = wanted.get(frame.pts)
        if index is not None:
            frames[index] = frame_to_rgb(frame)

    @staticmethod
    def _stack(indices: Sequence[int], frames: dict[int, np.ndarray]) -> torch.Tensor:
        clip = torch.from_numpy(np.stack([frames[int(i)] for i in indices]))  # (T, H, W, 3)
        return clip.permute(0, 3, 1, 2)  # (T, 3, H, W)

    def close(self) -> None:
        self._container.close()


_THREAD_STATE = threading.local()


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a decoded frame, through one swscale context per thread, single-threaded.

    `frame.to_ndarray(format="rgb24")` builds a new swscale context for every new frame, with a thread pool
    sized to the machine's cores (PyAV's default): measured at 1.0 ms of CPU (and far more wall time on a
    loaded machine) per 456x256 frame, against 0.18 ms here, with identical pixels. The loader's parallelism is
    its worker processes, so conversion runs on one thread like decoding."""
    reformatter = getattr(_THREAD_STATE, "reformatter", None)
    if reformatter is None:
        reformatter = _THREAD_STATE.reformatter = VideoReformatter()
    return reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


def _split_gops(packets: list[av.Packet]) -> list[list[av.Packet]]:
    """Packets in decode order, cut at each keyframe."""
    gops: list[list[av.Packet]] = []
    for packet in packets:
        if packet.is_keyframe or not gops:
            gops.append([])
        gops[-1].append(packet)
    return gops


class TorchCodecFrameReader(FrameReader):
    """torchcodec's decoder on the same bytes; it does its own keyframe-aware seeking."""

    def __init__(self, data: bytes, settings: Decoder = Decoder("torchcodec")):
        from torchcodec.decoders import VideoDecoder

        try:
            # "approximate" trusts the mp4 index (exact for the constant-rate files the packer writes) and
            # skips the full scan "exact" does; frame numbering is the same for such files.
            self._decoder = VideoDecoder(
                data, seek_mode="approximate", num_ffmpeg_threads=settings.threads, dimension_order="NCHW"
            )
            num_frames = self._decoder.metadata.num_frames
            self.frame_size = (int(self._decoder.metadata.height), int(self._decoder.metadata.width))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise CorruptSample(f"mp4 does not open as a video: {exc}") from exc
        if not num_frames:
            raise CorruptSample("mp4 reports no frames")
        self.num_frames = int(num_frames)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        unique = _distinct(indices)
        try:
            batch = self._decoder.get_frames_at(unique).data  # (U, 3, H, W)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise CorruptSample(f"H.264 decode failed: {exc}") from exc
        position = {index: k for k, index in enumerate(unique)}
        return batch[[position[int(i)] for i in indices]]


def jpg_frames(sample: dict) -> dict[int, bytes]:
    """The frames of a jpg-format sample, {frame index: jpg bytes}: its `NNN.jpg` fields in numeric order."""
    names = sorted((name for name in sample if _JPG_FIELD.match(name)), key=lambda n: int(n[:-4]))
    return {index: sample[name] for index, name in enumerate(names)}


class JpegFrameReader(FrameReader):
    """Frames stored as jpg fields (see `jpg_frames`): only the chosen ones are decoded.

    `jpgs` maps a frame's index in the video to its bytes. With data.decode_on=device it holds only the
    frames a worker shipped (`jpgs_of`), still read by their index in the video; num_frames counts what it holds.
    """

    def __init__(self, jpgs: dict[int, bytes]):
        if not jpgs:
            raise CorruptSample("sample has no mp4 and no NNN.jpg frames")
        self._jpgs = jpgs
        self.num_frames = len(jpgs)

    def jpgs_of(self, indices: Sequence[int]) -> dict[int, bytes]:
        """The undecoded frames at `indices`, {frame index: jpg bytes}."""
        return {i: self._jpgs[i] for i in _distinct(indices)}

    def header_size(self, indices: Sequence[int]) -> tuple[int, int]:
        sizes = set()
        for i in _distinct(indices):
            with _open_jpg(i, self._jpgs[i]) as image:  # Pillow reads the header only
                sizes.add((image.height, image.width))
        return _one_size(sizes)

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        # Pillow (libjpeg-turbo) rather than torchvision.io.decode_jpeg, which torchvision 0.29 deprecates.
        decoded = {}
        for i in _distinct(indices):
            with _open_jpg(i, self._jpgs[i]) as image:
                decoded[i] = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
        _one_size({tuple(frame.shape[-2:]) for frame in decoded.values()})
        return torch.stack([decoded[int(i)] for i in indices])  # (T, 3, H, W)


def _distinct(indices: Sequence[int]) -> list[int]:
    """Each frame index once, ascending: readers decode a frame once however many clips repeat it."""
    return sorted(set(int(i) for i in indices))


@contextlib.contextmanager
def _open_jpg(index: int, blob: bytes) -> Iterator[Image.Image]:
    """Frame `index` as a Pillow image (header read, pixels decoded on use); anything but a readable jpg is a
    CorruptSample. jpg only, as the packer writes: nvJPEG (decode_on=device) decodes nothing else."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.format != "JPEG":
                raise CorruptSample(f"jpg frame {index} is a {image.format}, not a jpg")
            yield image
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for broken images
        raise CorruptSample(f"jpg frame {index} does not decode as a jpg: {exc}") from exc


def _one_size(sizes: set[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) all of a sample's frames share."""
    if len(sizes) != 1:
        raise CorruptSample(f"jpg frames differ in size: {sorted(sizes)[:3]}")
    return next(iter(sizes))


def open_frame_reader(sample: dict, backend: str | Decoder) -> FrameReader:
    """The reader for one webdataset sample (fields as raw bytes): mp4 via `backend` (a resolved name or a
    Decoder), or jpg frames."""
    data = sample.get("mp4")
    if data is None:
        return JpegFrameReader(jpg_frames(sample))
    return open_mp4_reader(data, backend)


def open_mp4_reader(data: bytes, backend: str | Decoder) -> FrameReader:
    """The reader for mp4 bytes via `backend` (a resolved name or a Decoder)."""
    settings = backend if isinstance(backend, Decoder) else Decoder(backend)
    if settings.backend == "torchcodec":
        return TorchCodecFrameReader(data, settings)
    return PyAVFrameReader(data, settings)
