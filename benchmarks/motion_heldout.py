"""A second motion data set from a generator that shares no code with `shards/synthetic.py`, to check that
a recipe tuned on our own demo set is not tuned to our generator.

Four direction classes (left, right, up, down: two time-reversal pairs). Every video has several objects
(filled discs and boxes of random colours and sizes) that all drift in the class direction at their own
speed and wrap around the frame edges, over a textured background with per-frame sensor noise and a
flicker of global brightness. 64 x 64, 16 frames, folder per class:

    python benchmarks/motion_heldout.py --out data/videos/motion4
    python shards/pack.py data/videos/motion4 --out data/shards/motion4
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml train.py --config configs/demo.yaml \\
        data.shards=data/shards/motion4 name=demo-motion4
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.video_sets import write_video_set  # noqa: E402  (only the mp4 writer is shared)

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random texture (H, W, 3) in [0, 1]: noise upsampled from a few coarse grids, summed."""
    image = np.zeros((size, size, 3))
    for cells, weight in ((4, 0.5), (8, 0.3), (16, 0.2)):
        coarse = rng.uniform(0, 1, (cells, cells, 3))
        image += weight * np.kron(coarse, np.ones((size // cells, size // cells, 1)))
    tint = rng.uniform(0.3, 1.0, 3)
    return np.clip(image * tint + rng.uniform(-0.2, 0.2), 0, 1)


def render_motion_video(direction: str, rng: np.random.Generator, frames: int = 16, size: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8: 2-5 objects wrapping around in `direction`, textured background, noise."""
    dx, dy = DIRECTIONS[direction]
    background = _texture(rng, size)
    ys, xs = np.mgrid[0:size, 0:size]
    objects = []
    for _ in range(rng.integers(2, 6)):
        half = rng.uniform(3, 8)
        objects.append(dict(
            x=rng.uniform(0, size), y=rng.uniform(0, size), half=half, disc=rng.random() < 0.5,
            speed=rng.uniform(1.0, 3.0), colour=rng.uniform(0, 1, 3),
        ))
    noise = rng.uniform(0.02, 0.06)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        frame = background.copy()
        for obj in objects:
            cx = (obj["x"] + dx * obj["speed"] * t) % size
            cy = (obj["y"] + dy * obj["speed"] * t) % size
            # wrap-around distances on the torus
            ddx = (xs - cx + size / 2) % size - size / 2
            ddy = (ys - cy + size / 2) % size - size / 2
            inside = (ddx**2 + ddy**2 <= obj["half"] ** 2) if obj["disc"] else (
                (np.abs(ddx) <= obj["half"]) & (np.abs(ddy) <= obj["half"]))
            frame[inside] = obj["colour"]
        frame = frame * rng.uniform(0.95, 1.05) + rng.normal(0, noise, frame.shape)
        video[t] = np.clip(frame * 255, 0, 255).astype(np.uint8)
    return video


def main(argv: list[str] | None = None) -> int:
    return write_video_set(argv, __doc__, "motion4", list(DIRECTIONS), render_motion_video)


if __name__ == "__main__":
    raise SystemExit(main())
