"""data.decode_on=device: loader workers ship compressed bytes, the training process decodes on its device.

    worker:   tar sample -> label, frame count, frame size (container headers only) -> the same frame indices and
              augmentation draws (TrainParams) or evaluation views (EvalViewParams) as decode_on=worker
              -> EncodedVideo (bytes) + indices + those params
    training: one batch of EncodedVideos -> decode the union of each video's needed frames
              (jpg: nvJPEG via torchvision.io.decode_jpeg(device="cuda"), batched over the whole batch;
               mp4: NVDEC via PyNvVideoCodec where it imports; otherwise the worker path's CPU readers)
              -> crop/resize/flip/colour on the device -> the batch dict of decode_on=worker, video on the device

On a machine without CUDA the training process decodes with the same readers and transforms as the workers
would, so the batches are identical to decode_on=worker (tests/test_data_device_decode.py). Corrupt samples:
what the headers show (no label, a container that does not open or demux, jpg fields that are not jpgs or
differ in size) is skipped in the worker exactly as today; a bitstream that only fails when decoded is
skipped in the training process: its clips leave the batch (the batch is smaller, never refilled) and are
counted in `skipped`. The stream position counts the sample as consumed either way, so resume stays exact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from einops import rearrange

from actionrec.data.decode import CorruptSample, Decoder, FrameReader, JpegFrameReader, open_mp4_reader
from actionrec.data.sampling import ClipSpec
from actionrec.data.transforms import apply_eval_params, apply_train_params

logger = logging.getLogger(__name__)

DecodeOn = Literal["worker", "device"]
DECODE_ON = ("worker", "device")


@dataclass
class EncodedVideo:
    """One sample's compressed frames as shipped from a worker: the whole mp4, or only the jpg fields that
    the sample's clips need ({frame index: bytes}). Clips of one sample in one batch share the object, so a
    batch pickles each video once."""

    kind: Literal["mp4", "jpg"]
    mp4: bytes = b""
    jpgs: dict[int, bytes] | None = None
    height: int = 0
    width: int = 0


def check_decode_on(decode_on: str) -> None:
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on must be 'worker' or 'device', got {decode_on!r}")


def encode_for_device(sample: dict, reader: FrameReader, indices: np.ndarray) -> EncodedVideo:
    """The bytes of `sample` that decoding `indices` needs, with the frame size read from the headers only.
    `reader` is the sample's open FrameReader (its frame count chose the indices)."""
    height, width = reader.header_size(indices)
    if isinstance(reader, JpegFrameReader):
        return EncodedVideo("jpg", jpgs=reader.jpgs_of(indices), height=height, width=width)
    return EncodedVideo("mp4", mp4=sample["mp4"], height=height, width=width)


@functools.cache
def pynvvideocodec_load_error() -> str | None:
    """None when PyNvVideoCodec imports in this process, else the reason."""
    try:
        import PyNvVideoCodec  # noqa: F401
    except Exception as exc:  # ImportError, or OSError when the CUDA driver libraries are missing
        return f"{type(exc).__name__}: {exc}"
    return None


