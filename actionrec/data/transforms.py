"""Spatial transforms on uint8 clips in the loader workers; float conversion happens on the device.

All functions take and return uint8 (T, C, H, W) clips and apply one set of parameters to every frame
(a clip is cropped, flipped and colour-shifted as a whole).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from actionrec.data.decode import FrameReader
from actionrec.data.sampling import ClipSpec, eval_frame_indices

# Kinetics statistics used by TimeSformer / SlowFast (pixel values in [0, 1]).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class TrainAugment:
    """Training augmentation.

    short_side_range: the clip's short side is rescaled to a uniform random value in this range before a
      random size x size crop (None: (size * 8/7, size * 10/7), i.e. 256-320 for 224, as SlowFast).
    hflip: random horizontal flip. Off by default: it changes the meaning of direction-sensitive classes
      ("pushing something from left to right").
    color_jitter: strength s of random brightness/contrast/saturation factors in [1 - s, 1 + s]; 0 = off.
    """

    short_side_range: tuple[int, int] | None = None
    hflip: bool = False
    color_jitter: float = 0.0

    def resolved_range(self, size: int) -> tuple[int, int]:
        low, high = self.short_side_range or (round(size * 8 / 7), round(size * 10 / 7))
        if not size <= low <= high:
            raise ValueError(f"TrainAugment.short_side_range {low, high} must satisfy size ({size}) <= low <= high")
        return low, high

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"TrainAugment.color_jitter must be in [0, 1), got {self.color_jitter}")


@dataclass(frozen=True)
class CropWindow:
    """A square window of a frame in whole source pixels, resized to the clip size: the spatial part of both a
    training clip's augmentation and an evaluation view."""

    top: int
    left: int
    side: int

    @classmethod
    def of(cls, top: float, left: float, side: float) -> CropWindow:
        return cls(round(top), round(left), max(round(side), 1))

    def resize(self, clip: torch.Tensor, size: int) -> torch.Tensor:
        """uint8 (T, C, H, W) -> (T, C, size, size). Rescaling only the window is what makes this cheap."""
        if self.side == size:
            return clip[..., self.top : self.top + size, self.left : self.left + size].contiguous()
        return TF.resized_crop(clip, self.top, self.left, self.side, self.side, [size, size], antialias=True)


@dataclass(frozen=True)
class TrainParams:
    """One clip's drawn augmentation: crop window, horizontal flip, and colour factors (brightness, contrast,
    saturation) applied in `colour_order` (empty: no colour jitter). Drawn where the frame indices are drawn
    (the loader worker); applied wherever the frames are decoded (the worker, or the training process with
    data.decode_on=device)."""

    crop: CropWindow
    flip: bool = False
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
    colour_order: tuple[int, ...] = ()


def draw_train_params(height: int, width: int, spec: ClipSpec, augment: TrainAugment,
                      rng: np.random.Generator) -> TrainParams:
    """The random draws of `train_transform` for a (height, width) video, in its order: short side, crop
    position, flip, colour. Depends on the frame size only, never on the pixels."""
    low, high = augment.resolved_range(spec.size)
    target_short = rng.integers(low, high + 1)
    # The crop window in source pixels that becomes size x size after rescaling the short side to target_short.
    window = min(height, width) * spec.size / target_short
    top = rng.random() * (height - window)
    left = rng.random() * (width - window)
    flip = bool(augment.hflip and rng.random() < 0.5)
    colour, order = (1.0, 1.0, 1.0), ()
    if augment.color_jitter > 0:
        s = augment.color_jitter
        colour = tuple(float(f) for f in rng.uniform(1 - s, 1 + s, size=3))
        order = tuple(int(i) for i in rng.permutation(3))
    return TrainParams(CropWindow.of(top, left, window), flip, colour, order)


def apply_train_params(clip: torch.Tensor, spec: ClipSpec, params: TrainParams) -> torch.Tensor:
    """uint8 (T, C, H, W) on any device -> uint8 (T, C, S, S): the crop/resize, flip and colour of `params`."""
    clip = params.crop.resize(clip, spec.size)
    if params.flip:
        clip = TF.horizontal_flip(clip)
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for index in params.colour_order:
        clip = adjust[index](clip, params.colour[index])
    return clip


def train_transform(clip: torch.Tensor, spec: ClipSpec, augment: TrainAugment, rng: np.random.Generator) -> torch.Tensor:
    """Random short-side rescale + random crop (one resize of just the crop window), optional flip/colour."""
    _, _, height, width = clip.shape
    return apply_train_params(clip, spec, draw_train_params(height, width, spec, augment, rng))


