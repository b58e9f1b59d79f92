"""The HOG pre-training target (MaskFeat): histograms of oriented gradients of known images, their invariances,
and their place as `pretrain.target: hog` (shapes, the one-line refusals)."""

from __future__ import annotations

import pytest
import torch

from actionrec.config import ConfigError, build_config
from actionrec.models import build_model
from actionrec.models.hog import histograms_of_oriented_gradients
from actionrec.models.masked import MaskedVideoModel, cube_targets


def edge_image(vertical: bool, size: int = 16) -> torch.Tensor:
    """(1, 3, size, size): dark left half and light right half (a vertical edge), or dark top and light bottom."""
    image = torch.zeros(1, 3, size, size)
    if vertical:
        image[..., size // 2 :] = 1.0
    else:
        image[..., size // 2 :, :] = 1.0
    return image


def test_a_vertical_edge_fills_the_horizontal_gradient_bin_and_a_horizontal_edge_the_vertical_ones():
    hog = histograms_of_oriented_gradients(edge_image(vertical=True))
    assert hog.shape == (1, 3, 9, 2, 2)  # (N, C, bins, 16/8, 16/8)
    # Every cell touches the edge (it runs down the middle, between the two columns of cells): bin 0 (0 deg,
    # horizontal gradients) holds all of it, in every channel and cell.
    assert torch.equal(hog.argmax(dim=2), torch.zeros(1, 3, 2, 2, dtype=torch.long))
    torch.testing.assert_close(hog[:, :, 0], torch.ones(1, 3, 2, 2))
    # A horizontal edge: 90 deg, halfway between the centres of bins 4 (80 deg) and 5 (100 deg).
    hog = histograms_of_oriented_gradients(edge_image(vertical=False))
    torch.testing.assert_close(hog[:, :, 4], torch.full((1, 3, 2, 2), 0.5**0.5))
    torch.testing.assert_close(hog[:, :, 5], torch.full((1, 3, 2, 2), 0.5**0.5))
    # Unsigned: a light-to-dark edge is the same orientation as a dark-to-light one.
    torch.testing.assert_close(histograms_of_oriented_gradients(1.0 - edge_image(vertical=True)),
                               histograms_of_oriented_gradients(edge_image(vertical=True)))


def test_histograms_are_unit_length_per_cell_and_zero_where_the_image_is_flat():
    image = torch.zeros(2, 3, 32, 32)
    image[0, :, 5:27, 5:27] = torch.rand(3, 22, 22, generator=torch.Generator().manual_seed(0))
    hog = histograms_of_oriented_gradients(image)
    assert hog.shape == (2, 3, 9, 4, 4) and (hog >= 0).all()
    torch.testing.assert_close(hog[0].norm(dim=1), torch.ones(3, 4, 4))
    assert torch.equal(hog[1], torch.zeros_like(hog[1]))  # a flat image has no gradients anywhere


def test_histograms_ignore_a_brightness_offset_and_a_contrast_scale():
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(4, 3, 64, 64, generator=generator)
    hog = histograms_of_oriented_gradients(image)
    for changed in (image + 3.0, image * 0.2, 2.5 * image - 1.0):
        torch.testing.assert_close(histograms_of_oriented_gradients(changed), hog, atol=1e-4, rtol=0)
    # ...but not a change of what the image shows.
    assert not torch.allclose(histograms_of_oriented_gradients(image.transpose(-1, -2)), hog, atol=0.1)


def test_frames_that_are_not_whole_cells_are_refused():
    with pytest.raises(ValueError, match="multiples of 8, got 20x16"):
        histograms_of_oriented_gradients(torch.zeros(1, 3, 20, 16))


def test_the_hog_target_of_every_hidden_cube_is_its_frames_histograms():
    torch.manual_seed(0)
    encoder = build_model("timesformer_tiny", num_classes=1, embed_dim=32, depth=1, num_heads=2, num_frames=4,
                          img_size=64, init="scratch")
    model = MaskedVideoModel(encoder, mask_ratio=0.75, target="hog").eval()
    video = torch.rand(2, 3, 4, 64, 64)
    mask = model.random_mask(2, torch.Generator().manual_seed(2))
    pred, target = model(video, mask), model.targets(video, mask)
    assert pred.shape == target.shape == (2, 2, 12, 2 * 2 * 2 * 9 * 3)  # (B, T/2, hidden, frames*cells*bins*C)
    # The first hidden cube of clip 0: frames 0-1 at its patch position, histograms taken over the whole frame.
    position = int(torch.nonzero(mask[0])[0])
    row, col = divmod(position, 4)
    frames = histograms_of_oriented_gradients(video[0, :, :2].transpose(0, 1))  # (2, C, 9, 8, 8)
    cells = frames[..., 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]  # (k, C, bins, i, j)
    torch.testing.assert_close(target[0, 0, 0], cells.permute(0, 3, 4, 2, 1).flatten())  # (k i j bins C)
    torch.testing.assert_close(cube_targets(video, mask, 16, 2, target="hog"), target)
    # No pixels to draw: the hidden cubes of the reconstruction are blank, the visible ones the clip's.
    recon = model.reconstruct(video, mask, pred)
    hidden = mask.view(2, 1, 1, 4, 4).repeat_interleave(16, -2).repeat_interleave(16, -1).expand_as(video)
    assert torch.equal(recon[~hidden], video[~hidden]) and (recon[hidden] == 0).all()


def test_a_patch_size_that_is_not_whole_cells_is_refused_when_the_config_is_read():
    with pytest.raises(ConfigError, match="model.patch_size must be a multiple of 8, got 4"):
        build_config({"task": "pretrain", "model": {"name": "timesformer_tiny", "patch_size": 4},
                      "pretrain": {"target": "hog"}}, check_paths=False)
    encoder = build_model("timesformer_tiny", num_classes=1, patch_size=4, img_size=32, depth=1)
    with pytest.raises(ValueError, match="needs a patch_size that is a multiple of 8, got 4"):
        MaskedVideoModel(encoder, target="hog")