class DeviceBatchDecoder:
    """Turns a batch of EncodedVideos from the workers into the batch of decode_on=worker, on `device`.

    jpg on CUDA: nvJPEG, one batched call for all frames of the batch. mp4 on CUDA with PyNvVideoCodec:
    NVDEC. Anything else: the CPU readers of the workers (`backend`), in this process, then moved to `device`.
    """

    def __init__(self, device: torch.device | str, backend: str | Decoder, clip: ClipSpec):
        self.device = torch.device(device)
        self.backend = backend
        self.clip = clip
        cuda = self.device.type == "cuda"
        self.jpg_on_device = cuda
        self.mp4_on_device = cuda and pynvvideocodec_load_error() is None
        _log_decoders(str(self.device), self.jpg_on_device, self.mp4_on_device,
                      pynvvideocodec_load_error() if cuda else None)

    def decode(self, batch: dict, train: bool) -> tuple[dict, list[tuple[str, str]]]:
        """batch from a device-path worker -> (the worker path's batch, [(key, reason)] of the videos that
        failed to decode here). Evaluation drops a failed video's clips; training keeps every slot (the
        training order is fixed, epochs.py): a failed video's slots become weight-0 zeros, like padding."""
        videos: dict[int, EncodedVideo] = {}
        wanted: dict[int, set[int]] = {}
        for encoded, indices in zip(batch["encoded"], batch["frame_index"]):
            if encoded is None:  # a training padding slot
                continue
            videos[id(encoded)] = encoded
            wanted.setdefault(id(encoded), set()).update(int(i) for i in indices)
        frames, failed = self._decode_videos(videos, wanted)  # id -> {frame index: (3, H, W) uint8 on device}
        t, size = self.clip.num_frames, self.clip.size
        blank = torch.zeros(3, t, size, size, dtype=torch.uint8, device=self.device)
        keep, clips, failures = [], [], {}
        weight = batch["weight"].clone() if train else None
        skipped_clips = list(batch.get("skipped_clips", []))
        apply = apply_train_params if train else apply_eval_params  # params: TrainParams | EvalViewParams
        for n, (encoded, indices, params) in enumerate(zip(batch["encoded"], batch["frame_index"], batch["params"])):
            vid = id(encoded)
            if encoded is None or vid in failed:
                if encoded is not None:
                    failures[vid] = (batch["key"][n], failed[vid])
                if train:
                    if encoded is not None:
                        skipped_clips.append([batch["key"][n], int(batch["view"][n])])
                    weight[n] = 0.0
                    clips.append(blank)
                    keep.append(n)
                continue
            clip = torch.stack([frames[vid][int(i)] for i in indices])  # (T, 3, H, W)
            out = apply(clip, self.clip, params)  # (T, 3, S, S)
            clips.append(rearrange(out, "t c h w -> c t h w"))
            keep.append(n)
        decoded = {
            "video": torch.stack(clips) if clips else torch.empty(0, 3, t, size, size, dtype=torch.uint8,
                                                                  device=self.device),  # (B', 3, T, S, S)
            "label": batch["label"][keep],
            "key": [batch["key"][n] if weight is None or weight[n] > 0 else "" for n in keep],
            "view": batch["view"][keep],
            "frame_index": batch["frame_index"][keep],
            "skipped": batch["skipped"] + len(failures),
        }
        if train:
            decoded.update(weight=weight, skipped_clips=skipped_clips,
                           **{k: batch[k] for k in ("epoch", "global_batch", "micro", "micro_batch")})
        return decoded, list(failures.values())

    def _decode_videos(self, videos: dict[int, EncodedVideo], wanted: dict[int, set[int]]):
        frames: dict[int, dict[int, torch.Tensor]] = {}
        failed: dict[int, str] = {}
        jpg_ids = [vid for vid, v in videos.items() if v.kind == "jpg"]
        if self.jpg_on_device and jpg_ids:
            self._nvjpeg(videos, jpg_ids, wanted, frames, failed)
            todo = [vid for vid in videos if vid not in jpg_ids]
        else:
            todo = list(videos)
        for vid in todo:
            video = videos[vid]
            try:
                if video.kind == "mp4" and self.mp4_on_device:
                    decoded = _nvdec_frames(video.mp4, sorted(wanted[vid]), self.device)
                else:
                    decoded = _cpu_frames(video, sorted(wanted[vid]), self.backend)
                _check_size(video, decoded.values())
                frames[vid] = {i: f.to(self.device, non_blocking=True) for i, f in decoded.items()}
            except Exception as exc:  # noqa: BLE001 - any failure of one video is that sample's corruption
                failed[vid] = str(exc) if isinstance(exc, CorruptSample) else f"{type(exc).__name__}: {exc}"
        return frames, failed

    def _nvjpeg(self, videos, jpg_ids, wanted, frames, failed) -> None:
        order = [(vid, i) for vid in jpg_ids for i in sorted(wanted[vid])]
        try:
            decoded = self._decode_jpegs([videos[vid].jpgs[i] for vid, i in order])
        except RuntimeError:
            # One broken jpg fails the whole batched call: decode video by video to find the broken ones.
            for vid in jpg_ids:
                try:
                    images = self._decode_jpegs([videos[vid].jpgs[i] for i in sorted(wanted[vid])])
                    frames[vid] = dict(zip(sorted(wanted[vid]), images))
                    _check_size(videos[vid], frames[vid].values())
                except (RuntimeError, CorruptSample) as exc:
                    frames.pop(vid, None)
                    failed[vid] = f"jpg does not decode: {exc}"
            return
        for (vid, i), image in zip(order, decoded):
            frames.setdefault(vid, {})[i] = image
        for vid in jpg_ids:
            try:
                _check_size(videos[vid], frames[vid].values())
            except CorruptSample as exc:
                frames.pop(vid)
                failed[vid] = str(exc)

    def _decode_jpegs(self, jpgs: list[bytes]) -> list[torch.Tensor]:
        """nvJPEG, one batched call: jpg bytes -> (3, H, W) uint8 RGB frames on the device."""
        from torchvision.io import ImageReadMode, decode_jpeg

        blobs = [torch.frombuffer(bytearray(jpg), dtype=torch.uint8) for jpg in jpgs]
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)