@dataclass(frozen=True)
class EvalViewParams:
    """One evaluation view of a video: temporal clip `temporal` (its frames are `eval_frame_indices(...,
    temporal, temporal_clips)`) and spatial crop `spatial`, whose window `crop` is resized to the clip size.
    Computed from the frame size alone where the frame indices are chosen (the loader worker); applied
    wherever the frames are decoded (the worker, `predict.py`, or the training process with
    data.decode_on=device), as `TrainParams` are for training clips."""

    temporal: int
    spatial: int
    crop: CropWindow


def eval_view_params(height: int, width: int, spec: ClipSpec, temporal_clips: int,
                     spatial_crops: int) -> list[list[EvalViewParams]]:
    """Every view of a (height, width) video, [temporal][spatial]; the view index is
    temporal * spatial_crops + spatial.

    1 crop: short side -> spec.eval_short_side, centre size x size crop.
    3 crops: short side -> size, crops at the start, centre and end of the long side (SlowFast multi-view test).
    """
    short = min(height, width)
    if spatial_crops == 1:
        window = short * spec.size / spec.resolved_eval_short_side
        corners = [((height - window) / 2, (width - window) / 2)]
    elif spatial_crops == 3:
        window = float(short)
        corners = [((height - window) * s / 2, (width - window) * s / 2) for s in range(3)]
    else:
        raise ValueError(f"spatial_crops must be 1 or 3, got {spatial_crops}")
    return [[EvalViewParams(k, s, CropWindow.of(top, left, window)) for s, (top, left) in enumerate(corners)]
            for k in range(temporal_clips)]


def apply_eval_params(clip: torch.Tensor, spec: ClipSpec, params: EvalViewParams) -> torch.Tensor:
    """uint8 (T, C, H, W) of the view's temporal clip, on any device -> uint8 (T, C, S, S): its crop/resize."""
    return params.crop.resize(clip, spec.size)


def eval_views(clip: torch.Tensor, spec: ClipSpec, spatial_crops: int) -> list[torch.Tensor]:
    """The spatial views of one temporal clip (T, C, H, W) -> spatial_crops x (T, C, S, S)."""
    _, _, height, width = clip.shape
    (row,) = eval_view_params(height, width, spec, 1, spatial_crops)
    return [apply_eval_params(clip, spec, params) for params in row]


def normalize_on_device(
    video: torch.Tensor,
    mean: Sequence[float] = KINETICS_MEAN,
    std: Sequence[float] = KINETICS_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, C, T, H, W) on any device -> normalised `dtype` (B, C, T, H, W) on that device.

    Called by the trainer after moving the uint8 batch (4x fewer bytes over PCIe than float32).
    """
    if video.dtype != torch.uint8 or video.dim() != 5:
        raise ValueError(f"normalize_on_device expects uint8 (B, C, T, H, W), got {video.dtype} {tuple(video.shape)}")
    channels = video.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
    mean_t, std_t = _pixel_scale(tuple(mean), tuple(std), video.device)
    return ((video.float() - mean_t) / std_t).to(dtype)


@functools.lru_cache(maxsize=16)
def _pixel_scale(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, C, 1, 1, 1) mean and std in 0-255 units on `device`, built once per device: making them from Python
    lists on every batch would be a blocking host-to-device copy before every forward pass on a GPU."""
    shape = (1, len(mean), 1, 1, 1)
    mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(shape) * 255
    std_t = torch.tensor(std, device=device, dtype=torch.float32).view(shape) * 255
    return mean_t, std_t


def read_eval_views(reader: FrameReader, clip: ClipSpec, temporal_clips: int,
                    spatial_crops: int) -> tuple[list[np.ndarray], list[list[torch.Tensor]]]:
    """Every evaluation view of one video, all temporal clips decoded in one pass from a `FrameReader`.

    Returns (frame indices of each temporal clip, views[k][s]: uint8 (C, T, S, S) of temporal clip k and
    spatial crop s). The evaluation loader and `predict.py` both use it, so a prediction sees exactly the
    views of evaluation; data.decode_on=device applies the same `eval_view_params` in the training process.
    """
    t = clip.num_frames
    indices = [eval_frame_indices(clip, reader.num_frames, k, temporal_clips) for k in range(temporal_clips)]
    frames = reader.read(np.concatenate(indices))  # (temporal_clips * T, C, H, W)
    height, width = frames.shape[-2:]
    views = [[apply_eval_params(frames[p.temporal * t : (p.temporal + 1) * t], clip, p).permute(1, 0, 2, 3)
              for p in row]  # (T, C, S, S) -> (C, T, S, S)
             for row in eval_view_params(height, width, clip, temporal_clips, spatial_crops)]
    return indices, views
