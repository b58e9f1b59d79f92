"""A labelled demo data set that needs temporal order: classes come in time-reversal pairs.

Each video of the second class of a pair is a freshly sampled video of the first class played backwards,
so the two classes have the same distribution of single frames and only the order of frames tells them
apart. Background, colours, shape, size, speed, start position, distractor objects and noise are all
randomised per video so that the motion of the main object is the only reliable cue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

# (forward, reversed): the reversed class is the forward motion played backwards.
CLASS_PAIRS = (
    ("move_left", "move_right"),
    ("move_up", "move_down"),
    ("rotate_ccw", "rotate_cw"),
    ("grow", "shrink"),
    ("orbit_ccw", "orbit_cw"),
    ("fade_in", "fade_out"),
)
ALL_CLASSES = tuple(name for pair in CLASS_PAIRS for name in pair)

SUPERSAMPLE = 2  # render at 2x and average: smooth edges make small rotations visible at 64 px

# Shapes as unions of convex polygons in a unit box (centred), so any rotation is exact. The asymmetric
# ones are used for rotation classes: a symmetric shape rotating looks the same in both directions.
_CIRCLE = [[(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 20, endpoint=False)]]
SHAPES = {
    "circle": _CIRCLE,
    "square": [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]],
    "triangle": [[(-0.9, 0.8), (0.9, 0.8), (0.0, -0.9)]],
    "diamond": [[(0.0, -1.0), (0.75, 0.0), (0.0, 1.0), (-0.75, 0.0)]],
    "cross": [[(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)], [(-0.3, -1.0), (0.3, -1.0), (0.3, 1.0), (-0.3, 1.0)]],
    "dart": [[(-1.0, -0.45), (1.0, 0.0), (-1.0, 0.45)]],
    "flag": [[(-1.0, -0.2), (1.0, -0.2), (1.0, 0.2), (-1.0, 0.2)], [(0.3, -0.2), (1.0, -0.2), (1.0, -0.9), (0.3, -0.9)]],
    "ell": [[(-0.9, -1.0), (-0.4, -1.0), (-0.4, 1.0), (-0.9, 1.0)], [(-0.9, 0.5), (0.9, 0.5), (0.9, 1.0), (-0.9, 1.0)]],
}
ASYMMETRIC_SHAPES = ("dart", "flag", "ell", "triangle")


@dataclass(frozen=True)
class SyntheticSpec:
    classes: int = 10
    videos_per_class: int = 40
    frames: int = 16
    size: int = 64
    fps: float = 30.0
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.classes <= len(ALL_CLASSES):
            raise ValueError(f"--classes must be between 2 and {len(ALL_CLASSES)}, got {self.classes}")
        if self.videos_per_class < 1 or self.frames < 2:
            raise ValueError("--videos-per-class must be >= 1 and --frames >= 2")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"--size must be an even number >= 32, got {self.size}")

    @property
    def class_names(self) -> tuple[str, ...]:
        return ALL_CLASSES[: self.classes]


def _rasterize(shape: list, center: tuple[float, float], radius: float, angle: float, grid) -> np.ndarray:
    """Coverage mask (H, W) in [0, 1] of a rotated, scaled shape, supersampled."""
    ys, xs = grid
    cos, sin = math.cos(angle), math.sin(angle)
    # into the shape's own frame: translate, rotate back, scale
    u = ((xs - center[0]) * cos + (ys - center[1]) * sin) / radius
    v = (-(xs - center[0]) * sin + (ys - center[1]) * cos) / radius
    mask = np.zeros(xs.shape, dtype=bool)
    for polygon in shape:
        inside = np.ones(xs.shape, dtype=bool)
        points = np.asarray(polygon)
        area = np.sum(points[:, 0] * np.roll(points[:, 1], -1) - np.roll(points[:, 0], -1) * points[:, 1])
        sign = 1.0 if area > 0 else -1.0
        for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0)):
            inside &= sign * ((x1 - x0) * (v - y0) - (y1 - y0) * (u - x0)) >= 0
        mask |= inside
    s = SUPERSAMPLE
    h, w = mask.shape[0] // s, mask.shape[1] // s
    return mask.reshape(h, s, w, s).mean(axis=(1, 3))


def _random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    while True:
        colour = rng.uniform(0, 1, 3)
        if avoid is None or np.abs(colour - avoid).max() > 0.4:
            return colour


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Base colour + gradient + low-frequency texture, static within a video. (H, W, 3) in [0, 1]."""
    base = rng.uniform(0.1, 0.9, 3)
    direction = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    gradient = (xs * math.cos(direction) + ys * math.sin(direction))[..., None] * rng.uniform(0, 0.4, 3)
    coarse = rng.normal(0, rng.uniform(0.02, 0.06), (size // 8 + 1, size // 8 + 1, 3))
    texture = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    return np.clip(base + gradient + texture, 0, 1)


def _forward_motion(name: str, rng: np.random.Generator, frames: int, size: int):
    """Per-frame (cx, cy, radius, angle, opacity) of the main object for the *forward* class of a pair."""
    t = np.arange(frames, dtype=np.float64)
    radius = np.full(frames, rng.uniform(0.1, 0.16) * size)
    opacity = np.ones(frames)
    angle = np.full(frames, rng.uniform(0, 2 * math.pi))
    r = radius[0]
    if name in ("move_left", "move_up"):
        travel = min(rng.uniform(1.5, 3.0) * size / 64 * (frames - 1), size - 2.4 * r)
        start = rng.uniform(min(r * 1.2 + travel, size - r * 1.2), size - r * 1.2)
        along = start - travel * t / (frames - 1)
        wobble = rng.normal(0, 0.3, frames).cumsum() * size / 64
        across = np.clip(rng.uniform(r * 1.2, size - r * 1.2) + wobble, r, size - r)
        cx, cy = (along, across) if name == "move_left" else (across, along)
    elif name == "rotate_ccw":
        radius[:] = rng.uniform(0.14, 0.22) * size
        r = radius[0]
        cx = np.full(frames, rng.uniform(r, size - r))
        cy = np.full(frames, rng.uniform(r, size - r))
        angle = angle[0] - np.radians(rng.uniform(10, 20)) * t  # image y points down: -angle is counter-clockwise
    elif name == "grow":
        ratio = rng.uniform(2.0, 3.0)
        r0 = rng.uniform(0.06, 0.3 / ratio) * size
        radius = r0 * ratio ** (t / (frames - 1))
        r = radius[-1]
        cx = np.full(frames, rng.uniform(r, size - r))
        cy = np.full(frames, rng.uniform(r, size - r))
    elif name == "orbit_ccw":
        radius[:] = rng.uniform(0.07, 0.11) * size
        orbit = rng.uniform(0.15, 0.25) * size
        margin = orbit + radius[0]
        ox, oy = rng.uniform(margin, size - margin, 2)
        phase = rng.uniform(0, 2 * math.pi) - np.radians(rng.uniform(12, 24)) * t
        cx, cy = ox + orbit * np.cos(phase), oy + orbit * np.sin(phase)
    elif name == "fade_in":
        cx = np.full(frames, rng.uniform(r, size - r))
        cy = np.full(frames, rng.uniform(r, size - r))
        opacity = np.linspace(rng.uniform(0.0, 0.15), 1.0, frames)
    else:
        raise ValueError(f"unknown forward motion {name!r}")
    return cx, cy, radius, angle, opacity


def render_video(class_name: str, rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one video of `class_name`."""
    pair = next(p for p in CLASS_PAIRS if class_name in p)
    reverse = class_name == pair[1]
    s = SUPERSAMPLE
    grid = np.mgrid[0 : size * s, 0 : size * s] / s + 0.5 / s
    background = _background(rng, size)
    rotating = pair[0] == "rotate_ccw"
    shape = SHAPES[rng.choice(ASYMMETRIC_SHAPES if rotating else list(SHAPES))]
    colour = _random_colour(rng, background.mean(axis=(0, 1)))
    cx, cy, radius, angle, opacity = _forward_motion(pair[0], rng, frames, size)
    distractors = []
    for _ in range(rng.integers(1, 3)):
        d_radius = rng.uniform(0.04, 0.08) * size
        start = rng.uniform(d_radius, size - d_radius, 2)
        walk = np.cumsum(rng.normal(0, 0.3 * size / 64, (frames, 2)), axis=0) + start  # undirected jitter
        distractors.append((SHAPES[rng.choice(list(SHAPES))], _random_colour(rng), d_radius, walk,
                            rng.uniform(0, 2 * math.pi)))
    noise = rng.uniform(0.01, 0.03)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        frame = background.copy()
        for d_shape, d_colour, d_radius, walk, d_angle in distractors:
            mask = _rasterize(d_shape, tuple(walk[i]), d_radius, d_angle, grid)[..., None]
            frame = frame * (1 - mask) + d_colour * mask
        mask = _rasterize(shape, (cx[i], cy[i]), radius[i], angle[i], grid)[..., None] * opacity[i]
        frame = frame * (1 - mask) + colour * mask
        frame = frame * rng.uniform(0.98, 1.02) + rng.normal(0, noise, frame.shape)
        video[i] = np.clip(frame * 255, 0, 255).astype(np.uint8)
    return video[::-1] if reverse else video


def encode_mp4(video: np.ndarray, path: Path, fps: float) -> None:
    """H.264 yuv420p mp4, like a downloaded data set (high quality so the motion survives)."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001),
                                      options={"crf": "18", "preset": "veryfast"})
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def generate_synthetic(out: str | Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True) -> list[Path]:
    """Write OUT/<class>/<class>_<nnnn>.mp4 for every class and video; returns the paths."""
    out = Path(out)
    paths = []
    jobs = [(c, i) for c in range(spec.classes) for i in range(spec.videos_per_class)]
    for class_index, video_index in tqdm(jobs, desc="generating", unit="video", disable=not progress):
        name = spec.class_names[class_index]
        rng = np.random.default_rng([spec.seed, class_index, video_index])  # independent of generation order
        video = render_video(name, rng, spec.frames, spec.size)
        path = out / name / f"{name}_{video_index:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_mp4(video, path, spec.fps)
        paths.append(path)
    return paths
