"""Histograms of oriented gradients (Dalal & Triggs 2005) of batched frames, as MaskFeat's pre-training
target (Wei et al., CVPR 2022): per cell, a histogram of gradient orientations weighted by gradient magnitude,
L2-normalised per cell and channel.

Written here because no maintained library computes it batched on the device: scikit-image's `hog` is one
NumPy image at a time on the CPU, kornia has no HOG, and the target is computed for every training batch in
the training process. The whole thing is three convolutions' worth of tensor ops.

    hog = histograms_of_oriented_gradients(frames)    # (N, C, H, W) -> (N, C, bins, H/cell, W/cell)

Choices (MaskFeat's unless said): Sobel gradients per colour channel with reflected borders; unsigned
orientations (a gradient and its opposite are one orientation, so a dark-to-light and a light-to-dark edge
agree); 9 bins over 180 degrees, bin 0 centred on horizontal gradients (vertical edges); each pixel's
magnitude split linearly between its two nearest bins (Dalal & Triggs; MaskFeat bins hard, which puts an
orientation on a bin border into either bin at the whim of rounding); no Gaussian window; each cell's
histogram L2-normalised over its bins, which makes it invariant to a brightness offset (gradients) and to a
contrast scale (the normalisation) of the cell.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HOG_BINS = 9
HOG_CELL = 8


def histograms_of_oriented_gradients(frames: torch.Tensor, cell: int = HOG_CELL, bins: int = HOG_BINS,
                                     eps: float = 1e-6) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, bins, H / cell, W / cell) float32, each cell's histogram of unit L2 norm (or zero
    where the cell is flat). H and W must be multiples of `cell`."""
    _, channels, height, width = frames.shape
    if height % cell or width % cell:
        raise ValueError(f"HOG cells of {cell} pixels need frames whose sides are multiples of {cell}, got {height}x{width}")
    x = F.pad(frames.float(), (1, 1, 1, 1), mode="reflect")
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    gx = F.conv2d(x, sobel.expand(channels, 1, 3, 3), groups=channels)  # (N, C, H, W): d/dx, each channel alone
    gy = F.conv2d(x, sobel.t().expand(channels, 1, 3, 3), groups=channels)  # d/dy
    magnitude = torch.hypot(gx, gy)
    # Orientation in bin units, [0, bins): unsigned, so angles mod pi.
    position = torch.remainder(torch.atan2(gy, gx), math.pi) * (bins / math.pi)
    histograms = []
    for b in range(bins):
        distance = (position - b).abs()
        distance = torch.minimum(distance, bins - distance)  # circular: bin bins-1 neighbours bin 0
        weight = (1.0 - distance).clamp(min=0.0)  # linear split between the two nearest bin centres
        histograms.append(F.avg_pool2d(weight * magnitude, cell))  # (N, C, H/cell, W/cell)
    histograms = torch.stack(histograms, dim=2)  # (N, C, bins, H/cell, W/cell)
    return F.normalize(histograms, p=2.0, dim=2, eps=eps)
