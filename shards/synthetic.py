"""Write the synthetic demo data set: real H.264 mp4 files in DIR/<class>/<id>.mp4.

    python shards/synthetic.py --out data/videos/synth [--classes 10] [--videos-per-class 40]

Classes are time-reversal pairs (move left/right, up/down, up-left/down-right, up-right/down-left,
grow/shrink; then rotate ccw/cw, orbit ccw/cw, fade in/out): no single frame tells them apart, only the
motion does.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.shards.synthetic import ALL_CLASSES, SyntheticSpec, generate_synthetic  # noqa: E402


def main(argv=None) -> int:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (DIR/<class>/<id>.mp4)")
    parser.add_argument("--classes", type=int, default=defaults.classes,
                        help=f"number of classes, 2-{len(ALL_CLASSES)}, taken in order from: {', '.join(ALL_CLASSES)} "
                             f"(default {defaults.classes})")
    parser.add_argument("--videos-per-class", type=int, default=defaults.videos_per_class, help=f"(default {defaults.videos_per_class})")
    parser.add_argument("--frames", type=int, default=defaults.frames, help=f"frames per video (default {defaults.frames})")
    parser.add_argument("--size", type=int, default=defaults.size, help=f"frame width and height, even (default {defaults.size})")
    parser.add_argument("--fps", type=float, default=defaults.fps, help=f"(default {defaults.fps:g})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"(default {defaults.seed})")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes rendering and encoding (default: min(4, CPU count)); output does not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        spec = SyntheticSpec(classes=args.classes, videos_per_class=args.videos_per_class, frames=args.frames,
                             size=args.size, fps=args.fps, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_file() or (out.is_dir() and any(p.suffix == ".mp4" for p in out.rglob("*.mp4"))
                         and not set(p.name for p in out.iterdir()) <= set(spec.class_names)):
        print(f"error: --out {out} already holds other files; give an empty or new folder", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    paths = generate_synthetic(out, spec, progress=not args.no_progress, workers=args.workers)
    print(f"wrote {len(paths)} videos ({spec.classes} classes x {spec.videos_per_class}, {spec.frames} frames "
          f"{spec.size}x{spec.size} at {spec.fps:g} fps) to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
