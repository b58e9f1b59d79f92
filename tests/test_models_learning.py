"""Learning regression: a model of the demo's family learns frame order from scratch.

The task needs the frame order and nothing else: a square on a random background moves left or right, and
the two classes are time reversals of each other, so every single frame (and the set of frames) is equally
likely under both. Fresh clips every step (nothing to memorise); scored on clips never trained on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actionrec.models import build_model

FRAMES, SIZE = 8, 32
MODEL = dict(embed_dim=64, depth=2, num_heads=2, num_frames=FRAMES, img_size=SIZE, patch_size=8,
             attention_type="divided_space_time", drop_path_rate=0.0)


def left_right_clips(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, T, H, W) normalised clips of a 6-px square crossing the frame, and labels (0 left, 1 right)."""
    labels = torch.randint(0, 2, (batch,), generator=generator)
    background = torch.rand(batch, 3, 1, 1, 1, generator=generator)
    colour = (background + 0.5) % 1.0  # random, and never the background's colour
    clips = background.expand(batch, 3, FRAMES, SIZE, SIZE).clone()
    clips += 0.05 * torch.randn(clips.shape, generator=generator)  # sensor noise
    speed = 2 + torch.randint(0, 2, (batch,), generator=generator)  # 2-3 px per frame
    start = torch.randint(2, SIZE - 6 - 2 - 3 * (FRAMES - 1) + 1, (batch,), generator=generator)
    rows = torch.randint(0, SIZE - 6, (batch,), generator=generator)
    for b in range(batch):
        for t in range(FRAMES):
            step = t if labels[b] == 1 else FRAMES - 1 - t  # left = right played backwards
            x = int(start[b] + speed[b] * step)
            clips[b, :, t, rows[b] : rows[b] + 6, x : x + 6] = colour[b, :, 0]
    return (clips - 0.45) / 0.225, labels


def train_left_right(init: str, steps: int = 150, seed: int = 0, name: str = "timesformer_tiny", **options) -> float:
    """Held-out accuracy of a tiny model (by default a divided TimeSformer) trained on fresh left/right clips."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(name, 2, **(options if name != "timesformer_tiny" else {**MODEL, **options}), init=init).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        clips, labels = left_right_clips(16, generator)
        loss = F.cross_entropy(model(clips), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    clips, labels = left_right_clips(256, torch.Generator().manual_seed(seed + 1000))
    model.eval()
    with torch.no_grad():
        return (model(clips).argmax(dim=1) == labels).float().mean().item()


def test_the_from_scratch_set_up_learns_frame_order():
    assert train_left_right("scratch") >= 0.95


def test_the_official_set_up_does_not_learn_it_from_scratch():
    # Why the from-scratch set-up exists: the ViT fine-tuning set-up stays blind to frame order here.
    assert train_left_right("vit") < 0.75


# The CNN families at a quarter of the demo's width, on the same task. Each budget is one at which the
# from-scratch set-up was at >= 0.99 on seeds 0, 1 and 2 (docs/models.md, measured 2026-12-06 with 2 threads:
# r3d 80 steps 1.0 / 0.996 / 1.0, r2plus1d 250 steps 0.996 / 1.0 / 0.996, resnet18_temporal 200 steps
# 0.996 / 1.0 / 0.996), so the 0.95 bar has a margin of 0.04 over seeds. The norm the bisect replaced is no
# control here where its result varies over seeds by more than that margin (R(2+1)D with BatchNorm: 0.86, 0.73,
# 0.99 at 250 steps; R3D-18 with BatchNorm is only ~20 steps behind). The frame trunk's instance norm, which
# leaves nothing of a feature on its last 1x1 map, is now refused when the model is built (tested below).
CNN = dict(width=8, hidden_dim=32, num_layers=1, num_heads=2)
CNN_CASES = {
    # family: (extra options, steps)
    "r3d_18_transformer": (dict(token_size=2), 80),
    "r2plus1d_18_transformer": (dict(token_size=2), 250),
    "resnet18_temporal": (dict(num_frames=FRAMES), 200),
}


@pytest.mark.parametrize("name", sorted(CNN_CASES))
def test_each_cnn_family_learns_frame_order_from_scratch(name):
    extra, steps = CNN_CASES[name]
    assert train_left_right("scratch", steps, name=name, **CNN, **extra) >= 0.95


def test_the_frame_trunks_instance_norm_over_a_one_element_map_is_refused_not_trained():
    """The bisect's failing set-up (instance norm over the frame trunk's last 1x1 map: zeros whatever the
    input) no longer trains to chance in silence: building it fails with one line saying what to change."""
    extra, _ = CNN_CASES["resnet18_temporal"]
    with pytest.raises(ValueError, match="one element.*outputs zeros"):
        train_left_right("scratch", 1, name="resnet18_temporal", norm="instance", **CNN, **extra)