def _check_size(video: EncodedVideo, frames) -> None:
    for frame in frames:
        if tuple(frame.shape[-2:]) != (video.height, video.width):
            raise CorruptSample(f"decoded frame is {tuple(frame.shape[-2:])}, the headers said "
                                f"{(video.height, video.width)}")


def _cpu_frames(video: EncodedVideo, indices: Sequence[int], backend: str | Decoder) -> dict[int, torch.Tensor]:
    """The workers' own readers, in this process: the frames of decode_on=worker, bit for bit."""
    reader = JpegFrameReader(video.jpgs) if video.kind == "jpg" else open_mp4_reader(video.mp4, backend)
    with reader:
        return dict(zip(indices, reader.read(indices)))  # frame index -> (3, H, W)


def _nvdec_frames(data: bytes, indices: Sequence[int], device: torch.device) -> dict[int, torch.Tensor]:
    """H.264 mp4 bytes -> the frames at `indices` (display order) on `device`, decoded by NVDEC.

    PyNvVideoCodec's buffer-based demuxer reads the bytes through a callback (no temp file); the decoder
    returns frames in display order, planar RGB in device memory, handed to torch through DLPack. Decodes the
    video up to its last needed frame. Untested on a GPU in this repository (written against PyNvVideoCodec
    2.x's documented CreateDemuxer(callback) / CreateDecoder / Decode API).
    """
    import PyNvVideoCodec as nvc

    feeder = _BytesFeeder(data)
    try:
        demuxer = nvc.CreateDemuxer(feeder.feed_chunk)
        decoder = nvc.CreateDecoder(gpuid=device.index or 0, codec=demuxer.GetNvCodecId(), cudacontext=0,
                                    cudastream=0, usedevicememory=True, outputColorType=nvc.OutputColorType.RGBP)
        wanted, last = set(indices), max(indices)
        frames: dict[int, torch.Tensor] = {}
        shown = 0
        for packet in demuxer:  # the demuxer's last packet is empty and flushes the decoder
            for frame in decoder.Decode(packet):
                if shown in wanted:
                    frames[shown] = torch.from_dlpack(frame).clone()  # (3, H, W); the surface is reused
                shown += 1
            if shown > last:
                break
    except Exception as exc:  # PyNvVideoCodec raises its own exception types for broken streams
        raise CorruptSample(f"NVDEC decode failed: {type(exc).__name__}: {exc}") from exc
    if len(frames) != len(wanted):
        raise CorruptSample(f"NVDEC produced no frame for indices {sorted(wanted - set(frames))[:5]}")
    return frames


class _BytesFeeder:
    """The data callback of PyNvVideoCodec's buffer-based demuxer: copies the next chunk into its buffer and
    returns the bytes copied (0 = end of stream)."""

    def __init__(self, data: bytes):
        self.data = memoryview(data)
        self.pos = 0

    def feed_chunk(self, buffer) -> int:
        chunk = self.data[self.pos : self.pos + len(buffer)]
        buffer[: len(chunk)] = chunk
        self.pos += len(chunk)
        return len(chunk)


@functools.cache
def _log_decoders(device: str, jpg_on_device: bool, mp4_on_device: bool, nvdec_error: str | None) -> None:
    jpg = "nvJPEG" if jpg_on_device else "Pillow on the CPU"
    mp4 = "NVDEC (PyNvVideoCodec)" if mp4_on_device else "the CPU readers"
    why = f" (PyNvVideoCodec does not load: {nvdec_error})" if nvdec_error else ""
    logger.info("decode_on=device: decoding in the training process for %s; jpg with %s, mp4 with %s%s",
                device, jpg, mp4, why)
