"""A labelled demo data set that needs temporal order: classes come in time-reversal pairs.

Each video of the second class of a pair is a freshly sampled video of the first class played backwards,
so the two classes have the same distribution of single frames and only the order of frames tells them
apart. One to three objects ("actors") do the class's motion, each with its own shape, colour, size, speed
and place; background, distractor objects and noise are randomised per video, so that the actors' motion
is the only reliable cue.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from actionrec.logging import progress_bar

# (forward, reversed): the reversed class is the forward motion played backwards.
# The default 10 classes are the first five pairs: translations in four directions and scale, motions a
# from-scratch model learns from 800 videos within the demo's minutes. Rotation, orbit and fade are harder
# (`--classes 16` adds them).
CLASS_PAIRS = (
    ("move_left", "move_right"),
    ("move_up", "move_down"),
    ("move_up_left", "move_down_right"),
    ("move_up_right", "move_down_left"),
    ("grow", "shrink"),
    ("rotate_ccw", "rotate_cw"),
    ("orbit_ccw", "orbit_cw"),
    ("fade_in", "fade_out"),
)
# Forward direction (x right, y down) of the translation pairs.
MOVES = {"move_left": (-1.0, 0.0), "move_up": (0.0, -1.0), "move_up_left": (-1.0, -1.0), "move_up_right": (1.0, -1.0)}
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
    videos_per_class: int = 100
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


def _rasterize(shape: list, center: tuple[float, float], radius: float, angle: float, size: int) -> np.ndarray:
    """Coverage mask (H, W) in [0, 1] of a rotated, scaled shape, supersampled. Only the shape's bounding
    box is tested (every vertex lies within 1.5 radii of the centre): 10x less work than the full frame."""
    coverage = np.zeros((size, size))
    extent = 1.5 * radius
    x0, x1 = max(0, int(center[0] - extent)), min(size, math.ceil(center[0] + extent))
    y0, y1 = max(0, int(center[1] - extent)), min(size, math.ceil(center[1] + extent))
    if x0 >= x1 or y0 >= y1:
        return coverage
    s = SUPERSAMPLE
    ys, xs = np.mgrid[y0 * s : y1 * s, x0 * s : x1 * s] / s + 0.5 / s
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
        for (px0, py0), (px1, py1) in zip(points, np.roll(points, -1, axis=0)):
            inside &= sign * ((px1 - px0) * (v - py0) - (py1 - py0) * (u - px0)) >= 0
        mask |= inside
    coverage[y0:y1, x0:x1] = mask.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    return coverage


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
    radius = np.full(frames, rng.uniform(0.12, 0.18) * size)
    opacity = np.ones(frames)
    angle = np.full(frames, rng.uniform(0, 2 * math.pi))
    r = radius[0]
    if name in MOVES:
        direction = np.asarray(MOVES[name]) / np.hypot(*MOVES[name])
        low, high = r * 1.2, size - r * 1.2  # where the centre may go
        travel = min(rng.uniform(1.5, 2.5) * size / 64 * (frames - 1), 0.999 * (high - low) / np.abs(direction).max())
        shift = travel * direction
        start = [rng.uniform(low - min(d, 0), high - max(d, 0)) for d in shift]
        wobble = rng.normal(0, 0.3, frames).cumsum() * size / 64  # across the motion
        cx = np.clip(start[0] + shift[0] * t / (frames - 1) - direction[1] * wobble, r, size - r)
        cy = np.clip(start[1] + shift[1] * t / (frames - 1) + direction[0] * wobble, r, size - r)
    elif name == "rotate_ccw":
        radius[:] = rng.uniform(0.14, 0.22) * size
        r = radius[0]
        cx = np.full(frames, rng.uniform(r, size - r))
        cy = np.full(frames, rng.uniform(r, size - r))
        angle = angle[0] - np.radians(rng.uniform(15, 25)) * t  # image y points down: -angle is counter-clockwise
    elif name == "grow":
        ratio = rng.uniform(2.0, 3.0)
        r0 = rng.uniform(0.06, 0.3 / ratio) * size
        radius = r0 * ratio ** (t / (frames - 1))
        r = radius[-1]
        cx = np.full(frames, rng.uniform(r, size - r))
        cy = np.full(frames, rng.uniform(r, size - r))
    elif name == "orbit_ccw":
        radius[:] = rng.uniform(0.09, 0.13) * size
        orbit = rng.uniform(0.18, 0.26) * size
        margin = orbit + radius[0]
        ox, oy = rng.uniform(margin, size - margin, 2)
        phase = rng.uniform(0, 2 * math.pi) - np.radians(rng.uniform(15, 25)) * t
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
    background = _background(rng, size)
    rotating = pair[0] == "rotate_ccw"
    actors = []  # 1-3 objects doing the class's motion, each with its own shape, colour, place and speed
    for _ in range(rng.integers(1, 4)):
        shape = SHAPES[rng.choice(ASYMMETRIC_SHAPES if rotating else list(SHAPES))]
        colour = _random_colour(rng, background.mean(axis=(0, 1)))
        actors.append((shape, colour, *_forward_motion(pair[0], rng, frames, size)))
    distractors = []
    for _ in range(rng.integers(0, 2)):
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
            mask = _rasterize(d_shape, tuple(walk[i]), d_radius, d_angle, size)[..., None]
            frame = frame * (1 - mask) + d_colour * mask
        for shape, colour, cx, cy, radius, angle, opacity in actors:
            mask = _rasterize(shape, (cx[i], cy[i]), radius[i], angle[i], size)[..., None] * opacity[i]
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
        stream.codec_context.thread_count = 1  # parallelism comes from one video per worker process
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def _write_one(job: tuple[Path, SyntheticSpec, int, int]) -> Path:
    out, spec, class_index, video_index = job
    name = spec.class_names[class_index]
    rng = np.random.default_rng([spec.seed, class_index, video_index])  # independent of order and worker
    video = render_video(name, rng, spec.frames, spec.size)
    path = out / name / f"{name}_{video_index:04d}.mp4"
    encode_mp4(video, path, spec.fps)
    return path


def generate_synthetic(out: str | Path, spec: SyntheticSpec = SyntheticSpec(), progress: bool = True,
                       workers: int = 1) -> list[Path]:
    """Write OUT/<class>/<class>_<nnnn>.mp4 for every class and video; returns the paths. What is drawn
    for each video depends only on (seed, class, index), not on `workers`."""
    out = Path(out)
    for name in spec.class_names:
        (out / name).mkdir(parents=True, exist_ok=True)
    jobs = [(out, spec, c, i) for c in range(spec.classes) for i in range(spec.videos_per_class)]
    bar = dict(total=len(jobs), desc="generating", unit="video", enabled=progress)
    if workers <= 1:
        return [_write_one(job) for job in progress_bar(jobs, **bar)]
    # fork: no re-import of the caller's __main__; each job is independent, so memory stays one video per worker
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(progress_bar(pool.imap(_write_one, jobs, chunksize=4), **bar))
