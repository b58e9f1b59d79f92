"""Temporal shift (TSM) in the frame model: what moves between frames reaches a frame's own features only
through the shift. Everything else in the trunk sees one frame at a time."""

from __future__ import annotations

import pytest
import torch

from actionrec.models import build_model

FRAMES, SIZE = 8, 32


def frame_features(shift: str, video: torch.Tensor) -> torch.Tensor:
    """(T, C, h, w) trunk output per frame of a one-clip batch, for a fixed seed's small resnet18_temporal."""
    torch.manual_seed(0)
    model = build_model("resnet18_temporal", 2, init="scratch", width=8, hidden_dim=32, num_layers=1, num_heads=2,
                        num_frames=FRAMES, temporal_shift=shift).eval()  # eval: BatchNorm uses no batch statistics
    captured = []
    model.trunk["layer4"].register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        model(video)
    return captured[0]  # (B*T, C, h, w) with B = 1


@pytest.mark.parametrize("shift", ["on", "off"])
def test_a_frame_sees_its_neighbour_change_only_through_the_shift(shift):
    video = torch.randn(1, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    changed = video.clone()
    changed[:, :, 4] = torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))  # only frame 4
    before, after = frame_features(shift, video), frame_features(shift, changed)
    assert not torch.allclose(before[4], after[4])
    differs = [not torch.equal(before[t], after[t]) for t in range(FRAMES)]
    if shift == "on":
        # Frames 3 and 5 take a quarter of every block's input channels from frame 4; each block shifts one
        # frame further, so with 8 blocks the change reaches every frame of the clip.
        assert all(differs), differs
        assert (before[3] - after[3]).abs().max() > 1e-3
    else:
        assert differs == [t == 4 for t in range(FRAMES)]  # bit-identical features for every other frame
