"""The command line the benchmark video generators share (`motion_heldout.py`, `camera_set.py`): render
N videos per class with a seeded generator per video and write them as mp4 files, one folder per class."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from actionrec.shards.synthetic import encode_mp4

Render = Callable[[str, np.random.Generator, int, int], np.ndarray]  # (class, rng, frames, size) -> (T, H, W, 3)


def write_video_set(argv: list[str] | None, description: str, set_name: str, classes: Sequence[str],
                    render: Render, min_size: int = 16) -> int:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per class)")
    parser.add_argument("--videos-per-class", type=int, default=100)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.size < min_size or args.size % 2:
        parser.error(f"--size must be an even number of pixels >= {min_size}, got {args.size}")
    out = Path(args.out)
    jobs = [(name, i) for name in classes for i in range(args.videos_per_class)]
    for name, index in tqdm(jobs, desc=set_name, unit="video"):
        (out / name).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([args.seed, list(classes).index(name), index])
        encode_mp4(render(name, rng, args.frames, args.size), out / name / f"{name}_{index:04d}.mp4", 30.0)
    print(f"wrote {len(jobs)} videos to {out}")
    return 0
