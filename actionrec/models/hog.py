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
    x = F.pad(frames.float(), (1, 1, 1, 1), mode="reflect")  # (N, C, H+2, W+2)
    # Sobel as its two separable halves on slices (a central difference, then a [1, 2, 1] smoothing across
    # it): a depthwise conv2d of the same kernels took ten times as long on the CPU.
    dx = x[..., 2:] - x[..., :-2]  # (N, C, H+2, W)
    gx = dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]  # (N, C, H, W): d/dx
    dy = x[..., 2:, :] - x[..., :-2, :]  # (N, C, H, W+2)
    gy = dy[..., :-2] + 2.0 * dy[..., 1:-1] + dy[..., 2:]  # d/dy
    magnitude = torch.hypot(gx, gy)
    # Orientation in bin units, [0, bins): unsigned, so angles mod pi. Each pixel's magnitude goes to its two
    # nearest bin centres, split linearly (bin bins-1 neighbours bin 0).
    position = torch.remainder(torch.atan2(gy, gx), math.pi) * (bins / math.pi)
    lower = position.floor()
    upper_share = position - lower
    lower = lower.long()
    lower = torch.where(lower == bins, 0, lower)  # pi itself (a rounding) is 0
    upper = torch.where(lower == bins - 1, 0, lower + 1)
    # Sum each (cell, bin)'s shares by one scatter into the small histogram tensor: a per-pixel tensor of all
    # bins, pooled afterwards, would be `bins` times the frames' size.
    count, cells_h, cells_w = magnitude.shape[0], height // cell, width // cell
    cell_of_pixel = ((torch.arange(height, device=x.device) // cell)[:, None] * cells_w
                     + (torch.arange(width, device=x.device) // cell)[None, :])  # (H, W)
    first = (torch.arange(count * channels, device=x.device) * bins).view(count, channels, 1, 1)
    at_lower = (first + lower) * (cells_h * cells_w) + cell_of_pixel  # (N, C, H, W): flat (n, c, bin, cell)
    at_upper = (first + upper) * (cells_h * cells_w) + cell_of_pixel
    histograms = magnitude.new_zeros(count * channels * bins * cells_h * cells_w)
    histograms.scatter_add_(0, at_lower.flatten(), (magnitude * (1.0 - upper_share)).flatten())
    histograms.scatter_add_(0, at_upper.flatten(), (magnitude * upper_share).flatten())
    histograms = histograms.view(count, channels, bins, cells_h, cells_w) / cell**2  # mean over the cell
    return F.normalize(histograms, p=2.0, dim=2, eps=eps)
