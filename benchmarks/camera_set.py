"""A third data family for the pre-training comparison (docs/pretrain.md): what a camera adds, unlike both the
demo set (`shards/synthetic.py`) and the motion set (`benchmarks/motion_heldout.py`).

Six classes in three time-reversal pairs: an actor (the largest object) moves left / right / up / down or
grows / shrinks (approaches / recedes). Where it differs from the other two families:
- background: a fine, high-contrast texture (2-pixel grain, like gravel or foliage), not smooth blobs;
- the camera shakes: the whole frame shifts by up to 2 pixels, independently in every frame;
- per-frame noise: Gaussian of a std drawn per video in 0.03-0.10 (the motion set: 0.02-0.06) plus a
  brightness flicker, and the noise is stronger in dark pixels (shot noise);
- frame rate: each video is filmed at 10, 15 or 30 frames per second of the same world, so the actor moves
  1x, 2x or 3x as far between frames (the other families: one rate);
- 1-3 distractors (smaller objects) drift in their own directions, as in the demo set.

    python benchmarks/camera_set.py --out data/videos/camera6
    python benchmarks/bench_pretrain.py --data camera6 ...       # in memory, beside synth and motion4
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.video_sets import write_video_set  # noqa: E402  (only the mp4 writer is shared)

CLASSES = ("left", "right", "up", "down", "grow", "shrink")
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "grow": (0, 0), "shrink": (0, 0)}


def _fine_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(H + 8, W + 8, 3) in [0, 1]: 2-pixel grain over a faint gradient, 4 pixels of margin for the shake."""
    grain = rng.uniform(0, 1, ((size + 8) // 2, (size + 8) // 2, 1))
    grain = np.kron(grain, np.ones((2, 2, 1)))
    tint = rng.uniform(0.4, 1.0, 3)
    ramp = np.linspace(0, rng.uniform(-0.3, 0.3), size + 8)[:, None, None]
    return np.clip(0.25 + 0.5 * grain * tint + ramp, 0, 1)


def render_camera_video(name: str, rng: np.random.Generator, frames: int = 16, size: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8: the class's actor and 1-3 distractors, filmed by a shaky, noisy camera at a
    frame rate of its own."""
    background = _fine_texture(rng, size)
    ys, xs = np.mgrid[0:size, 0:size]
    per_frame = 30 // int(rng.choice([10, 15, 30]))  # world steps between two frames: 3, 2 or 1
    dx, dy = _STEPS[name]
    actor = dict(x=rng.uniform(16, size - 16), y=rng.uniform(16, size - 16), half=rng.uniform(7, 10),
                 vx=dx * rng.uniform(0.6, 1.0), vy=dy * rng.uniform(0.6, 1.0), colour=rng.uniform(0, 1, 3),
                 grow={"grow": 1.0, "shrink": -1.0}.get(name, 0.0) * rng.uniform(0.15, 0.25))
    if name == "shrink":
        actor["half"] += 16 * per_frame * 0.25  # room to shrink over the clip
    objects = [actor] + [
        dict(x=rng.uniform(0, size), y=rng.uniform(0, size), half=rng.uniform(2, 4),
             vx=rng.uniform(-1, 1), vy=rng.uniform(-1, 1), colour=rng.uniform(0, 1, 3), grow=0.0)
        for _ in range(rng.integers(1, 4))
    ]
    noise = rng.uniform(0.03, 0.10)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        world = t * per_frame
        sx, sy = rng.integers(-2, 3, size=2)  # camera shake
        frame = background[4 + sy : 4 + sy + size, 4 + sx : 4 + sx + size].copy()
        for obj in objects:
            cx = (obj["x"] + obj["vx"] * world) % size
            cy = (obj["y"] + obj["vy"] * world) % size
            half = max(obj["half"] + obj["grow"] * world, 1.5)
            inside = (np.abs(xs - cx - sx) <= half) & (np.abs(ys - cy - sy) <= half)
            frame[inside] = obj["colour"]
        flicker = rng.uniform(0.9, 1.1)
        frame = frame * flicker + rng.normal(0, 1, frame.shape) * noise * (1.5 - frame)  # more noise in the dark
        video[t] = np.clip(frame * 255, 0, 255).astype(np.uint8)
    return video


def main(argv: list[str] | None = None) -> int:
    return write_video_set(argv, __doc__, "camera6", CLASSES, render_camera_video, min_size=48)


if __name__ == "__main__":
    raise SystemExit(main())
